"""`rlhf bench`: PPO updates at chosen sizes on a chosen model, timed phase by phase.

Models, in order of preference:
  --artifact-dir DIR   the SFT and reward artifacts of a pipeline run (the policy, reference,
                       critic and reward model PPO itself would load; reward_stats from the RM);
  --model PATH         a causal LM (hub id or local dir): policy and reference from it, critic and
                       reward model = the same weights with a fresh one-output head;
  (neither)            a random-init Llama sized by --hidden/--layers/--heads/--intermediate, with
                       a BPE tokenizer trained on the shipped demo data (--vocab tokens) and
                       --model-vocab output rows (e.g. 32000 to measure a large LM head).

The loop is the pipeline's own PPOTrainer, configured through the same config keys as
`launch/ppo.py` (the flags below are shorthands for ppo.* / deepspeed.* / model.dtype; any
other key=value override is accepted). `--warmup` updates run first and are not timed.
Under the deepspeed launcher (`deepspeed --num_gpus N rlhf/bench.py ...`) every rank runs it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from rlhf.install import DEMO_CONFIG


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (default: a random-init Llama of the sizes below)")
    src.add_argument("--artifact-dir", default=None, help="use DIR/sft and DIR/reward, as PPO would")
    src.add_argument("--model", default=None, help="a causal LM: hub id or local directory")
    src.add_argument("--hidden", type=int, default=256)
    src.add_argument("--layers", type=int, default=4)
    src.add_argument("--heads", type=int, default=8)
    src.add_argument("--intermediate", type=int, default=688)
    src.add_argument("--vocab", type=int, default=300, help="BPE tokenizer size (trained on the demo data)")
    src.add_argument("--model-vocab", type=int, default=None,
                     help="output rows of the random-init model (>= the tokenizer's; default: the tokenizer's)")
    run = p.add_argument_group("sizes")
    run.add_argument("--config", default=str(DEMO_CONFIG), help="pipeline YAML the ppo.* defaults come from")
    run.add_argument("--prompts", default=None, help="prompts file (default: the config's ppo.train_prompts)")
    run.add_argument("--episodes", type=int, default=256, help="timed episodes (across processes)")
    run.add_argument("--batch", type=int, default=32, help="prompts per rollout, per process")
    run.add_argument("--mini-batch", type=int, default=None,
                     help="responses per optimizer step (default: the whole rollout, --batch x k)")
    run.add_argument("--grad-accum", type=int, default=1)
    run.add_argument("--max-new-tokens", type=int, default=48)
    run.add_argument("--ppo-epochs", type=int, default=4)
    run.add_argument("--zero-stage", type=int, default=None, help="default: the config's deepspeed.zero_stage")
    run.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: the config's)")
    run.add_argument("--gradient-checkpointing", action="store_true")
    run.add_argument("--recompute-logprobs", action="store_true",
                     help="ppo.logprobs_from_generation=false: one more actor forward per rollout")
    run.add_argument("--engine", choices=("hf", "vllm"), default=None,
                     help="rollout engine (ppo.rollout_engine; default: the config's): hf generate() or vLLM")
    run.add_argument("--estimator", default=None,
                     help="ppo.advantage_estimator (default: the config's), or `all`: each estimator in turn, each in "
                          "a fresh process (its own peak memory), then one table")
    run.add_argument("--samples-per-prompt", type=int, default=None,
                     help="ppo.samples_per_prompt k (default: the config's); --batch counts prompts, so an update "
                          "has batch x k responses")
    run.add_argument("--warmup", type=int, default=1, help="untimed updates before the timed ones")
    run.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="further key=value config overrides, e.g. ppo.top_k=20")


def samples_per_prompt(a: argparse.Namespace) -> int:
    """k: --samples-per-prompt, else the config's ppo.samples_per_prompt (after the overrides)."""
    if a.samples_per_prompt:
        return a.samples_per_prompt
    from rlhf.config import load_config

    probe = [o for o in a.overrides if o.startswith(("ppo.samples_per_prompt=", "ppo.advantage_estimator="))]
    # (sizes that always divide: the bench sets its own mini-batch later)
    return load_config(a.config, ["ppo.mini_batch_size=1", "ppo.grad_accum=1", *probe]).ppo.samples_per_prompt


def _overrides(a: argparse.Namespace, world: int) -> list[str]:
    k = samples_per_prompt(a)
    mini = a.mini_batch or a.batch * k
    per_update = a.batch * k * world
    updates = max(1, math.ceil(a.episodes / per_update)) + a.warmup
    out = [f"ppo.rollout_batch_size={a.batch}", f"ppo.mini_batch_size={mini}", f"ppo.grad_accum={a.grad_accum}",
           f"ppo.max_new_tokens={a.max_new_tokens}", f"ppo.ppo_epochs={a.ppo_epochs}",
           f"ppo.total_episodes={updates * per_update}", f"ppo.forward_batch_size={a.batch}",
           f"ppo.gradient_checkpointing={str(a.gradient_checkpointing).lower()}",
           f"ppo.logprobs_from_generation={str(not a.recompute_logprobs).lower()}", f"seed={a.seed}",
           "wandb.mode=disabled"]
    if a.prompts:
        out.append(f"ppo.train_prompts={Path(a.prompts).resolve()}")
    if a.zero_stage is not None:
        out.append(f"deepspeed.zero_stage={a.zero_stage}")
    if a.dtype:
        out.append(f"model.dtype={a.dtype}")
    if a.engine:
        out.append(f"ppo.rollout_engine={a.engine}")
    if a.estimator:
        out.append(f"ppo.advantage_estimator={a.estimator}")
    return out + list(a.overrides) + [f"ppo.samples_per_prompt={k}"]


def _models(a: argparse.Namespace, cfg: Any) -> tuple[Any, Any, dict, bool, str]:
    """(tokenizer, PPOModels laid out as the PPO stage lays them out (rlhf.ppo.layout), reward_stats,
    use_chat_template, description)."""
    import copy

    import torch

    from rlhf import artifacts, models
    from rlhf.ppo.layout import build_models, from_artifacts

    c, lora, dtype = cfg.ppo, cfg.model.lora, cfg.model.dtype
    quant = models.stage_quantization(cfg.model, c.lora, "ppo.lora")  # model.quantization=4bit: as PPO loads them
    if a.artifact_dir:
        sft = artifacts.load(artifacts.stage_dir(a.artifact_dir, artifacts.SFT), artifacts.SFT)
        tok = models.load_tokenizer(str(sft.path))
        rm = artifacts.load(artifacts.stage_dir(a.artifact_dir, artifacts.REWARD), artifacts.REWARD,
                            tokenizer_fp=artifacts.tokenizer_fingerprint(tok))
        four = from_artifacts(c, lora, dtype, sft_path=str(sft.path), rm_path=str(rm.path),
                              pad_token_id=tok.pad_token_id, quantization=quant)
        return tok, four, rm.manifest["reward_stats"], sft.use_chat_template, f"artifacts in {a.artifact_dir}"
    if a.model:
        trust = cfg.model.trust_remote_code
        tok = models.load_tokenizer(a.model, trust)
        added = models.ensure_pad_token(tok)

        def fitted(model: Any) -> Any:  # a pad token added to the tokenizer needs an embedding row
            if added:
                models.resize_for_tokenizer(model, tok)
            return model

        scorer = lambda q=None: fitted(models.load_reward_model(a.model, dtype, tok.pad_token_id, trust,  # noqa: E731
                                                                quantization=q))
        four = build_models(c, lora, dtype, quantization=quant, load_reward=scorer, load_critic=scorer,
                            load_policy=lambda q=None: fitted(models.load_causal_lm(a.model, dtype, trust, quantization=q)))
        return (tok, four, {"mean": 0.0, "std": 1.0}, tok.chat_template is not None,
                f"{a.model} (critic and reward model: fresh heads)")
    if quant is not None:
        from rlhf.config import ConfigError

        raise ConfigError("model.quantization=4bit quantizes a checkpoint: give --model DIR or --artifact-dir DIR "
                          "(the random-init bench model is built in memory)")
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from rlhf.data import load_sft, prompt_text

    texts = [prompt_text(e.prompt) + e.completion for e in load_sft(cfg.sft.train_data).examples]
    tok = models.train_scratch_tokenizer(texts, a.vocab)
    vocab = max(len(tok), a.model_vocab or 0)
    lcfg = LlamaConfig(vocab_size=vocab, hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                       num_attention_heads=a.heads, num_key_value_heads=a.heads, max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                       tie_word_embeddings=True, num_labels=1)
    dt = models.DTYPES[dtype]
    torch.manual_seed(a.seed)
    policy = LlamaForCausalLM(lcfg).to(dt)  # the reference is an exact copy, as a second load of a checkpoint is
    four = build_models(c, lora, dtype, load_policy=lambda: copy.deepcopy(policy),
                        load_reward=lambda: LlamaForSequenceClassification(lcfg).to(dt),
                        load_critic=lambda: LlamaForSequenceClassification(lcfg).to(dt))
    n = sum(p.numel() for p in policy.parameters())
    return (tok, four, {"mean": 0.0, "std": 1.0}, True,
            f"random-init Llama {n / 1e6:.1f}M parameters (hidden {a.hidden}, {a.layers} layers, {a.heads} heads, "
            f"intermediate {a.intermediate}, vocabulary {vocab})")


class PeakMemory:
    """Peak memory of this process from `reset()` on: CUDA allocator peak on a GPU, else the
    resident-set high-water mark (Linux VmHWM, reset through /proc/self/clear_refs)."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # not Linux, or not allowed: the peak then counts from process start

    def peak_mb(self) -> float | None:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(a: argparse.Namespace) -> dict:
    import torch

    from rlhf import distributed, engines
    from rlhf.config import load_config
    from rlhf.data import load_prompts, render_prompt
    from rlhf.models import ensure_pad_token
    from rlhf.ppo.trainer import PhaseTimer, PPOTrainer, PromptStream
    from rlhf.metric_names import PPO as PPOMetrics

    t_start = time.perf_counter()
    if a.engine:  # before anything starts
        engines.require(a.engine, f"--engine {a.engine}")
    distributed.init_distributed()
    world = distributed.world_size()
    cfg = load_config(a.config, _overrides(a, world))
    engines.require(cfg.ppo.rollout_engine)
    torch.manual_seed(a.seed + distributed.rank())
    tok, four, stats, use_template, described = _models(a, cfg)
    ensure_pad_token(tok)
    c = cfg.ppo
    trainer = PPOTrainer(cfg=c, ds=cfg.deepspeed, dtype=cfg.model.dtype, actor_model=four.actor, critic_model=four.critic,
                         reward_model=four.reward, ref_model=four.reference, tokenizer=tok, reward_stats=stats,
                         timer=PhaseTimer(sync=True),  # phases awaited at their ends: each owns its GPU work
                         vllm=cfg.vllm, seed=cfg.seed)
    engine_startup_s = getattr(trainer.engine, "startup_seconds", 0.0)
    prompts = load_prompts(c.train_prompts)
    stream = PromptStream(prompts, cfg.seed, distributed.rank(), world, render=lambda p: render_prompt(tok, p, use_template))
    setup_s = time.perf_counter() - t_start
    for _ in range(a.warmup):
        trainer.step(stream.next(c.rollout_batch_size))
    memory = PeakMemory()
    memory.reset()
    timed = trainer.plan.num_updates - a.warmup
    phases = dict.fromkeys(PhaseTimer.PHASES, 0.0)
    tokens = 0.0
    t0 = time.perf_counter()
    for _ in range(timed):
        m = trainer.step(stream.next(c.rollout_batch_size))
        for k in PhaseTimer.PHASES:
            phases[k] += m[PPOMetrics.time(k)]
        tokens += m[PPOMetrics.RESPONSE_LENGTH] * trainer.plan.episodes_per_update
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    episodes = timed * trainer.plan.episodes_per_update
    phases["other"] = max(0.0, seconds - sum(phases.values()))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {
        "model": described, "device": device, "processes": world, "zero_stage": cfg.deepspeed.zero_stage,
        "engine_zero_stage": trainer.ds.zero_stage,
        "dtype": cfg.model.dtype, "batch": c.rollout_batch_size, "mini_batch": c.mini_batch_size,
        "estimator": c.advantage_estimator, "samples_per_prompt": c.samples_per_prompt, "critic": trainer.critic is not None,
        "grad_accum": c.grad_accum, "max_new_tokens": c.max_new_tokens, "ppo_epochs": c.ppo_epochs,
        "gradient_checkpointing": c.gradient_checkpointing, "logprobs_from_generation": c.logprobs_from_generation,
        "rollout_engine": c.rollout_engine, "engine": trainer.engine.describe(), "engine_startup_s": engine_startup_s,
        "updates": timed, "episodes": episodes, "seconds": seconds,
        "episodes_per_s": episodes / seconds, "generated_tokens_per_s": tokens / seconds,
        # the engine alone: tokens sampled per second of the generation phase, and the weight push per update
        "generation_tokens_per_s": tokens / max(phases["generation"], 1e-9),
        "weight_sync_s_per_update": phases["weight_sync"] / max(timed, 1),
        "mean_response_length": tokens / max(episodes, 1),
        "phase_seconds": phases, "peak_memory_mb": memory.peak_mb(),
        "peak_memory_kind": "cuda max_memory_allocated" if torch.cuda.is_available() else "resident set (VmHWM)",
        "setup_s": setup_s,
    }


def render(r: dict) -> str:
    zero = f"ZeRO-{r['zero_stage']}" + (f" (engines at stage {r['engine_zero_stage']}: one process, nothing to partition)"
                                         if r["engine_zero_stage"] != r["zero_stage"] else "")
    lines = [f"model: {r['model']}", f"device: {r['device']} x{r['processes']}, {zero}, {r['dtype']}",
             f"advantages: {r['estimator']} ({'with' if r['critic'] else 'no'} critic), {r['samples_per_prompt']} "
             f"sample(s) per prompt",
             f"sizes: batch {r['batch']} prompts, mini-batch {r['mini_batch']}, {r['max_new_tokens']} new tokens, "
             f"{r['ppo_epochs']} PPO epochs, gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'}",
             f"timed: {r['updates']} updates, {r['episodes']} episodes in {r['seconds']:.2f} s",
             f"rollout engine: {r['engine']}",
             f"episodes/s: {r['episodes_per_s']:.2f}    generated tokens/s: {r['generated_tokens_per_s']:.1f} "
             f"(over the whole update; {r['generation_tokens_per_s']:.1f} per second of generation)",
             f"weight sync: {r['weight_sync_s_per_update']:.3f} s per update",
             "seconds per phase: " + ", ".join(f"{k} {v:.2f}" for k, v in r["phase_seconds"].items())]
    if r["peak_memory_mb"] is not None:
        lines.append(f"peak memory: {r['peak_memory_mb']:.0f} MiB ({r['peak_memory_kind']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rlhf bench", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return bench(ap.parse_args(argv))


def bench(a: argparse.Namespace) -> int:
    from rlhf import distributed
    from rlhf.engines import EngineUnavailable
    from rlhf.stage_io import USER_ERRORS

    if a.estimator == "all":
        return bench_estimators(a)
    try:
        r = run(a)
    except (*USER_ERRORS, EngineUnavailable) as e:
        print(f"[bench] error: {e}", file=sys.stderr)
        return 2
    if distributed.is_main():
        print(render(r))
        print(json.dumps(r))
        if a.json:
            Path(a.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


def bench_estimators(a: argparse.Namespace) -> int:
    """--estimator all: every advantage estimator at the same sizes and the same k (>= 2, which the
    group estimators need), each in a fresh process so that each peak memory is its own; one table."""
    import subprocess
    import tempfile

    from rlhf.config import ADVANTAGE_ESTIMATORS
    from rlhf.stage_io import USER_ERRORS

    def refuse(msg: str) -> int:
        print(f"[bench] error: {msg}", file=sys.stderr)
        return 2

    if os.environ.get("WORLD_SIZE", "1") != "1":
        return refuse("--estimator all runs one process per estimator; under the deepspeed launcher give one "
                      "--estimator at a time")
    if any(o.startswith("ppo.advantage_estimator=") for o in a.overrides):
        return refuse("--estimator all sets ppo.advantage_estimator itself; drop that override")
    try:
        k = samples_per_prompt(a)
    except USER_ERRORS as e:
        return refuse(str(e))
    if k < 2:
        return refuse("--estimator all needs --samples-per-prompt >= 2 (rloo, grpo and dr_grpo compare the samples "
                      "of a prompt; every estimator then sees the same responses per update)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as tmp:
        for name in ADVANTAGE_ESTIMATORS:
            out = Path(tmp) / f"{name}.json"
            child = argparse.Namespace(**{**vars(a), "estimator": name, "samples_per_prompt": k, "json": str(out)})
            cmd = [sys.executable, str(Path(__file__).resolve()), *to_argv(child)]
            print(f"[bench] {name}: {' '.join(cmd[2:])}", flush=True)
            if subprocess.run(cmd).returncode != 0:
                return refuse(f"the {name} run failed (its output is above)")
            rows.append(json.loads(out.read_text()))
    print(render_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def to_argv(a: argparse.Namespace) -> list[str]:
    """The command line that parses back to `a` (the flags that differ from their defaults)."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    out: list[str] = []
    for action in p._actions:
        if not action.option_strings or action.dest in ("help", "local_rank"):
            continue
        value = getattr(a, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        out += [flag] if isinstance(action, argparse._StoreTrueAction) else [flag, str(value)]
    return out + list(a.overrides)


def render_table(rows: list[dict]) -> str:
    """One line per estimator: throughput and peak memory side by side."""
    head = f"{'estimator':<13} {'critic':<6} {'episodes/s':>10} {'tokens/s':>9} {'peak MiB':>9}  seconds per phase"
    lines = [head]
    for r in rows:
        mem = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
        ph = ", ".join(f"{k} {v:.2f}" for k, v in r["phase_seconds"].items() if v >= 0.005)
        lines.append(f"{r['estimator']:<13} {'yes' if r['critic'] else 'no':<6} {r['episodes_per_s']:>10.2f} "
                     f"{r['generated_tokens_per_s']:>9.1f} {mem:>9}  {ph}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""One YAML file configures the whole pipeline; `key=value` overrides refine it.

Every section is a frozen dataclass whose fields carry a one-line help text. Loading
is strict: an unknown key is an error naming the key and the closest valid one, and a
value of the wrong type is an error naming the key. Relative paths written in the YAML
file are resolved against the file's directory; relative paths given as command-line
overrides are resolved against the current directory.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says where and how."""


def _f(default: Any, help: str, path: bool | str = False, **kw: Any) -> Any:
    # path=True: a local path (read relative to the config file) or a hub id; path="local": always a local path
    meta = {"help": help, "path": path}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: _copy(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _copy(d: Any) -> Any:
    if dataclasses.is_dataclass(d):
        return dataclasses.replace(d)
    return type(d)(d)


# the values ppo.advantage_estimator and ppo.rollout_engine accept: the names of
# rlhf.ppo.core.ADVANTAGE_ESTIMATORS and of rlhf.engines.build's engines (a test keeps them equal)
ADVANTAGE_ESTIMATORS = ("gae", "rloo", "grpo", "dr_grpo", "reinforce_pp")
# the estimators that compare the samples of one prompt with each other (ppo.samples_per_prompt >= 2)
GROUP_ESTIMATORS = ("rloo", "grpo", "dr_grpo")
# ppo.loss_aggregation=auto: each estimator's own paper's choice (rlhf.ppo.core.policy_loss says what each means)
DEFAULT_AGGREGATION = {"gae": "token_mean", "rloo": "seq_sum", "grpo": "seq_mean", "dr_grpo": "seq_sum",
                       "reinforce_pp": "token_mean"}
LOSS_AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum")
ROLLOUT_ENGINES = ("hf", "vllm")


@dataclass(frozen=True)
class ScratchModelConfig:
    vocab_size: int = _f(1024, "BPE vocabulary size of the tokenizer trained on the SFT data")
    hidden_size: int = _f(128, "model width")
    num_layers: int = _f(2, "number of transformer blocks")
    num_heads: int = _f(4, "attention heads")
    intermediate_size: int = _f(512, "MLP width")
    max_position_embeddings: int = _f(256, "longest sequence the model can see")


@dataclass(frozen=True)
class LoraConfig:
    r: int = _f(8, "LoRA rank")
    alpha: int = _f(16, "LoRA scaling numerator (scale = alpha / r)")
    dropout: float = _f(0.0, "dropout on the LoRA branch")
    target_modules: list | None = _f(None, "module names that get adapters; 'all-linear' for every linear layer; "
                                          "default: peft's choice for the model family (q/v projections, GPT-2's c_attn, ...)")


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str | None = _f(None, "hub id or local directory of a causal LM (safetensors only)")
    scratch: ScratchModelConfig | None = _f(None, "build a small Llama-style model from scratch instead (tokenizer trained on sft.train_data)")
    dtype: str = _f("float32", "parameter dtype: float32, bfloat16 or float16")
    trust_remote_code: bool = _f(False, "allow model code shipped with a hub repository to run")
    use_chat_template: bool = _f(True, "render prompts with the tokenizer's chat template when it has one")
    lora: LoraConfig = _f(LoraConfig(), "LoRA settings shared by all stages")
    quantization: str = _f("none", "none, or 4bit (QLoRA): every stage that trains a LoRA adapter (sft.lora, reward.lora, "
                                   "ppo.lora) loads its frozen base in 4 bits with bitsandbytes, adapters and heads in "
                                   "model.dtype; needs LoRA in each stage that trains. Published models are merged 16-bit")
    quant_type: str = _f("nf4", "4-bit data type: nf4 (NormalFloat, QLoRA's) or fp4")
    quant_double: bool = _f(True, "double quantization: the per-block scales are quantized too (~0.4 bit per weight less)")
    quant_compute_dtype: str | None = _f(None, "dtype the 4-bit layers compute in (float32, bfloat16, float16); "
                                               "unset: model.dtype (bfloat16 costs 10x more on CPUs)")


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: int = _f(2, "ZeRO stage: 0, 1, 2 or 3")
    offload: bool = _f(False, "offload optimizer state (and parameters under ZeRO-3) to CPU memory")
    config_file: str | None = _f(None, "a DeepSpeed JSON to use as the base (values derived from this config still win)", path="local")
    global_batch_sizes: bool = _f(False, "false: sft.batch_size, reward.batch_size, ppo.rollout_batch_size and "
                                         "ppo.mini_batch_size count per process (the global batch grows with the "
                                         "process count); true: they count over all processes, each divided by the "
                                         "process count at the start of a stage, so a config means the same batches "
                                         "and optimizer steps on any number of processes")
    zero3_gather_for_generation: bool = _f(True, "under ZeRO-3, gather the whole policy once per generate() call (fast; "
                                                  "it must fit on one device); false: fetch it layer by layer at every "
                                                  "decode step (slow, for policies too big for one device)")


@dataclass(frozen=True)
class WandbConfig:
    project: str = _f("rlhf", "W&B project")
    entity: str | None = _f(None, "W&B entity (team or user)")
    mode: str | None = _f(None, "online, offline or disabled; default: WANDB_MODE, else online when logged in, else offline")


@dataclass(frozen=True)
class SFTStageConfig:
    train_data: str | None = _f(None, "SFT pairs: {prompt, completion} or {messages}; local file or datasets id", path=True)
    eval_data: str | None = _f(None, "held-out SFT pairs (same format)", path=True)
    import_model: str | None = _f(None, "a policy you already have (hub id or local dir of a causal LM), used as the SFT "
                                        "policy instead of training one: copied into DIR/sft in model.dtype and recorded "
                                        "as imported; the sft.* training keys and model.name_or_path are then not used",
                                  path=True)
    epochs: float = _f(2.0, "passes over the training data")
    learning_rate: float = _f(1e-3, "peak learning rate")
    lr_scheduler: str = _f("cosine", "learning-rate schedule (transformers names)")
    warmup_ratio: float = _f(0.05, "fraction of steps spent warming up")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    batch_size: int = _f(32, "examples per process per micro-step")
    grad_accum: int = _f(1, "micro-steps per optimizer step")
    max_length: int = _f(128, "longest tokenized prompt+completion; longer ones are truncated")
    packing: bool = _f(False, "pack several examples into one sequence of max_length")
    loss_on: str = _f("last", "messages rows: loss on the last assistant turn ('last') or on every assistant turn ('all')")
    max_skipped_fraction: float = _f(0.01, "fail when more than this fraction of rows is unusable (empty response); fewer are skipped and counted")
    lora: bool = _f(False, "train with the model.lora adapter (published merged into the base)")
    gradient_checkpointing: bool = _f(False, "recompute activations to save memory")
    save_steps: int = _f(50, "optimizer steps between resumable checkpoints")
    logging_steps: int = _f(10, "optimizer steps between metric logs")
    max_grad_norm: float = _f(1.0, "gradient clipping")


@dataclass(frozen=True)
class RewardStageConfig:
    train_data: str | None = _f(None, "preferences or rankings; see reward_data/README.md", path=True)
    eval_data: str | None = _f(None, "held-out preferences (same formats)", path=True)
    model: str | None = _f(None, "initial model; default: the SFT artifact", path=True)
    import_model: str | None = _f(None, "a reward model you already have (hub id or local dir of a one-output "
                                        "sequence-classification model, any tokenizer and chat template), used instead "
                                        "of training one: copied into DIR/reward, its reward_stats measured on the SFT "
                                        "policy's samples as PPO draws them (prompts: reward.eval_data, else "
                                        "ppo.train_prompts); reward.train_data is then not read", path=True)
    epochs: float = _f(1.0, "passes over the training pairs")
    learning_rate: float = _f(1e-3, "peak learning rate")
    lr_scheduler: str = _f("cosine", "learning-rate schedule")
    warmup_ratio: float = _f(0.05, "fraction of steps spent warming up")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    batch_size: int = _f(32, "pairs per process per micro-step")
    grad_accum: int = _f(1, "micro-steps per optimizer step")
    max_length: int = _f(128, "longest tokenized prompt+response; pairs are truncated to it and counted")
    pair_weighting: str = _f("per_prompt", "per_prompt: each prompt's pairs share weight 1 (InstructGPT); uniform: every pair weight 1")
    center_rewards_coefficient: float | None = _f(None, "penalty on the squared reward to keep it near 0")
    lora: bool = _f(False, "train with the model.lora adapter (published merged)")
    gradient_checkpointing: bool = _f(False, "recompute activations to save memory")
    save_steps: int = _f(100, "optimizer steps between resumable checkpoints")
    logging_steps: int = _f(10, "optimizer steps between metric logs")
    max_grad_norm: float = _f(1.0, "gradient clipping")
    stats_samples: int = _f(256, "SFT-policy responses scored to measure reward_stats")
    ensemble: int = _f(1, "reward-model ensemble members: K score heads on one shared body, each trained on its own "
                          "bootstrap of the pairs (1 = a single reward model); the artifact loads as one model whose "
                          "score is the members' mean")
    max_skipped_fraction: float = _f(0.01, "fail when more than this fraction of rows is unusable (empty response, "
                                           "chosen == rejected, tie); fewer are skipped and counted")


@dataclass(frozen=True)
class PPOStageConfig:
    train_prompts: str | None = _f(None, "prompts {prompt} for rollouts", path=True)
    eval_prompts: str | None = _f(None, "held-out prompts for samples and evaluation", path=True)
    total_episodes: int = _f(3072, "responses sampled in total (across processes): prompts x samples_per_prompt")
    rollout_batch_size: int = _f(32, "prompts per rollout, per process (each sampled samples_per_prompt times)")
    samples_per_prompt: int = _f(1, "k: responses sampled for each drawn prompt (rloo, grpo and dr_grpo compare the "
                                    "k samples of a prompt with each other and need k >= 2)")
    mini_batch_size: int = _f(16, "responses per optimizer step, per process (must divide rollout_batch_size x "
                                  "samples_per_prompt)")
    grad_accum: int = _f(1, "micro-batches per mini-batch (must divide mini_batch_size)")
    ppo_epochs: int = _f(4, "passes over each rollout batch")
    learning_rate: float = _f(3e-4, "actor learning rate")
    critic_learning_rate: float = _f(1e-3, "critic learning rate")
    max_new_tokens: int = _f(24, "longest sampled response")
    max_prompt_length: int = _f(64, "prompts are left-truncated to this many tokens")
    temperature: float = _f(1.0, "sampling temperature (also used for every log-prob)")
    top_k: int = _f(0, "top-k sampling (0 = off)")
    top_p: float = _f(1.0, "nucleus sampling (1.0 = off)")
    kl_coef: float = _f(0.05, "beta: weight of the per-token KL penalty (initial value when adaptive)")
    target_kl: float | None = _f(None, "set to use the adaptive KL controller (Ziegler et al. 2019) with this target")
    kl_horizon: int = _f(10000, "adaptive controller horizon, in episodes")
    kl_estimator: str = _f("k1", "per-token KL estimator: k1, k2 or k3 (in the loss, kl_penalty=loss: k2 or k3)")
    kl_budget: float = _f(10.0, "KL(PPO || SFT) per response on the held-out prompts the published policy must stay "
                                "within (the guard selects only such updates; with early_stop, exceeding it stops)")
    keep_best: str = _f("auto", "how the published policy is chosen: gold_score, conservative (without gold: the "
                                "ensemble's conservative score, or the RM score, up to the first evaluation whose drift "
                                "signals flag exploitation), rm_score, auto (gold_score with eval.gold_scorer, else "
                                "conservative) or last (the last update)")
    reward_aggregation: str = _f("mean", "with a reward-model ensemble, the score PPO maximises from the members' "
                                         "normalised scores: mean, worst (their minimum) or uncertainty (mean - "
                                         "uncertainty_coef * their standard deviation; Coste et al. 2023)")
    uncertainty_coef: float = _f(1.0, "lambda of reward_aggregation=uncertainty and of the guard's conservative score")
    hold_out_member: bool = _f(True, "with an ensemble of 3 or more, PPO never optimises its last member: the guard "
                                     "watches that member's score as an independent check")
    early_stop: int | None = _f(None, "stop after this many held-out evaluations without improvement of keep_best's "
                                      "metric, or when one exceeds kl_budget (None = run every update)")
    gamma: float = _f(1.0, "discount")
    lam: float = _f(0.95, "GAE lambda")
    cliprange: float = _f(0.2, "policy ratio clip")
    cliprange_value: float = _f(0.2, "value clip")
    vf_coef: float = _f(0.1, "scale of the value loss before the critic's gradient clipping (the critic has its own "
                              "Adam, which a constant loss scale does not change otherwise)")
    whiten_rewards: bool = _f(False, "whiten the shaped rewards before GAE")
    score_clip: float | None = _f(None, "clip normalised scores to [-score_clip, score_clip]")
    missing_eos_penalty: float | None = _f(1.0, "subtracted from the score of a response without EOS (None = off)")
    critic_from_reward: bool = _f(True, "initialise the critic from the reward model (else from the policy)")
    lora: bool = _f(False, "actor = base + adapter; reference = base with adapter disabled")
    critic_lora: bool = _f(True, "with ppo.lora: the critic is also base + adapter; when it starts from the reward "
                                 "model, the reward model is that base with the adapter disabled (one copy of its weights)")
    save_every: int = _f(10, "PPO updates between resumable checkpoints")
    sample_every: int = _f(10, "updates between additions to the W&B run's samples table (8 held-out prompts each)")
    max_grad_norm: float = _f(1.0, "gradient clipping")
    forward_batch_size: int = _f(32, "rows per chunk in inference-only forward passes")
    gradient_checkpointing: bool = _f(False, "recompute the actor's and critic's activations in the update's backward "
                                             "pass (less memory, ~30% more update time)")
    advantage_estimator: str = _f("gae", "how rewards become advantages: gae (generalised advantage estimation "
                                         "over a critic started from the reward model); critic-free: rloo (leave-one-"
                                         "out baseline, Ahmadian et al. 2024), grpo (group mean and std, Shao et al. "
                                         "2024), dr_grpo (group mean, no std, Liu et al. 2025), reinforce_pp (batch-"
                                         "normalised returns, group mean baseline when k >= 2; Hu 2025)")
    loss_aggregation: str = _f("auto", "how the per-token policy loss is averaged: token_mean (over every response "
                                      "token of the micro-batch), seq_mean (each response's token mean, then over "
                                      "responses), seq_sum (each response's token sum / max_new_tokens, then over "
                                      "responses: Dr. GRPO's constant normaliser), or auto: the estimator's paper's "
                                      "(gae token_mean, rloo seq_sum, grpo seq_mean, dr_grpo seq_sum, reinforce_pp "
                                      "token_mean)")
    kl_penalty: str = _f("reward", "where the KL to the SFT policy enters: reward (-kl_coef x KL_t in each token's "
                                   "reward) or loss (kl_coef x KL_t of the current policy added to the policy loss, "
                                   "GRPO's form; use with kl_estimator=k3)")
    rollout_engine: str = _f("hf", "what samples rollouts, evaluations and reward statistics: hf (transformers "
                                   "generate() on the live policy) or vllm (a vLLM engine in each process, synced "
                                   "from the actor after every update; settings in the vllm section)")
    logprobs_from_generation: bool = _f(True, "hf engine: take the old log-probs from the generation pass itself "
                                              "(exact up to float rounding); false: recompute them with one more actor "
                                              "forward. The vllm engine always recomputes them (see vllm.importance_cap)")


@dataclass(frozen=True)
class VLLMConfig:
    dtype: str | None = _f(None, "vLLM's weight dtype: float32, bfloat16 or float16; default: model.dtype")
    gpu_memory_utilization: float = _f(0.3, "GPU: the share of the device's memory vLLM may take (its weights and "
                                            "KV cache); the rest stays with training")
    kv_cache_gb: float | None = _f(None, "KV-cache size in GiB (overrides gpu_memory_utilization); default: 1 on "
                                         "CPU, set by gpu_memory_utilization on GPU")
    max_model_len: int | None = _f(None, "longest prompt + response vLLM serves; default: the model's maximum positions")
    enforce_eager: bool = _f(True, "run vLLM's model eagerly (no CUDA graphs / torch.compile): faster start-up; "
                                   "false: capture CUDA graphs on GPU (faster decoding after ~1 min of start-up)")
    sleep_mode: bool = _f(False, "GPU: free vLLM's KV cache and offload its weights between rollouts, so training "
                                 "gets the memory back (vLLM's sleep mode; costs a wake-up per rollout)")
    old_logprobs: str = _f("actor", "where PPO's pi_old comes from: actor (one actor forward over the rollout; vLLM's "
                                    "own log-probs are compared with it, rollout/logprob_diff_*) or engine (vLLM's "
                                    "log-probs of its samples: no extra forward; any mismatch then shows as "
                                    "policy/first_ratio_dev)")
    importance_cap: float | None = _f(None, "truncated importance sampling: weight each token's policy loss by "
                                            "min(pi_old / pi_vllm, cap), correcting for vLLM sampling from a slightly "
                                            "different distribution than the actor's (bf16 kernels); None = off. "
                                            "The mismatch is logged either way (rollout/logprob_diff_*)")


@dataclass(frozen=True)
class EvalConfig:
    gold_scorer: str | None = _f(None, "path/to/file.py:function mapping (prompt, response) -> float; evaluation only", path="local")
    max_new_tokens: int | None = _f(None, "longest response in the final evaluation; default: ppo.max_new_tokens")
    num_prompts: int = _f(128, "held-out prompts used for samples and evaluation")
    every: int | None = _f(None, "PPO updates between held-out evaluations (also at update 0 and the last); "
                                 "default: an eighth of the run")
    best_of_n: list = _f([1, 2, 4, 8, 16], "n of the best-of-n baseline (SFT samples, the reward model's favourite "
                                           "kept); [] = off")
    best_of_n_prompts: int | None = _f(None, "held-out prompts the best-of-n baseline samples on (the first ones); "
                                             "default: all of the evaluation's (eval.num_prompts), so best-of-1 and "
                                             "the eval curve's SFT point are the same policy on the same prompts")


@dataclass(frozen=True)
class PipelineConfig:
    artifact_dir: str = _f("artifacts", "shared artifact directory (on a filesystem every node sees)", path="local")
    run_name: str = _f("rlhf", "groups the W&B runs of one pipeline")
    seed: int = _f(0, "random seed")
    force: bool = _f(False, "rerun a stage even when its artifact is complete")
    model: ModelConfig = _f(ModelConfig(), "policy model")
    deepspeed: DeepSpeedConfig = _f(DeepSpeedConfig(), "DeepSpeed ZeRO settings")
    wandb: WandbConfig = _f(WandbConfig(), "Weights & Biases")
    sft: SFTStageConfig = _f(SFTStageConfig(), "stage 1: supervised fine-tuning")
    reward: RewardStageConfig = _f(RewardStageConfig(), "stage 2: reward model")
    ppo: PPOStageConfig = _f(PPOStageConfig(), "stage 3: PPO")
    vllm: VLLMConfig = _f(VLLMConfig(), "the vLLM rollout engine (ppo.rollout_engine=vllm)")
    eval: EvalConfig = _f(EvalConfig(), "evaluation")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading

def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> PipelineConfig:
    """Read `path` (YAML) and apply dotted `key=value` overrides; validate everything."""
    raw: dict = {}
    base_dir = Path.cwd()
    if path is not None:
        p = Path(path)
        raw = _read_yaml(p)
        base_dir = p.resolve().parent
    raw = _resolve_paths(PipelineConfig, raw, base_dir, "")
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {ov!r} is not of the form key=value (e.g. ppo.kl_coef=0.1)")
        _set_dotted(raw, key.strip(), _override_value(ov, value), Path.cwd())
    return _build(PipelineConfig, raw, "")


def _read_yaml(p: Path) -> dict:
    """The mapping in the YAML file `p`, or ConfigError naming the file (and line) and the fix."""
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; give the pipeline YAML file (e.g. launch/configs/demo.yaml)")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read ({e.strerror or e})") from None
    text = decode_utf8(data, f"config file {p}", ConfigError)
    try:
        _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), p)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (artifact_dir: ..., model: ..., sft: ...), "
                          f"got a {type(raw).__name__}")
    return raw


def _refuse_duplicate_keys(node: Any, p: Path, prefix: str = "") -> None:
    """ConfigError for a key given twice in one mapping (YAML itself keeps the last one silently: a
    second `sft:` section would reset every key of the first to its default), naming the dotted key
    and both lines."""
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, p, prefix)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value)
        line = key_node.start_mark.line + 1
        if key in seen and key != "<<":
            what = "section" if isinstance(value_node, yaml.MappingNode) else "key"
            raise ConfigError(f"{p}: {what} {prefix}{key} is given twice (lines {seen[key]} and {line}); YAML would keep "
                              f"only the second one{' (the keys of the first would fall back to their defaults)' if what == 'section' else ''}. "
                              "Merge them into one")
        seen[key] = line
        _refuse_duplicate_keys(value_node, p, f"{prefix}{key}.")


def _override_value(override: str, value: str) -> Any:
    if value == "":
        return None
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({problem}); "
                          "fix its brackets, or quote it to pass it as text") from None


def decode_utf8(data: bytes, where: str, error: type[Exception] = ValueError) -> str:
    """`data` decoded as UTF-8 (a leading byte-order mark dropped), or `error` naming `where`,
    the line and the column of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise error(f"{where}, line {line}, column {column}: not valid UTF-8 (byte 0x{data[e.start]:02x}); "
                    "save the file with UTF-8 encoding") from None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_of(tp: Any) -> type | None:
    for t in (tp, *typing.get_args(tp)):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{where}{close[0]}'?" if close else f"; valid keys here: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key '{where}{key}'{hint}")


def _set_dotted(raw: dict, key: str, value: Any, base_dir: Path) -> None:
    cls: type = PipelineConfig
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        where = ".".join(parts[:i]) + ("." if i else "")
        if part not in fields:
            raise _unknown(part, list(fields), where)
        f = fields[part]
        if i == len(parts) - 1:
            if f.metadata.get("path") and isinstance(value, str):
                value = _abs(value, base_dir, always=f.metadata["path"] == "local")
            node[part] = value
            return
        sub = _dataclass_of(_hints(cls)[part])
        if sub is None:
            raise ConfigError(f"config key {'.'.join(parts[: i + 1])!r} is a value, not a section")
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node, cls = nxt, sub


def _abs(value: str, base_dir: Path, always: bool = False) -> str:
    # `path/to/file.py:function` keeps its suffix; a hub id ("org/name", no such local path) stays as given;
    # `always`: a key that is never a hub id (artifact_dir, deepspeed.config_file, eval.gold_scorer) is
    # resolved against base_dir whether or not the path exists yet, so a config means one place wherever it is run
    head, colon, tail = value.rpartition(":") if ".py:" in value else (value, "", "")
    p = Path(head).expanduser()
    if p.is_absolute():
        return str(p) + colon + tail
    if always or (base_dir / p).exists() or head.startswith(".") or _looks_local(head):
        return str((base_dir / p).resolve()) + colon + tail
    return value


def _looks_local(s: str) -> bool:
    # a hub id is "name" or "org/name"; anything with a file suffix or deeper path is local
    return Path(s).suffix in {".jsonl", ".json", ".parquet", ".csv", ".py", ".yaml", ".yml"} or s.count("/") > 1


def _resolve_paths(cls: type, raw: dict, base_dir: Path, where: str) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {where.rstrip('.') or 'top level'!r} must be a mapping")
    out = dict(raw)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in raw.items():
        if k not in fields:
            raise _unknown(k, list(fields), where)
        sub = _dataclass_of(_hints(cls)[k])
        if sub is not None and isinstance(v, dict):
            out[k] = _resolve_paths(sub, v, base_dir, f"{where}{k}.")
        elif fields[k].metadata.get("path") and isinstance(v, str):
            out[k] = _abs(v, base_dir, always=fields[k].metadata["path"] == "local")
    return out


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key {key!r}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return value
        raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"config section {key!r} must be a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    return value


def _build(cls: type, raw: dict, where: str) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in raw.items():
        if k not in fields:
            raise _unknown(k, list(fields), where)
        kwargs[k] = _coerce(hints[k], v, where + k)
    cfg = cls(**kwargs)
    _validate(cfg, where)
    return cfg


def _validate(cfg: Any, where: str) -> None:
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"config key '{where}{key}': {why}")

    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise bad(f.name, f"must be a finite number, got {v}")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and f.name in _POSITIVE and v <= 0:
            raise bad(f.name, f"must be > 0, got {v}")
    if isinstance(cfg, DeepSpeedConfig) and cfg.zero_stage not in (0, 1, 2, 3):
        raise bad("zero_stage", f"must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if isinstance(cfg, ModelConfig) and cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise bad("dtype", f"must be float32, bfloat16 or float16, got {cfg.dtype!r}")
    if isinstance(cfg, ModelConfig):
        if cfg.quantization not in QUANTIZATIONS:
            hint = " (8-bit training is not offered: use 4bit)" if cfg.quantization in ("8bit", "int8") else ""
            raise bad("quantization", f"must be {' or '.join(QUANTIZATIONS)}, got {cfg.quantization!r}{hint}")
        if cfg.quant_type not in ("nf4", "fp4"):
            raise bad("quant_type", f"must be nf4 or fp4, got {cfg.quant_type!r}")
        if cfg.quant_compute_dtype not in (None, "float32", "bfloat16", "float16"):
            raise bad("quant_compute_dtype", f"must be float32, bfloat16 or float16 (or unset: model.dtype), "
                                             f"got {cfg.quant_compute_dtype!r}")
    if isinstance(cfg, WandbConfig) and cfg.mode not in (None, "online", "offline", "disabled"):
        raise bad("mode", f"must be online, offline or disabled, got {cfg.mode!r}")
    if isinstance(cfg, SFTStageConfig) and cfg.loss_on not in ("last", "all"):
        raise bad("loss_on", f"must be last or all, got {cfg.loss_on!r}")
    if isinstance(cfg, SFTStageConfig) and cfg.max_length < 2:
        raise bad("max_length", f"must be >= 2 (a prompt token and a response token to learn), got {cfg.max_length}")
    if isinstance(cfg, (SFTStageConfig, RewardStageConfig)) and cfg.lr_scheduler not in LR_SCHEDULERS:
        raise bad("lr_scheduler", f"must be one of {', '.join(LR_SCHEDULERS)} (the transformers schedules that need no "
                                  f"further arguments), got {cfg.lr_scheduler!r}")
    if isinstance(cfg, (SFTStageConfig, RewardStageConfig)) and not 0 <= cfg.warmup_ratio <= 1:
        raise bad("warmup_ratio", f"must be in [0, 1] (a fraction of the training steps), got {cfg.warmup_ratio}")
    if isinstance(cfg, LoraConfig):
        if cfg.r <= 0 or cfg.alpha <= 0:
            raise bad("r" if cfg.r <= 0 else "alpha", f"must be > 0, got {cfg.r if cfg.r <= 0 else cfg.alpha}")
        if not 0 <= cfg.dropout < 1:
            raise bad("dropout", f"must be in [0, 1), got {cfg.dropout}")
    if isinstance(cfg, (SFTStageConfig, RewardStageConfig)) and not 0 <= cfg.max_skipped_fraction <= 1:
        raise bad("max_skipped_fraction", f"must be in [0, 1], got {cfg.max_skipped_fraction}")
    if isinstance(cfg, RewardStageConfig) and not 1 <= cfg.ensemble <= 16:
        raise bad("ensemble", f"must be 1 (a single reward model) to 16 members, got {cfg.ensemble}")
    if isinstance(cfg, RewardStageConfig) and cfg.pair_weighting not in ("per_prompt", "uniform"):
        raise bad("pair_weighting", f"must be per_prompt or uniform, got {cfg.pair_weighting!r}")
    if isinstance(cfg, PPOStageConfig):
        if cfg.kl_estimator not in ("k1", "k2", "k3"):
            raise bad("kl_estimator", f"must be k1, k2 or k3, got {cfg.kl_estimator!r}")
        if cfg.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise bad("advantage_estimator", f"must be one of {', '.join(ADVANTAGE_ESTIMATORS)}, "
                                             f"got {cfg.advantage_estimator!r}")
        if cfg.rollout_engine not in ROLLOUT_ENGINES:
            raise bad("rollout_engine", f"must be one of {', '.join(ROLLOUT_ENGINES)}, got {cfg.rollout_engine!r}")
        if cfg.samples_per_prompt < 1:
            raise bad("samples_per_prompt", f"must be >= 1, got {cfg.samples_per_prompt}")
        if cfg.advantage_estimator in GROUP_ESTIMATORS and cfg.samples_per_prompt < 2:
            raise bad("samples_per_prompt", f"must be >= 2 with advantage_estimator={cfg.advantage_estimator} (it "
                                            f"compares the samples of one prompt), got {cfg.samples_per_prompt}")
        if cfg.loss_aggregation not in ("auto",) + LOSS_AGGREGATIONS:
            raise bad("loss_aggregation", f"must be auto, {', '.join(LOSS_AGGREGATIONS)}, got {cfg.loss_aggregation!r}")
        if cfg.kl_penalty not in ("reward", "loss"):
            raise bad("kl_penalty", f"must be reward or loss, got {cfg.kl_penalty!r}")
        if cfg.kl_penalty == "loss" and cfg.kl_estimator == "k1":
            raise bad("kl_estimator", "k1 as a loss term has a gradient of mean zero on the policy's own samples (it "
                                      "would not pull towards the SFT policy); with kl_penalty=loss use k3 (GRPO's) "
                                      "or k2")
        if cfg.whiten_rewards and cfg.advantage_estimator != "gae":
            raise bad("whiten_rewards", f"applies to gae only (advantage_estimator={cfg.advantage_estimator} "
                                        f"normalises its own advantages); set it to false")
        samples = cfg.rollout_batch_size * cfg.samples_per_prompt
        if samples % cfg.mini_batch_size:
            raise bad("mini_batch_size", f"{cfg.mini_batch_size} must divide the responses per rollout, "
                                         f"rollout_batch_size={cfg.rollout_batch_size} x samples_per_prompt="
                                         f"{cfg.samples_per_prompt} = {samples}")
        if cfg.mini_batch_size % cfg.grad_accum:
            raise bad("grad_accum", f"{cfg.grad_accum} must divide mini_batch_size={cfg.mini_batch_size}")
        if cfg.temperature <= 0:
            raise bad("temperature", "must be > 0")
        if cfg.target_kl is not None and cfg.target_kl <= 0:
            raise bad("target_kl", "must be > 0 (or unset for a fixed coefficient)")
        if not 0 < cfg.top_p <= 1:
            raise bad("top_p", f"must be in (0, 1], got {cfg.top_p}")
        if cfg.top_k < 0:
            raise bad("top_k", f"must be >= 0 (0 = off), got {cfg.top_k}")
        for key in ("gamma", "lam"):
            if not 0 <= getattr(cfg, key) <= 1:
                raise bad(key, f"must be in [0, 1], got {getattr(cfg, key)}")
        for key in ("cliprange", "cliprange_value"):
            if getattr(cfg, key) <= 0:
                raise bad(key, f"must be > 0, got {getattr(cfg, key)}")
        if cfg.kl_coef < 0:
            raise bad("kl_coef", f"must be >= 0, got {cfg.kl_coef}")
        if cfg.keep_best not in KEEP_BEST:
            raise bad("keep_best", f"must be one of {', '.join(KEEP_BEST)}, got {cfg.keep_best!r}")
        if cfg.reward_aggregation not in REWARD_AGGREGATIONS:
            raise bad("reward_aggregation", f"must be one of {', '.join(REWARD_AGGREGATIONS)}, got {cfg.reward_aggregation!r}")
        if cfg.uncertainty_coef < 0:
            raise bad("uncertainty_coef", f"must be >= 0, got {cfg.uncertainty_coef}")
        if cfg.early_stop is not None and cfg.early_stop < 1:
            raise bad("early_stop", f"must be >= 1 evaluations (or unset), got {cfg.early_stop}")
    if isinstance(cfg, VLLMConfig):
        if cfg.dtype not in (None, "float32", "bfloat16", "float16"):
            raise bad("dtype", f"must be float32, bfloat16 or float16 (or unset: model.dtype), got {cfg.dtype!r}")
        if not 0 < cfg.gpu_memory_utilization <= 1:
            raise bad("gpu_memory_utilization", f"must be in (0, 1], got {cfg.gpu_memory_utilization}")
        for key in ("kv_cache_gb", "max_model_len"):
            if getattr(cfg, key) is not None and getattr(cfg, key) <= 0:
                raise bad(key, f"must be > 0 (or unset), got {getattr(cfg, key)}")
        if cfg.importance_cap is not None and cfg.importance_cap < 1:
            raise bad("importance_cap", f"must be >= 1 (or unset: off), got {cfg.importance_cap}")
        if cfg.old_logprobs not in ("actor", "engine"):
            raise bad("old_logprobs", f"must be actor or engine, got {cfg.old_logprobs!r}")
        if cfg.old_logprobs == "engine" and cfg.importance_cap is not None:
            raise bad("importance_cap", "weights pi_old / pi_vllm, so it needs vllm.old_logprobs=actor (with engine "
                                        "they are the same log-probs); unset one of the two")
    if isinstance(cfg, EvalConfig):
        if cfg.every is not None and cfg.every < 1:
            raise bad("every", f"must be >= 1 updates (or unset), got {cfg.every}")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in cfg.best_of_n):
            raise bad("best_of_n", f"must be a list of integers >= 1, got {cfg.best_of_n!r}")
    if isinstance(cfg, ScratchModelConfig) and cfg.hidden_size % cfg.num_heads:
        raise bad("num_heads", f"{cfg.num_heads} must divide hidden_size={cfg.hidden_size}")


QUANTIZATIONS = ("none", "4bit")
KEEP_BEST = ("auto", "gold_score", "conservative", "rm_score", "last")
REWARD_AGGREGATIONS = ("mean", "worst", "uncertainty")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
_POSITIVE = {"epochs", "learning_rate", "critic_learning_rate", "batch_size", "grad_accum", "max_length",
             "total_episodes", "rollout_batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens",
             "vocab_size", "hidden_size", "num_layers", "num_heads", "save_steps", "save_every",
             "logging_steps", "forward_batch_size", "num_prompts", "max_prompt_length", "stats_samples",
             "best_of_n_prompts"}


def loss_aggregation(cfg: PPOStageConfig) -> str:
    """ppo.loss_aggregation with auto resolved to the estimator's own paper's choice."""
    if cfg.loss_aggregation != "auto":
        return cfg.loss_aggregation
    return DEFAULT_AGGREGATION.get(cfg.advantage_estimator, "token_mean")


def require(value: Any, key: str, what: str) -> Any:
    """The value of a config key a stage needs, or an error saying how to set it."""
    if value is None:
        raise ConfigError(f"config key {key!r} is not set: {what} (set it in the YAML or as {key}=...)")
    return value


def load_function(spec: str, key: str) -> Any:
    """The function named by a config value `path/to/file.py:function` (the file is run as a
    module), or ConfigError naming `key`, the file and what is wrong."""
    import importlib.util
    import inspect

    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name:
        raise ConfigError(f"{key} must be path/to/file.py:function, got {spec!r}")
    if not Path(path).is_file():
        raise ConfigError(f"{key}: file {path} does not exist (from {key}={spec})")
    module_spec = importlib.util.spec_from_file_location(f"_rlhf_user_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - user code can fail any way; report it against the key
        raise ConfigError(f"{key}: importing {path} failed: {type(e).__name__}: {e}; "
                          f"fix the file or point {key} elsewhere") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise ConfigError(f"{key}: {path} has no function {name!r}" + (f" (it defines {', '.join(found)})" if found else ""))
    try:
        inspect.signature(fn).bind("prompt", "response")
    except TypeError:
        raise ConfigError(f"{key}: {path}:{name} must take two arguments (prompt, response)") from None
    except ValueError:  # no signature to inspect (a builtin): trust it
        pass
    return fn


def read_deepspeed_json(path: str, key: str = "deepspeed.config_file") -> dict:
    """The DeepSpeed JSON object in the file named by `key`, or ConfigError naming both."""
    import json

    p = Path(path)
    if p.is_dir() or not p.exists():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise ConfigError(f"{key}={path} {what}; give a DeepSpeed JSON file (presets: launch/ds/zero2.json, "
                          "zero3.json, zero3_offload.json) or unset it")
    try:
        text = decode_utf8(p.read_bytes(), f"{key}={path}", ConfigError)
    except OSError as e:
        raise ConfigError(f"{key}={path} cannot be read ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key}={path}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}={path}: must hold a JSON object ({{\"zero_optimization\": {{...}}}}), "
                          f"got a {type(data).__name__}")
    if not isinstance(data.get("zero_optimization", {}), dict):
        raise ConfigError(f"{key}={path}: \"zero_optimization\" must be a JSON object")
    return data


def describe(cls: type = PipelineConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every key: the README's config reference is made from this."""
    rows = []
    for f in dataclasses.fields(cls):
        sub = _dataclass_of(_hints(cls)[f.name])
        if sub is not None:
            rows.extend(describe(sub, f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
    return rows


def path_keys(cls: type = PipelineConfig, prefix: str = "") -> list[str]:
    """Every dotted key whose value is a local path read relative to the config file (path=True)."""
    keys = []
    for f in dataclasses.fields(cls):
        sub = _dataclass_of(_hints(cls)[f.name])
        if sub is not None:
            keys.extend(path_keys(sub, f"{prefix}{f.name}."))
        elif f.metadata.get("path"):
            keys.append(prefix + f.name)
    return keys


# the batch sizes deepspeed.global_batch_sizes=true makes global: (section, key)
GLOBAL_BATCH_KEYS = (("sft", "batch_size"), ("reward", "batch_size"), ("ppo", "rollout_batch_size"),
                     ("ppo", "mini_batch_size"))


def per_process(cfg: PipelineConfig, processes: int) -> PipelineConfig:
    """`cfg` with the batch sizes each process uses: as given (deepspeed.global_batch_sizes false), or
    the global ones divided by `processes`; ConfigError when one does not divide, or when a
    divided size breaks grad_accum's divisibility."""
    if not cfg.deepspeed.global_batch_sizes or processes == 1:
        return cfg
    sections = {}
    for section, key in GLOBAL_BATCH_KEYS:
        value = getattr(getattr(cfg, section), key)
        if value % processes:
            raise ConfigError(f"{section}.{key}={value} counts over all processes (deepspeed.global_batch_sizes: true) "
                              f"and must divide by the {processes} processes of this run: make it a multiple of "
                              f"{processes}, or run on a number of processes that divides it")
        sections.setdefault(section, {})[key] = value // processes
    out = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **vals)
                                      for name, vals in sections.items()})
    if out.ppo.mini_batch_size % out.ppo.grad_accum:
        raise ConfigError(f"ppo.grad_accum={out.ppo.grad_accum} must divide the per-process mini-batch, "
                          f"ppo.mini_batch_size={cfg.ppo.mini_batch_size} / {processes} processes = "
                          f"{out.ppo.mini_batch_size}")
    return out

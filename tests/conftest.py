"""Shared helpers: run a stage the way a user does (a subprocess), read artifacts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "launch" / "configs" / "demo.yaml"
# RLHF_PYTHON: launch/*.sh run this interpreter, as an unactivated environment's user has them do
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
       "RLHF_PYTHON": sys.executable}
# the `deepspeed` script as this interpreter runs it (what launch/_stage.sh runs): no `deepspeed` on PATH needed
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]
# PPO with a critic (gae) at one sample per prompt and 32 prompts per rollout, for the tests of what
# the critic takes part in (the demo itself runs the critic-free rloo with 4 samples of 16 prompts)
GAE_DEMO = ["ppo.advantage_estimator=gae", "ppo.samples_per_prompt=1", "ppo.rollout_batch_size=32",
            "ppo.mini_batch_size=16", "ppo.learning_rate=3e-4"]


# the multi-process tests count their batch sizes per process (their step and update counts say so);
# the demo config itself counts them over all processes (deepspeed.global_batch_sizes: true)
PER_PROCESS = ["deepspeed.global_batch_sizes=false"]


def run_stage(script: str, *overrides: str, timeout: int = 900, deepspeed_procs: int | None = None,
              port: int = 29611) -> subprocess.CompletedProcess:
    """`python launch/<script> --config demo.yaml ...`, or under `deepspeed --num_gpus N`."""
    if deepspeed_procs:
        cmd = [*DEEPSPEED, "--num_gpus", str(deepspeed_procs), "--master_port", str(port)]
    else:
        cmd = [sys.executable]
    cmd += [str(ROOT / "launch" / script), "--config", str(DEMO), *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def manifest(d: Path, stage: str) -> dict:
    return json.loads((d / stage / "rlhf_artifact.json").read_text())


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The demo pipeline, one process, stage by stage (shared by the stage tests)."""
    d = tmp_path_factory.mktemp("demo")
    for script in ("sft.py", "rm.py", "ppo.py"):
        ok(run_stage(script, f"artifact_dir={d}"))
    return d


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-init checkpoints of gpt2, pythia, qwen2, llama3 and opt (tests/families.py), built once."""
    from families import FAMILIES, build_family

    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, root / name) for name in FAMILIES}


# ---------------------------------------------------------------- family pipelines (tests/families.py)

def _head(src, dst, n: int) -> str:
    lines = (ROOT / "reward_data" / "demo" / src).read_text().splitlines()[:n]
    dst.write_text("\n".join(lines) + "\n")
    return str(dst)


def small_overrides(tmp_path, model_dir, estimator: str = "gae") -> list[str]:
    """The demo config with a family checkpoint and a few dozen rows of each data file; PPO with
    `estimator`: gae (one sample per prompt, 8 prompts per rollout), or a critic-free one with 2
    samples of 4 prompts (the same 8 responses per rollout, so the same number of updates)."""
    sizes = (["ppo.advantage_estimator=gae", "ppo.samples_per_prompt=1", "ppo.rollout_batch_size=8"] if estimator == "gae"
             else [f"ppo.advantage_estimator={estimator}", "ppo.samples_per_prompt=2", "ppo.rollout_batch_size=4"])
    return sizes + [
        "model.scratch=null", f"model.name_or_path={model_dir}", "model.lora.r=4", "model.lora.alpha=8",
        f"sft.train_data={_head('sft_train.jsonl', tmp_path / 'sft.jsonl', 64)}",
        f"sft.eval_data={_head('sft_eval.jsonl', tmp_path / 'sft_eval.jsonl', 16)}",
        "sft.epochs=1", "sft.batch_size=16", "sft.learning_rate=1e-3",
        f"reward.train_data={_head('prefs_train.jsonl', tmp_path / 'prefs.jsonl', 32)}",
        f"reward.eval_data={_head('prefs_eval.jsonl', tmp_path / 'prefs_eval.jsonl', 8)}",
        "reward.epochs=1", "reward.batch_size=16", "reward.stats_samples=8", "reward.max_length=128",
        f"ppo.train_prompts={_head('prompts_train.jsonl', tmp_path / 'prompts.jsonl', 32)}",
        f"ppo.eval_prompts={_head('prompts_eval.jsonl', tmp_path / 'prompts_eval.jsonl', 8)}",
        "ppo.total_episodes=16", "ppo.mini_batch_size=4", "ppo.ppo_epochs=2",
        "ppo.max_new_tokens=8", "ppo.max_prompt_length=96", "ppo.learning_rate=1e-2", "ppo.forward_batch_size=8",
        "sft.max_length=128", "eval.num_prompts=8", "eval.max_new_tokens=5",
        "ppo.keep_best=last",  # random-init models: publish the trained policy, not the guard's pick
        *PER_PROCESS,
    ]


def zero3_all_partitioned(tmp_path) -> list[str]:
    """Overrides for ZeRO-3 with persistence threshold 0: even tiny parameters are partitioned over the
    ranks (with the default, DeepSpeed keeps small ones whole on every rank and ZeRO-3 would go untested)."""
    ds_json = tmp_path / "zero3_all_partitioned.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    return ["deepspeed.zero_stage=3", f"deepspeed.config_file={ds_json}"]


def run_pipeline(d, overrides: list[str], port: int, procs: int = 1, config: Path = DEMO,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """`rlhf pipeline CONFIG ...` (each stage under the deepspeed launcher, NUM_GPUS processes;
    `env`: more environment variables)."""
    cmd = [sys.executable, "-m", "rlhf.cli", "pipeline", str(config), f"artifact_dir={d}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, "MASTER_PORT": str(port), "NUM_GPUS": str(procs), **(env or {})},
                          capture_output=True, text=True, timeout=1200)


def _tensors(path) -> dict:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def check_published(d) -> None:
    """Each stage directory is a plain checkpoint with the SFT tokenizer's vocabulary and pad id."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d / "sft"))
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    estimator = json.loads((d / "ppo" / "rlhf_artifact.json").read_text())["config"]["ppo"]["advantage_estimator"]
    with_critic = estimator == "gae"
    assert (d / "ppo" / "critic").exists() == with_critic, "a critic is published exactly when the estimator has one"
    for stage, cls in (("sft", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification),
                       ("ppo", AutoModelForCausalLM), *((("ppo/critic", AutoModelForSequenceClassification),)
                                                        if with_critic else ())):
        keys = list(_tensors(d / stage))
        assert not [k for k in keys if "lora" in k or "modules_to_save" in k or "base_model.model" in k], (stage, keys[:4])
        model = cls.from_pretrained(str(d / stage), use_safetensors=True)
        assert model.get_input_embeddings().weight.shape[0] == len(tok), stage
        assert model.config.pad_token_id == tok.pad_token_id, stage
        if cls is AutoModelForSequenceClassification:
            assert model.config.num_labels == 1
    sft, ppo = _tensors(d / "sft"), _tensors(d / "ppo")
    assert sft.keys() == ppo.keys()
    assert any(not torch.equal(sft[k], ppo[k]) for k in sft), "PPO did not change the policy"


def junk_word_preferences(src: str, dst, rows: int, word: str) -> str:
    """The first `rows` demo preference rows of `src`, each with one more response ranked first: its
    best response with every other word replaced by `word`. Data for a reward model that pays for a
    junk word, the more the better, which the gold scorer charges for (off topic but for one topic)."""
    import re

    with dst.open("w") as out:
        for line in (ROOT / "reward_data" / "demo" / src).read_text().splitlines()[:rows]:
            row = json.loads(line)
            words = iter(range(1000))
            junk = re.sub(r"[a-z]+", lambda m: word if next(words) % 2 else m.group(0), row["responses"][0])
            if junk != row["responses"][0]:
                out.write(json.dumps({"prompt": row["prompt"], "responses": [junk, *row["responses"]]}) + "\n")
    return str(dst)


def length_preferences(src: str, dst, rows: int) -> str:
    """The first `rows` demo preference rows of `src` re-ranked by word count, longest first: data
    for a reward model that pays for length whatever the gold scorer says."""
    import re

    with dst.open("w") as out:
        for line in (ROOT / "reward_data" / "demo" / src).read_text().splitlines()[:rows]:
            row = json.loads(line)
            by_length: dict[int, str] = {}
            for r in row["responses"]:
                by_length.setdefault(len(re.findall(r"[a-z]+", r)), r)
            if len(by_length) > 1:
                out.write(json.dumps({"prompt": row["prompt"],
                                      "responses": [by_length[k] for k in sorted(by_length, reverse=True)]}) + "\n")
    return str(dst)

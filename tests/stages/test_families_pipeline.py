"""SFT -> RM -> PPO on tiny random-init checkpoints of real model families, as a user runs them:
`model.name_or_path` pointing at a local directory (the code path of a hub id), full fine-tuning
or LoRA in every stage, ZeRO-2 or ZeRO-3, each stage its own process.

Each published stage must load with plain AutoModelFor... (no adapter keys, the tokenizer's
vocabulary and pad id), and PPO must change the policy. The default run takes a sample of the
matrix that covers every family, LoRA and full, ZeRO-2 and ZeRO-3 (including LoRA in all three
stages under ZeRO-3 on GPT-2 and Llama-3); RLHF_FULL_MATRIX=1 runs all 5 x 2 x 2 combinations.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import DEMO, ENV, ROOT, manifest, ok
from families import FAMILIES

pytestmark = pytest.mark.slow

SAMPLED = [("gpt2", True, 3), ("llama3", True, 3), ("qwen2", False, 2), ("pythia", False, 3), ("opt", True, 2)]
FULL = list(itertools.product(FAMILIES, (False, True), (2, 3)))
MATRIX = FULL if os.environ.get("RLHF_FULL_MATRIX") == "1" else SAMPLED


def _head(src, dst, n: int) -> str:
    lines = (ROOT / "reward_data" / "demo" / src).read_text().splitlines()[:n]
    dst.write_text("\n".join(lines) + "\n")
    return str(dst)


def small_overrides(tmp_path, model_dir) -> list[str]:
    """The demo config with a family checkpoint and a few dozen rows of each data file."""
    return [
        "model.scratch=null", f"model.name_or_path={model_dir}", "model.lora.r=4", "model.lora.alpha=8",
        f"sft.train_data={_head('sft_train.jsonl', tmp_path / 'sft.jsonl', 64)}",
        f"sft.eval_data={_head('sft_eval.jsonl', tmp_path / 'sft_eval.jsonl', 16)}",
        "sft.epochs=1", "sft.batch_size=16", "sft.learning_rate=1e-3",
        f"reward.train_data={_head('prefs_train.jsonl', tmp_path / 'prefs.jsonl', 32)}",
        f"reward.eval_data={_head('prefs_eval.jsonl', tmp_path / 'prefs_eval.jsonl', 8)}",
        "reward.epochs=1", "reward.batch_size=16", "reward.stats_samples=8", "reward.max_length=128",
        f"ppo.train_prompts={_head('prompts_train.jsonl', tmp_path / 'prompts.jsonl', 32)}",
        f"ppo.eval_prompts={_head('prompts_eval.jsonl', tmp_path / 'prompts_eval.jsonl', 8)}",
        "ppo.total_episodes=16", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.ppo_epochs=2",
        "ppo.max_new_tokens=8", "ppo.max_prompt_length=96", "ppo.learning_rate=1e-2", "ppo.forward_batch_size=8",
        "sft.max_length=128", "eval.num_prompts=8",
    ]


def run_pipeline(d, overrides: list[str], port: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rlhf.cli", "pipeline", str(DEMO), f"artifact_dir={d}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, "MASTER_PORT": str(port)}, capture_output=True, text=True,
                          timeout=1200)


def _tensors(path) -> dict:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def check_published(d) -> None:
    """Each stage directory is a plain checkpoint with the SFT tokenizer's vocabulary and pad id."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d / "sft"))
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    for stage, cls in (("sft", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification),
                       ("ppo", AutoModelForCausalLM), ("ppo/critic", AutoModelForSequenceClassification)):
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


@pytest.mark.parametrize("family,lora,zero", MATRIX, ids=[f"{f}-{'lora' if lo else 'full'}-z{z}" for f, lo, z in MATRIX])
def test_family_pipeline(family_checkpoints, tmp_path, family, lora, zero):
    d = tmp_path / "run"
    flags = [f"sft.lora={str(lora).lower()}", f"reward.lora={str(lora).lower()}", f"ppo.lora={str(lora).lower()}",
             f"deepspeed.zero_stage={zero}"]
    port = 29700 + 7 * FULL.index((family, lora, zero))
    proc = run_pipeline(d, small_overrides(tmp_path, family_checkpoints[family]) + flags, port)
    ok(proc)
    check_published(d)
    for stage in ("sft", "reward", "ppo"):
        m = manifest(d, stage)
        assert m["config"]["model"]["name_or_path"] == str(family_checkpoints[family])
        assert (m["model"]["lora"] == "merged") is lora, (stage, m["model"])
    ppo = manifest(d, "ppo")
    rows = [json.loads(x) for x in (d / "metrics" / "ppo.jsonl").read_text().splitlines()]
    # no dropout in any PPO model: the first micro-batch of every update sees the ratio pi/pi_old exactly 1
    assert all(abs(r["policy/first_ratio_dev"]) < 1e-4 for r in rows if "policy/first_ratio_dev" in r), rows
    assert ppo["metrics"]["updates"] == 2

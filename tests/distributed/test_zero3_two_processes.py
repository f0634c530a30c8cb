"""Real 2-process DeepSpeed launches on CPU: SFT -> RM -> PPO under ZeRO-3, SFT under ZeRO-2."""
from __future__ import annotations

import json
import math

import pytest

from conftest import manifest, ok, run_stage

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SMALL = ["sft.epochs=1", "reward.epochs=1", "reward.stats_samples=64", "ppo.total_episodes=256",
         "ppo.save_every=2", "eval.num_prompts=32"]


def test_zero3_pipeline_two_processes(tmp_path):
    d = tmp_path / "z3"
    for script in ("sft.py", "rm.py", "ppo.py"):
        ok(run_stage(script, f"artifact_dir={d}", "deepspeed.zero_stage=3", *SMALL, deepspeed_procs=2, timeout=1500))
    sft = manifest(d, "sft")
    assert sft["status"] == "complete" and sft["config"]["deepspeed"]["zero_stage"] == 3
    assert sft["metrics"]["eval_loss"] < 0.7 * sft["metrics"]["eval_loss_initial"]
    assert (d / "sft" / "model.safetensors").stat().st_size > 100_000
    rm = manifest(d, "reward")
    assert rm["metrics"]["eval_accuracy"] > 0.55 and "reward_stats" in rm
    ppo = manifest(d, "ppo")
    assert ppo["metrics"]["updates"] == 4  # 256 episodes / (32 prompts x 2 processes)
    rows = [json.loads(ln) for ln in (d / "metrics" / "ppo.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["objective/kl"]) for r in rows) and len(rows) == 4
    assert (d / "ppo" / "samples.jsonl").is_file() and (d / "ppo" / "critic" / "model.safetensors").is_file()


def test_sft_zero2_two_processes(tmp_path):
    d = tmp_path / "z2"
    ok(run_stage("sft.py", f"artifact_dir={d}", "deepspeed.zero_stage=2", "sft.epochs=1", deepspeed_procs=2,
                 port=29633, timeout=900))
    m = manifest(d, "sft")
    assert m["status"] == "complete" and m["metrics"]["eval_loss"] < 0.7 * m["metrics"]["eval_loss_initial"]

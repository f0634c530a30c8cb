"""The whole pipeline with another preference format and another from-scratch model, by overrides only."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import DEMO, ENV, ROOT, manifest, ok

pytestmark = pytest.mark.slow


def test_pipeline_with_hh_transcripts_and_scratch_model_overrides(tmp_path):
    d = tmp_path / "hh"
    hh_train = "reward_data/demo/prefs_hh_train.jsonl"  # relative: resolved against the current directory
    overrides = [f"artifact_dir={d}", f"reward.train_data={hh_train}", "reward.eval_data=reward_data/demo/prefs_hh_eval.jsonl",
                 "model.scratch.vocab_size=320", "model.scratch.hidden_size=64", "model.scratch.num_layers=1",
                 "model.scratch.num_heads=2", "model.scratch.intermediate_size=256",
                 "sft.epochs=1", "reward.epochs=2", "reward.stats_samples=64", "ppo.total_episodes=128",
                 "eval.num_prompts=32"]
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "pipeline", str(DEMO), *overrides], cwd=ROOT,
                          env={**ENV, "MASTER_PORT": "29677"}, capture_output=True, text=True, timeout=1500)
    ok(proc)
    assert "report:" in proc.stdout
    sft, rm, ppo = (manifest(d, s) for s in ("sft", "reward", "ppo"))
    cfg = json.loads((d / "sft" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (64, 1, 320)
    rows = (ROOT / hh_train).read_text().splitlines()
    assert rm["metrics"]["train_pairs"] == len(rows)  # one pair per transcript, multi-turn ones included
    assert rm["metrics"]["eval_accuracy"] > 0.6, rm["metrics"]
    assert rm["data"]["train_data"]["path"].endswith("prefs_hh_train.jsonl")
    assert ppo["status"] == "complete" and {p["stage"] for p in ppo["parents"]} == {"sft", "reward"}
    assert sft["tokenizer"]["vocab_size"] == 320

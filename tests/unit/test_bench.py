"""`rlhf bench` end to end on a tiny random-init model, and the engines' ZeRO stage choice."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ENV, ROOT, ok
from rlhf.config import DeepSpeedConfig
from rlhf.ppo.trainer import engine_deepspeed


def test_one_process_without_offload_runs_unpartitioned_engines():
    assert engine_deepspeed(DeepSpeedConfig(zero_stage=2), "float32", world=1).zero_stage == 0
    assert engine_deepspeed(DeepSpeedConfig(zero_stage=3), "float32", world=1).zero_stage == 0
    assert engine_deepspeed(DeepSpeedConfig(zero_stage=3), "float32", world=2).zero_stage == 3
    # offload needs ZeRO: kept as configured
    assert engine_deepspeed(DeepSpeedConfig(zero_stage=2, offload=True), "float32", world=1).zero_stage == 2


@pytest.mark.slow
def test_bench_reports_throughput_phases_and_memory(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "bench", "--hidden", "32", "--layers", "1", "--heads", "2",
                           "--intermediate", "64", "--episodes", "16", "--batch", "2", "--max-new-tokens", "6",
                           "--ppo-epochs", "1", "--zero-stage", "2", "--json", str(out)],
                          cwd=ROOT, env={**ENV, "MASTER_PORT": "29741"}, capture_output=True, text=True, timeout=600)
    ok(proc)
    r = json.loads(out.read_text())
    assert r["episodes"] == 16 and r["updates"] == 2 and r["processes"] == 1
    assert r["zero_stage"] == 2 and r["engine_zero_stage"] == 0 and r["logprobs_from_generation"] is True
    assert r["episodes_per_s"] == pytest.approx(16 / r["seconds"])
    assert 0 < r["mean_response_length"] <= 6
    assert set(r["phase_seconds"]) == {"generation", "scoring", "forward_backward", "optimizer", "weight_sync",
                                       "other"}
    assert all(v >= 0 for v in r["phase_seconds"].values())
    assert sum(r["phase_seconds"].values()) == pytest.approx(r["seconds"], rel=1e-3)
    assert r["peak_memory_mb"] > 50
    assert "episodes/s:" in proc.stdout and "seconds per phase:" in proc.stdout


def test_estimator_flags_become_config_overrides_and_all_needs_several_samples(capsys):
    import argparse

    from rlhf import bench

    ap = argparse.ArgumentParser()
    bench.add_arguments(ap)
    a = ap.parse_args(["--batch", "8", "--samples-per-prompt", "4", "--episodes", "64", "--estimator", "grpo"])
    ov = bench._overrides(a, world=1)
    # --batch counts prompts: 8 x 4 = 32 responses per update and per mini-batch; 64 timed + 1 warm-up update
    assert {"ppo.rollout_batch_size=8", "ppo.samples_per_prompt=4", "ppo.mini_batch_size=32",
            "ppo.advantage_estimator=grpo", "ppo.total_episodes=96"} <= set(ov)
    # without the flag k is the config's (the demo's 4; a key=value override wins over the file)
    plain = ap.parse_args(["--batch", "2", "--episodes", "16"])
    assert bench.samples_per_prompt(plain) == 4 and "ppo.total_episodes=24" in bench._overrides(plain, world=1)
    assert bench.samples_per_prompt(ap.parse_args(["ppo.advantage_estimator=gae", "ppo.samples_per_prompt=1"])) == 1
    # the children of --estimator all parse back to the same settings
    child = ap.parse_args(["--layers", "1", "--gradient-checkpointing", "--estimator", "rloo", "ppo.top_k=5"])
    again = ap.parse_args(bench.to_argv(child))
    assert vars(again) == vars(child)
    assert bench.bench(ap.parse_args(["--estimator", "all", "ppo.advantage_estimator=gae"])) == 2
    assert "drop that override" in capsys.readouterr().err
    assert bench.bench(ap.parse_args(["--estimator", "all", "--samples-per-prompt", "1"])) == 2
    assert "--samples-per-prompt >= 2" in capsys.readouterr().err

"""The GPU lane: what only a CUDA machine exercises. Skipped where CUDA is absent (CI has none).

Run on a GPU machine with `python -m pytest -q -m gpu tests/gpu`. It covers device placement per
local rank, NCCL, bf16 DeepSpeed engines (ZeRO-2 and ZeRO-3), SDPA attention on CUDA, PPO
checkpoints with CUDA RNG state (ppo.save_every=1), and the benchmark command once.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ENV, ROOT, check_published, manifest, ok, run_pipeline, small_overrides

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _bf16() -> list[str]:
    return ["model.dtype=bfloat16"] if torch.cuda.is_bf16_supported() else ["model.dtype=float16"]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_pipeline_on_one_gpu(tmp_path, family_checkpoints, zero_stage):
    d = tmp_path / "art"
    overrides = small_overrides(tmp_path, family_checkpoints["llama3"]) + _bf16() + [
        f"deepspeed.zero_stage={zero_stage}", "wandb.mode=disabled", "ppo.save_every=1"]
    ok(run_pipeline(d, overrides, port=29710 + zero_stage))
    check_published(d)
    ppo = manifest(d, "ppo")
    assert ppo["metrics"]["updates"] == 2
    rows = [json.loads(x) for x in (d / "metrics" / "ppo.jsonl").read_text().splitlines() if x.strip()]
    assert all(abs(r["policy/first_ratio_dev"]) < 0.5 for r in rows if "policy/first_ratio_dev" in r), rows


def test_bench_runs_on_the_gpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "bench", "--episodes", "64", "--batch", "16",
                           "--max-new-tokens", "16", "--zero-stage", "2", "--dtype",
                           _bf16()[0].split("=")[1], "--json", str(out)],
                          cwd=ROOT, env={**ENV, "MASTER_PORT": "29730"}, capture_output=True, text=True, timeout=900)
    ok(proc)
    r = json.loads(out.read_text())
    assert r["device"] == torch.cuda.get_device_name() and r["episodes"] == 64
    assert r["episodes_per_s"] > 0 and r["peak_memory_kind"].startswith("cuda")
    assert sum(r["phase_seconds"].values()) == pytest.approx(r["seconds"], rel=0.05)

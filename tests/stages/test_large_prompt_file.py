"""PPO on a public-dataset-sized prompt file: 160k prompts cost about what 1k prompts cost."""
from __future__ import annotations

import json
import shutil
import time

import pytest

from conftest import manifest, ok, run_stage

pytestmark = pytest.mark.slow


def test_160k_prompt_file_costs_what_1k_costs(demo_run, tmp_path):
    words = ["metals", "trees", "colors", "birds", "cities", "fruits", "animals", "tools"]
    big = tmp_path / "prompts_160k.jsonl"
    with big.open("w") as f:
        for i in range(160_000):
            f.write(json.dumps({"prompt": f"give me {words[i % len(words)]} #{i}"}) + "\n")
    timings = {}
    for name, prompts in (("1k", None), ("160k", big)):
        d = tmp_path / name
        d.mkdir()
        for stage in ("sft", "reward"):
            shutil.copytree(demo_run / stage, d / stage)
        extra = [f"ppo.train_prompts={prompts}"] if prompts else []
        t = time.perf_counter()
        ok(run_stage("ppo.py", f"artifact_dir={d}", "ppo.total_episodes=64", "eval.num_prompts=16", *extra))
        timings[name] = time.perf_counter() - t
        assert manifest(d, "ppo")["metrics"]["updates"] == 2
    assert timings["160k"] <= 1.5 * timings["1k"], timings

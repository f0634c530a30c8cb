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
    timings: dict[str, list[float]] = {"1k": [], "160k": []}
    for _ in range(2):  # alternated, and the faster of two runs each: robust to a busy machine
        for name, prompts in (("1k", None), ("160k", big)):
            d = tmp_path / name
            if not d.exists():
                d.mkdir()
                for stage in ("sft", "reward"):
                    shutil.copytree(demo_run / stage, d / stage)
            extra = [f"ppo.train_prompts={prompts}"] if prompts else []
            t = time.perf_counter()
            ok(run_stage("ppo.py", f"artifact_dir={d}", "ppo.total_episodes=64", "ppo.rollout_batch_size=8", "eval.num_prompts=16", "force=true",
                         *extra))
            timings[name].append(time.perf_counter() - t)
            assert manifest(d, "ppo")["metrics"]["updates"] == 2
    assert min(timings["160k"]) <= 1.5 * min(timings["1k"]), timings

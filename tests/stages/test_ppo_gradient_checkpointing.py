"""ppo.gradient_checkpointing changes memory, not results."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import GAE_DEMO, ok, run_stage

pytestmark = pytest.mark.slow

COMPARED = ["loss/policy_avg", "loss/value_avg", "objective/kl", "objective/scores", "policy/approxkl_avg", "val/ratio"]


def test_gradient_checkpointing_gives_the_same_updates(demo_run, tmp_path):
    rows = {}
    for flag in ("false", "true"):
        d = tmp_path / flag
        d.mkdir()
        for stage in ("sft", "reward"):
            shutil.copytree(demo_run / stage, d / stage)
        ok(run_stage("ppo.py", f"artifact_dir={d}", *GAE_DEMO, "ppo.total_episodes=64", "eval.num_prompts=8",
                     "deepspeed.zero_stage=2", f"ppo.gradient_checkpointing={flag}"))
        rows[flag] = [r for r in (json.loads(x) for x in (d / "metrics" / "ppo.jsonl").read_text().splitlines())
                      if "objective/kl" in r]  # the update rows (not the evaluation of update 0)
    assert len(rows["true"]) == len(rows["false"]) == 2
    for a, b in zip(rows["false"], rows["true"]):
        for k in COMPARED:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (k, a[k], b[k])

"""The over-optimisation guard on a reward model built to be exploitable: trained on preferences
that favour the longer response, whatever the gold scorer says. PPO with almost no KL penalty
drives the proxy up while the gold score rises briefly and then falls (Gao, Schulman & Hilton
2022); the guard must publish the update at the gold peak and stop once it is past."""
from __future__ import annotations

import os

import pytest

from conftest import GAE_DEMO, length_preferences, manifest, ok, run_stage

pytestmark = pytest.mark.slow


def test_guard_publishes_the_gold_peak_of_an_exploited_reward_model(demo_run, tmp_path):
    d = tmp_path / "art"
    d.mkdir()
    os.symlink(demo_run / "sft", d / "sft")
    common = [f"artifact_dir={d}", "wandb.mode=disabled"]
    ok(run_stage("rm.py", *common, f"reward.train_data={length_preferences('prefs_train.jsonl', tmp_path / 'longer.jsonl', 800)}",
                 "reward.eval_data=null", "reward.epochs=1"))
    rm = manifest(d, "reward")["metrics"]
    assert rm["spearman_gold"] < 0.3  # a proxy that does not track the gold score ...
    assert rm["warnings"] and rm["length_reward_corr_sft"] > 0.5  # ... and the RM stage said so
    ok(run_stage("ppo.py", *common, *GAE_DEMO, "ppo.total_episodes=960", "ppo.kl_coef=0.001", "eval.every=2",
                 "eval.num_prompts=64", "eval.best_of_n=[]", "ppo.early_stop=3"))
    m = manifest(d, "ppo")["metrics"]
    curve = {p["update"]: p for p in m["eval_curve"]}
    sel, last = curve[m["selected_update"]], curve[max(curve)]
    assert m["stop_reason"] == "no_improvement" and m["updates"] < 30, (m["stop_reason"], m["updates"])
    assert sel["gold_score"] == max(p["gold_score"] for p in curve.values())
    assert last["rm_score"] > sel["rm_score"] and last["gold_score"] < sel["gold_score"] - 0.1, m["eval_curve"]
    # the published policy is the selected one: the final evaluation reproduces its curve point
    assert m["gold_score_ppo"] == pytest.approx(sel["gold_score"], abs=1e-9)
    assert m["kl_ppo_vs_sft"] == pytest.approx(sel["kl"], rel=1e-4, abs=1e-5)

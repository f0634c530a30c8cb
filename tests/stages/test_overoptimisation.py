"""The over-optimisation guard on a reward model built to be exploitable: trained on preferences
that favour the longer response, whatever the gold scorer says. PPO with almost no KL penalty
drives the proxy up while the gold score rises briefly and then falls (Gao, Schulman & Hilton
2022); the guard must publish the update at the gold peak and stop once it is past. Without the
gold scorer (given only to the test, to judge) the guard must still publish an update from before
the gold falls, warned by the length drift."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ENV, GAE_DEMO, junk_word_preferences, length_preferences, manifest, ok, run_stage

pytestmark = pytest.mark.slow


def test_guard_publishes_the_gold_peak_of_an_exploited_reward_model(demo_run, tmp_path):
    d = tmp_path / "art"
    d.mkdir()
    os.symlink(demo_run / "sft", d / "sft")
    common = [f"artifact_dir={d}", "wandb.mode=disabled"]
    ok(run_stage("rm.py", *common, f"reward.train_data={length_preferences('prefs_train.jsonl', tmp_path / 'longer.jsonl', 800)}",
                 "reward.eval_data=null", "reward.epochs=1", "reward.ensemble=4"))
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

    # the same run without the gold scorer in the guard (ppo.keep_best=conservative: the ensemble's
    # conservative score up to the first evaluation whose drift signals flag exploitation); gold is still
    # evaluated, to judge it
    g = tmp_path / "no_gold"
    g.mkdir()
    for stage in ("sft", "reward"):
        os.symlink(d / stage, g / stage)
    ok(run_stage("ppo.py", f"artifact_dir={g}", "wandb.mode=disabled", *GAE_DEMO, "ppo.total_episodes=960",
                 "ppo.kl_coef=0.001", "eval.every=2", "eval.num_prompts=64", "eval.best_of_n=[]", "ppo.early_stop=3",
                 "ppo.keep_best=conservative"))
    m = manifest(g, "ppo")["metrics"]
    curve = {p["update"]: p for p in m["eval_curve"]}
    gold_peak = max(curve, key=lambda u: curve[u]["gold_score"])
    assert m["guard_metric"] == "eval/conservative_score" and m["stop_reason"] == "exploitation", (m["stop_reason"], m["eval_curve"])
    assert m["selected_update"] <= gold_peak, (m["selected_update"], m["eval_curve"])  # before the gold falls
    flagged = [p for p in m["eval_curve"] if "length" in p["flags"]]
    assert flagged and m["selected_update"] < flagged[0]["update"]
    assert any(w.startswith("possible reward hacking (length)") and "longer" in w for w in m["warnings"]), m["warnings"]
    assert "drift signals flagged exploitation (length)" in m["guard_reason"]
    assert m["gold_score_ppo"] == pytest.approx(curve[m["selected_update"]]["gold_score"], abs=1e-9)


def test_guard_without_gold_names_a_junk_word_and_publishes_before_it(demo_run, tmp_path):
    """A reward model trained to pay for a junk word, the more the better (' pine', off topic for seven
    of the eight topics): PPO with almost no KL penalty makes it a large part of every response while
    the RM score climbs and the gold score falls. Without the gold scorer (given only to the test, to
    judge), the guard must name the word in the manifest, `rlhf status` and the report, and publish no
    policy from the first evaluation that flagged it on."""
    d = tmp_path / "art"
    d.mkdir()
    os.symlink(demo_run / "sft", d / "sft")
    common = [f"artifact_dir={d}", "wandb.mode=disabled"]
    ok(run_stage("rm.py", *common, "reward.eval_data=null", "reward.epochs=1", "reward.ensemble=4",
                 f"reward.train_data={junk_word_preferences('prefs_train.jsonl', tmp_path / 'pine.jsonl', 1500, 'pine')}"))
    ok(run_stage("ppo.py", *common, *GAE_DEMO, "ppo.total_episodes=960", "ppo.kl_coef=0.001", "eval.every=2",
                 "eval.num_prompts=64", "eval.best_of_n=[]", "ppo.early_stop=3", "ppo.keep_best=conservative"))
    m = manifest(d, "ppo")["metrics"]
    curve = {p["update"]: p for p in m["eval_curve"]}
    flagged = [p for p in m["eval_curve"] if "tokens" in p["flags"]]
    assert flagged and m["stop_reason"] == "exploitation", m["eval_curve"]
    first = flagged[0]
    pine = next(t for t in first["grown_tokens"] if t["token"] == " pine")
    assert pine["ratio"] >= 3 and first["rm_score"] > curve[0]["rm_score"] + 0.5  # several-fold while the reward rises
    assert m["selected_update"] < first["update"]
    assert m["gold_score_ppo"] == pytest.approx(curve[m["selected_update"]]["gold_score"], abs=1e-9)
    warning = next(w for w in m["warnings"] if w.startswith("possible reward hacking (token drift)"))
    assert "' pine'" in warning and f"from update {first['update']}" in warning
    assert [f for f in m["exploitation"] if f["signal"] == "tokens"][0]["tokens"][0] == " pine"
    status = subprocess.run([sys.executable, "-m", "rlhf.cli", "status", "--artifact-dir", str(d)], env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert "warning: possible reward hacking (token drift)" in status.stdout and "' pine'" in status.stdout, status.stdout
    report = subprocess.run([sys.executable, "-m", "rlhf.cli", "report", "--artifact-dir", str(d)], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert "&#x27; pine&#x27;" in (d / "report" / "index.html").read_text()  # the warning, HTML-escaped
    assert m["updates"] == first["update"]  # ppo.early_stop: the run stops at the flag

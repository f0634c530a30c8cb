"""On the demo run: the reward model's diagnostics, the report built from them and from PPO's
evaluations, and the W&B workspace, whose every panel plots a name the stages really logged.
Plus a reward model trained to prefer longer responses: the stage must warn about it."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ENV, length_preferences, manifest, ok, run_stage

pytestmark = pytest.mark.slow


def _logged(d, stage: str) -> set[str]:
    keys: set[str] = set()
    for ln in (d / "metrics" / f"{stage}.jsonl").read_text().splitlines():
        keys |= set(json.loads(ln))
    return keys


def test_reward_model_diagnostics(demo_run):
    m = manifest(demo_run, "reward")["metrics"]
    pairs = m["eval_pairs"]
    assert 0 <= m["calibration_ece"] < 0.2, m["calibration_ece"]
    assert len(m["calibration_bins"]) == 10 and sum(b["count"] for b in m["calibration_bins"]) == pairs
    assert sum(m["reward_histogram"]["chosen"]) == pairs == sum(m["reward_histogram"]["rejected"])
    for k in ("length_reward_corr", "length_reward_corr_sft"):
        assert math.isfinite(m[k]) and abs(m[k]) < 0.7, (k, m[k])  # the demo's RM does not pay for length
    assert m["warnings"] == []
    pts = m["length_reward_points"]
    assert 0 < len(pts["held_out"]["length"]) <= 512 and len(pts["sft"]["reward"]) == len(pts["sft"]["length"])
    assert {"calibration_ece", "length_reward_corr", "length_reward_corr_sft"} <= _logged(demo_run, "reward")


def test_report_and_dashboard(demo_run):
    from rlhf import dashboard

    # every panel plots a name the stage logged, except those only some settings log: the critic's
    # (advantage_estimator=gae; the demo runs rloo) and the KL loss term (kl_penalty=loss)
    by_setting = {"loss/value_avg", "val/clipfrac_avg", "loss/kl_avg"}
    for stage, keys in dashboard.panel_keys().items():
        assert keys - by_setting <= _logged(demo_run, stage), (stage, keys - by_setting - _logged(demo_run, stage))
    assert "rollout/zero_std_groups" in _logged(demo_run, "ppo")
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "report", "--artifact-dir", str(demo_run)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    ok(proc)
    s = json.loads((demo_run / "report" / "summary.json").read_text())
    ppo = manifest(demo_run, "ppo")["metrics"]
    assert s["selected_update"] == ppo["selected_update"] and s["stop_reason"] == ppo["stop_reason"]
    assert [p["update"] for p in s["eval_curve"]] == [p["update"] for p in ppo["eval_curve"]]
    assert [b["n"] for b in s["best_of_n"]] == [1, 2, 4, 8, 16]
    assert "calibration_ece" in s and "length_reward_corr" in s
    for png in ("score_vs_kl.png", "rm_calibration.png", "rm_reward_hist.png", "rm_length.png"):
        assert (demo_run / "report" / png).stat().st_size > 10_000, png
    env = {**ENV, "WANDB_MODE": "offline"}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "dashboard", "--artifact-dir", str(demo_run)],
                          env=env, capture_output=True, text=True, timeout=300)
    ok(proc)
    assert f"wandb sync --project rlhf {demo_run.resolve()}/wandb/offline-run-*" in proc.stdout
    assert list((demo_run / "wandb").glob("offline-run-*"))  # what that command uploads
    written = json.loads((demo_run / "report" / "wandb_workspace.json").read_text())
    assert written["run_group"] == "demo"


def test_length_driven_reward_model_is_flagged(demo_run, tmp_path):
    d = tmp_path / "art"
    d.mkdir()
    os.symlink(demo_run / "sft", d / "sft")
    proc = run_stage("rm.py", f"artifact_dir={d}", "wandb.mode=disabled", "reward.epochs=1", "reward.stats_samples=64",
                     f"reward.train_data={length_preferences('prefs_train.jsonl', tmp_path / 'train.jsonl', 800)}",
                     f"reward.eval_data={length_preferences('prefs_eval.jsonl', tmp_path / 'eval.jsonl', 200)}")
    ok(proc)
    m = manifest(d, "reward")["metrics"]
    assert m["length_reward_corr"] >= 0.7, m["length_reward_corr"]
    assert m["warnings"] and "PPO" in m["warnings"][0] and "longer" in m["warnings"][0]
    assert "[reward] warning: Pearson(reward, response length)" in proc.stdout


def test_wandb_run_holds_the_reports_charts_and_tables(demo_run):
    """The demo's W&B offline runs, read back: every chart of the HTML report as an image and its data
    as a table, one growing `samples` table with the update as a column, the final samples as a
    table, and a workspace panel for each of them."""
    from rlhf import dashboard
    from wandb_run import runs_by_stage

    runs = runs_by_stage(demo_run)
    assert {"sft", "reward", "ppo"} <= set(runs)
    kinds = {"media": "image-file", "table": "table-file"}
    for kind, wandb_type in kinds.items():
        for stage, keys in dashboard.panel_keys((kind,)).items():
            for key in keys:
                logged = [row[f"{key}/_type"] for row in runs[stage]["history"] if f"{key}/_type" in row]
                assert logged and set(logged) == {wandb_type}, (stage, key, logged)
                path = [row[f"{key}/path"] for row in runs[stage]["history"] if f"{key}/path" in row][-1]
                assert (runs[stage]["dir"] / "files" / path).stat().st_size > 100, path
    # the report's images are the HTML report's charts, drawn from the same figures
    ppo_rows = runs["ppo"]["history"]
    assert not any(k.startswith("samples/update_") for k in runs["ppo"]["keys"])  # one table, not one per update
    sample_logs = [row["samples/path"] for row in ppo_rows if "samples/path" in row]
    assert len(sample_logs) >= 2
    table = json.loads((runs["ppo"]["dir"] / "files" / sample_logs[-1]).read_text())
    assert table["columns"] == ["update", "prompt", "response", "rm_score"]
    assert len({row[0] for row in table["data"]}) == len(sample_logs)  # every logged update's rows, in the last one
    final = json.loads((runs["ppo"]["dir"] / "files" / [row["final_samples/path"] for row in ppo_rows
                                                          if "final_samples/path" in row][-1]).read_text())
    published = [json.loads(ln) for ln in (demo_run / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert final["columns"][:3] == ["prompt", "sft_response", "response"] and len(final["data"]) == len(published)
    assert [r[2] for r in final["data"]] == [p["response"] for p in published]
    curve = json.loads((runs["ppo"]["dir"] / "files" / [row["report/eval_curve/path"] for row in ppo_rows
                                                          if "report/eval_curve/path" in row][-1]).read_text())
    assert [r[0] for r in curve["data"]] == [p["update"] for p in manifest(demo_run, "ppo")["metrics"]["eval_curve"]]

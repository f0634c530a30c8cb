"""rlhf compare on hand-made PPO manifests: the table and its JSON, the chart, and the errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from rlhf import cli, compare

CURVE = [{"update": u, "kl": kl, "rm_score": rm, "gold_score": g, "response_length": 10.0, "eos_rate": 1.0}
         for u, kl, rm, g in ((0, 0.0, 1.0, 0.2), (4, 1.0, 3.0, 0.6), (8, 2.5, 4.0, 0.7), (12, 4.0, 4.5, 0.5))]
BEST_OF_N = [{"n": n, "kl": kl, "rm_score": 1.0 + n / 4, "gold_score": 0.2 + n / 40}
             for n, kl in ((1, 0.0), (2, 0.193), (4, 0.636))]


def _write_ppo(d: Path, ppo_config: dict, curve: list[dict] = CURVE, best_of_n: list[dict] = BEST_OF_N,
               status: str = "complete", **metrics) -> Path:
    """DIR/ppo/rlhf_artifact.json as the PPO stage publishes it, with only what compare reads."""
    (d / "ppo").mkdir(parents=True, exist_ok=True)
    metrics = {"eval_curve": curve, "best_of_n": best_of_n, "eval_prompts": 64, **metrics}
    (d / "ppo" / "rlhf_artifact.json").write_text(json.dumps(
        {"stage": "ppo", "status": status, "metrics": metrics, "config": {"ppo": ppo_config}, "files": {},
         "parents": [{"stage": "reward", "path": str(d / "reward"), "manifest_sha256": "rm-1"}]}))
    return d


@pytest.fixture
def two_runs(tmp_path) -> tuple[Path, Path]:
    """An RLOO run (k=4) and one from before the estimator option (its config names neither)."""
    e1 = _write_ppo(tmp_path / "e1", {"advantage_estimator": "rloo", "samples_per_prompt": 4}, selected_update=8,
                    kl_ppo_vs_sft=2.5, rm_score_ppo=4.0, gold_score_ppo=0.7, win_rate_gold=0.75)
    old = _write_ppo(tmp_path / "old", {"kl_coef": 0.05}, curve=[{**p, "kl": p["kl"] / 2} for p in CURVE],
                     selected_update=4, kl_ppo_vs_sft=0.5, rm_score_ppo=3.0, gold_score_ppo=0.6, win_rate_gold=None)
    return e1, old


def test_rows_match_the_manifests_and_files_are_written(two_runs, tmp_path, capsys):
    out = tmp_path / "charts" / "cmp.png"
    assert cli.main(["compare", *map(str, two_runs), "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["runs"] == [
        {"label": "e1 (rloo, k=4)", "dir": str(two_runs[0]), "estimator": "rloo", "k": 4, "selected_update": 8,
         "kl": 2.5, "rm_score": 4.0, "gold_score": 0.7, "win_rate_gold": 0.75, "eval_prompts": 64},
        {"label": "old (gae, k=1)", "dir": str(two_runs[1]), "estimator": "gae", "k": 1, "selected_update": 4,
         "kl": 0.5, "rm_score": 3.0, "gold_score": 0.6, "win_rate_gold": None, "eval_prompts": 64}]
    # one shared baseline, drawn once
    assert data["best_of_n"] == [{"runs": ["e1 (rloo, k=4)", "old (gae, k=1)"], "rows": BEST_OF_N}]
    printed = capsys.readouterr().out
    lines = [ln.split() for ln in printed.splitlines()]
    assert "e1 (rloo, k=4) rloo 4 8 2.500 4.000 0.700 0.750".split() in lines
    assert "old (gae, k=1) gae 1 4 0.500 3.000 0.600 –".split() in lines
    assert "4 0.636 2.000 0.300".split() in lines                    # best-of-n: n, KL, RM, gold
    assert "note:" not in printed                                    # one RM, one baseline: nothing to warn of
    with Image.open(out) as im:
        assert im.size == (1000, 640)                                # two panels: RM and gold


def test_published_point_is_the_selected_evaluation(two_runs):
    run = compare.load_run(two_runs[0])
    assert run.published == CURVE[2]                                 # update 8, where the star goes
    assert compare.load_run(two_runs[1], "mine").label == "mine"


def test_runs_with_different_baselines_or_rms_get_each_drawn_and_a_note(two_runs, tmp_path, capsys):
    other = _write_ppo(tmp_path / "g1", {"advantage_estimator": "grpo", "samples_per_prompt": 8}, selected_update=12,
                       best_of_n=[{**b, "rm_score": b["rm_score"] + 1} for b in BEST_OF_N])
    m = json.loads((other / "ppo" / "rlhf_artifact.json").read_text())
    m["parents"][0]["manifest_sha256"] = "rm-2"
    (other / "ppo" / "rlhf_artifact.json").write_text(json.dumps(m))
    data = compare.compare([*two_runs, other], tmp_path / "c.png")
    assert [g["runs"] for g in data["best_of_n"]] == [["e1 (rloo, k=4)", "old (gae, k=1)"], ["g1 (grpo, k=8)"]]
    printed = capsys.readouterr().out
    assert "best-of-n of g1 (grpo, k=8)" in printed and "baselines differ" in printed
    assert "different reward models" in printed


def test_runs_without_gold_draw_one_panel(tmp_path):
    d = _write_ppo(tmp_path / "r", {"advantage_estimator": "rloo", "samples_per_prompt": 2}, selected_update=4,
                   curve=[{**p, "gold_score": None} for p in CURVE],
                   best_of_n=[{**b, "gold_score": None} for b in BEST_OF_N])
    compare.compare([d], tmp_path / "c.png")
    with Image.open(tmp_path / "c.png") as im:
        assert im.size == (1000, 400)


@pytest.mark.parametrize("case", ["missing", "partial", "no_evaluations", "stage_dir"])
def test_a_dir_without_a_complete_ppo_stage_is_a_clear_error(two_runs, tmp_path, capsys, case):
    bad = tmp_path / "bad"
    if case == "missing":
        bad.mkdir()
    elif case == "partial":
        _write_ppo(bad, {}, status="running")
    elif case == "no_evaluations":
        _write_ppo(bad, {}, curve=[])
    else:
        bad = two_runs[0] / "ppo"
    out = tmp_path / "c.png"
    assert cli.main(["compare", str(two_runs[0]), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(bad) in err
    assert {"missing": "run the pipeline's PPO stage there", "partial": "run the pipeline's PPO stage there",
            "no_evaluations": "ppo.eval_prompts", "stage_dir": f"pass the artifact directory that holds it: "
                                                               f"{two_runs[0]}"}[case] in err
    assert not out.exists()                                          # checked before anything is written


def test_labels_name_the_runs_and_must_match_the_dirs(two_runs, tmp_path, capsys):
    out = tmp_path / "c.png"
    assert cli.main(["compare", *map(str, two_runs), "--out", str(out), "--labels", "RLOO,baseline"]) == 0
    assert [r["label"] for r in json.loads(out.with_suffix(".json").read_text())["runs"]] == ["RLOO", "baseline"]
    capsys.readouterr()
    assert cli.main(["compare", *map(str, two_runs), "--out", str(tmp_path / "d.png"), "--labels", "only-one"]) == 2
    err = capsys.readouterr().err
    assert "--labels has 1 label(s) for 2 directories" in err and not (tmp_path / "d.png").exists()

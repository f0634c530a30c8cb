"""rlhf report on hand-made manifests and metrics: summary.json, the plots, index.html."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf import report
from rlhf.reward_training import rm_diagnostics

CURVE = [{"update": u, "kl": kl, "rm_score": rm, "gold_score": g, "response_length": 10.0, "eos_rate": 1.0}
         for u, kl, rm, g in ((0, 0.0, 1.0, 0.2), (4, 1.0, 3.0, 0.6), (8, 2.5, 4.0, 0.7), (12, 4.0, 4.5, 0.5))]
BEST_OF_N = [{"n": n, "kl": kl, "rm_score": 1.0 + n / 4, "gold_score": 0.2 + n / 40}
             for n, kl in ((1, 0.0), (2, 0.193), (4, 0.636))]


def _write(d: Path, stage: str, metrics: dict, config: dict | None = None) -> None:
    from rlhf import artifacts

    (d / stage).mkdir(parents=True, exist_ok=True)
    (d / stage / "model.safetensors").write_text("w")
    files = artifacts.file_checksums(d / stage)
    (d / stage / "rlhf_artifact.json").write_text(json.dumps({"stage": stage, "status": "complete", "metrics": metrics,
                                                               "config": config or {}, "files": files,
                                                               "files_sha256": artifacts.files_digest(files)}))


def _metrics_file(d: Path, stage: str, rows: list[dict]) -> None:
    (d / "metrics").mkdir(exist_ok=True)
    (d / "metrics" / f"{stage}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def art(tmp_path) -> Path:
    d = tmp_path / "art"
    diag = rm_diagnostics(([2.0, 1.0, 3.0, -0.5], [0.0, 1.5, -1.0, 0.5], [5, 6, 7, 8], [4, 4, 9, 3]),
                          ([0.5, 1.5, 2.5], [3, 6, 9]))
    _write(d, "reward", {"eval_accuracy": 0.75, "spearman_gold": 0.8, **diag})
    _write(d, "ppo", {"selected_update": 8, "stop_reason": "no_improvement", "guard_metric": "eval/gold_score",
                      "eval_curve": CURVE, "best_of_n": BEST_OF_N, "kl_budget": 10.0, "updates": 12,
                      "gold_score_sft": 0.2, "gold_score_ppo": 0.7, "gold_score_sft_std": 0.5, "kl_ppo_vs_sft": 2.5},
           config={"eval": {"best_of_n_prompts": 32, "num_prompts": 128}})
    (d / "ppo" / "samples.jsonl").write_text(json.dumps(
        {"prompt": "p <b>", "response": "r", "sft_response": "s", "rm_score": 1.0, "rm_score_sft": 0.5,
         "gold_score": 1.0, "gold_score_sft": 0.0}) + "\n")
    _metrics_file(d, "ppo", [{"step": u, "objective/kl": 0.1 * u, "objective/scores": 0.2 * u, "objective/raw_scores": u,
                              "objective/rlhf_reward": 0.1, "objective/kl_coef": 0.05, "episode": 32 * u}
                             for u in range(1, 13)])
    _metrics_file(d, "reward", [{"step": 10, "train/loss": 0.5, "train/accuracy": 0.7}])
    return d


def test_summary_and_plots(art):
    from PIL import Image

    out = report.build(art)
    s = json.loads((out / "summary.json").read_text())
    assert s["selected_update"] == 8 and s["stop_reason"] == "no_improvement" and s["guard_metric"] == "eval/gold_score"
    assert s["eval_curve"] == CURVE and s["best_of_n"] == BEST_OF_N
    assert 0 <= s["calibration_ece"] <= 1 and "length_reward_corr" in s and "length_reward_corr_sft" in s
    assert s["gold_gain_in_sft_std"] == pytest.approx(1.0)
    for png, size in (("score_vs_kl.png", (720, 640)), ("rm_calibration.png", (640, 480)),
                      ("rm_reward_hist.png", (640, 400)), ("rm_length.png", (640, 400)), ("ppo_scores.png", (640, 400))):
        with Image.open(out / png) as im:
            assert im.size == size, png
    page = (out / "index.html").read_text()
    import base64
    import re

    for png in ("score_vs_kl.png", "eval_vs_update.png", "rm_calibration.png", "rm_reward_hist.png", "rm_length.png",
                "ppo_kl.png", "ppo_scores.png", "rm_accuracy.png"):
        # one self-contained file: each image inside the page, byte for byte the PNG beside it
        assert f'src="data:image/png;base64,{base64.b64encode((out / png).read_bytes()).decode()}"' in page, png
    assert not re.search(r'src="(?!data:)', page)  # nothing the page loads from elsewhere
    assert "<tr class=sel><td>8</td>" in page           # the published update, highlighted in the curve table
    assert "PPO stopped early (no_improvement)" in page
    assert "p &lt;b&gt;" in page and "Samples from the published policy" in page


def test_rm_warning_reaches_the_report(art):
    m = json.loads((art / "reward" / "rlhf_artifact.json").read_text())
    m["metrics"]["warnings"] = ["Pearson(reward, response length) = 0.90 on x"]
    (art / "reward" / "rlhf_artifact.json").write_text(json.dumps(m))
    out = report.build(art)
    assert json.loads((out / "summary.json").read_text())["rm_warnings"] == m["metrics"]["warnings"]
    assert '<p class="warn">Pearson(reward, response length) = 0.90 on x</p>' in (out / "index.html").read_text()


def test_overoptimisation_chart_without_evaluations_or_gold(art, tmp_path):
    # no held-out evaluation: the training rollouts' raw scores against their KL, one panel
    from rlhf.tracking import read_metrics

    assert report.overoptimisation_plot(tmp_path / "a.png", {}, read_metrics(art, "ppo"))
    from PIL import Image

    with Image.open(tmp_path / "a.png") as im:
        assert im.size == (720, 400)
    no_gold = [{**p, "gold_score": None} for p in CURVE]
    assert report.overoptimisation_plot(tmp_path / "b.png", {"eval_curve": no_gold, "selected_update": 8}, [])
    assert not report.overoptimisation_plot(tmp_path / "c.png", {}, [])
    # a sampled KL estimate a little below zero plots at 0
    assert report._sqrt_kl(-1e-6) == 0.0


def test_report_with_nothing_published(tmp_path):
    out = report.build(tmp_path)
    s = json.loads((out / "summary.json").read_text())
    assert s["stages"] == {"sft": "missing", "reward": "missing", "ppo": "missing"}
    assert "No samples" in (out / "index.html").read_text()


def test_verdict_states_the_summary_figures(art):
    """The verdict paragraph at the top of the page: gold before and after, the gain in SFT standard
    deviations, the KL and its budget, and best-of-n at PPO's KL, each as summary.json has it."""
    m = json.loads((art / "ppo" / "rlhf_artifact.json").read_text())
    m["metrics"].update(win_rate_gold=0.8, win_rate_rm=0.9, kl_ppo_vs_sft=0.4, gold_score_ppo=0.35)
    (art / "ppo" / "rlhf_artifact.json").write_text(json.dumps(m))
    out = report.build(art)
    s = json.loads((out / "summary.json").read_text())
    # PPO's KL 0.4 lies between n=2 (0.193) and n=4 (0.636): gold 0.25 + (0.3 - 0.25) * (0.4 - 0.193) / 0.443
    at = 0.25 + 0.05 * (0.4 - 0.193) / (0.636 - 0.193)
    assert s["best_of_n_at_ppo_kl"]["gold_score"] == pytest.approx(at)
    v = s["verdict"]
    assert v.startswith("PPO raised the gold score from 0.2 (SFT) to 0.35, +0.30 SFT standard deviations, at a KL "
                        "to the SFT policy of 0.4 nats per response (budget 10).")
    assert "beats the SFT policy on 80% of the held-out prompts under the gold scorer (90% under the reward model)" in v
    assert f"at the same KL scores {at:.3g} (interpolated): PPO is ahead by {0.35 - at:.3g}." in v
    page = (out / "index.html").read_text()
    assert page.index('<p class="verdict">') < page.index("<h2>")  # the first thing after the title
    # beyond the largest n's KL: compared with that n, and said when PPO is behind
    m["metrics"].update(kl_ppo_vs_sft=2.5, gold_score_ppo=0.28)
    (art / "ppo" / "rlhf_artifact.json").write_text(json.dumps(m))
    s = json.loads((report.build(art) / "summary.json").read_text())
    assert "best_of_n_at_ppo_kl" not in s
    assert "Best-of-4, the strongest baseline run, scores 0.3 at KL 0.636: PPO is behind by 0.02 with more KL." in s["verdict"]
    assert "What to tune first" in s["verdict"]


def test_verdict_without_ppo(tmp_path):
    _write(tmp_path, "sft", {})
    _write(tmp_path, "reward", {"eval_accuracy": 0.75})
    s = json.loads((report.build(tmp_path) / "summary.json").read_text())
    assert s["verdict"] == ("Complete: sft, reward; PPO has not published a policy yet. The reward model ranks "
                            "75.0% of the held-out pairs correctly.")


def test_overoptimisation_chart_with_an_ensemble_and_flags(tmp_path):
    """A reward ensemble adds a panel (members' mean with its spread, the conservative score, the
    held-out member); flagged evaluations are marked; the published update is starred on it too."""
    from PIL import Image

    curve = [{**p, "ensemble_mean": 0.5 * i, "ensemble_spread": 0.1 + 0.05 * i, "conservative_score": 0.4 * i,
              "held_out_member_score": 0.3 * i, "flags": ["tokens"] if i >= 2 else []} for i, p in enumerate(CURVE)]
    curve[2]["kl"] = curve[1]["kl"]  # two evaluations at the same KL (a tie must not compare the rows)
    assert report.overoptimisation_plot(tmp_path / "e.png", {"eval_curve": curve, "selected_update": 4}, [])
    with Image.open(tmp_path / "e.png") as im:
        assert im.size == (720, 880)  # proxy, gold and the ensemble
    assert report.eval_curve_plot(tmp_path / "u.png", {"eval_curve": curve, "selected_update": 4})

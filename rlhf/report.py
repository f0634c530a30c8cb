"""DIR/report/: summary.json, PNG plots made from DIR/metrics/*.jsonl, and index.html."""
from __future__ import annotations

import html
import json
from pathlib import Path

from rlhf import artifacts
from rlhf.tracking import read_metrics

SUMMARY_KEYS = {  # summary key -> (stage, manifest metric)
    "rm_eval_accuracy": ("reward", "eval_accuracy"),
    "rm_spearman_gold": ("reward", "spearman_gold"),
    "sft_eval_loss": ("sft", "eval_loss"),
    "sft_eval_loss_initial": ("sft", "eval_loss_initial"),
    "gold_score_sft": ("ppo", "gold_score_sft"),
    "gold_score_ppo": ("ppo", "gold_score_ppo"),
    "gold_score_sft_std": ("ppo", "gold_score_sft_std"),
    "rm_score_sft": ("ppo", "rm_score_sft"),
    "rm_score_ppo": ("ppo", "rm_score_ppo"),
    "kl_ppo_vs_sft": ("ppo", "kl_ppo_vs_sft"),
    "win_rate_rm": ("ppo", "win_rate_rm"),
    "win_rate_gold": ("ppo", "win_rate_gold"),
    "response_length_sft": ("ppo", "response_length_sft"),
    "response_length_ppo": ("ppo", "response_length_ppo"),
    "eos_rate_sft": ("ppo", "eos_rate_sft"),
    "eos_rate_ppo": ("ppo", "eos_rate_ppo"),
}


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(path: Path, title: str, xlabel: str, lines: list[tuple[str, list, list]], ylabel: str = "") -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [ln for ln in lines if ln[1]]
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for label, x, y in lines:
        ax.plot(x, y, marker="." if len(x) < 40 else None, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def build(artifact_dir: Path) -> Path:
    artifact_dir = Path(artifact_dir)
    out = artifacts.report_dir(artifact_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifests = {s: artifacts.read_manifest(artifacts.stage_dir(artifact_dir, s)) for s in artifacts.STAGES}
    summary: dict = {"stages": {s: artifacts.stage_state(artifact_dir, s) for s in artifacts.STAGES}}
    for key, (stage, metric) in SUMMARY_KEYS.items():
        m = manifests.get(stage)
        if m and metric in m.get("metrics", {}):
            summary[key] = m["metrics"][metric]
    if "gold_score_ppo" in summary and summary.get("gold_score_sft_std"):
        summary["gold_gain_in_sft_std"] = (summary["gold_score_ppo"] - summary["gold_score_sft"]) / summary["gold_score_sft_std"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    ppo, rm, sft = (read_metrics(artifact_dir, s) for s in ("ppo", "reward", "sft"))
    plots = []
    if _plot(out / "ppo_scores.png", "RM score and RLHF reward per update", "PPO update",
             [("objective/scores", *_series(ppo, "objective/scores")),
              ("objective/rlhf_reward", *_series(ppo, "objective/rlhf_reward"))]):
        plots.append("ppo_scores.png")
    if _plot(out / "ppo_kl.png", "KL to the SFT policy and KL coefficient per update", "PPO update",
             [("objective/kl", *_series(ppo, "objective/kl")), ("objective/kl_coef", *_series(ppo, "objective/kl_coef"))]):
        plots.append("ppo_kl.png")
    kl_x = [r["objective/kl"] for r in ppo if "objective/kl" in r]
    sc_y = [r["objective/scores"] for r in ppo if "objective/scores" in r]
    lines = [("RM score (proxy), per update", kl_x, sc_y)]
    pm = manifests.get("ppo") or {}
    if "gold_score_ppo" in pm.get("metrics", {}):
        m = pm["metrics"]
        lines.append(("gold score, SFT -> PPO (held-out)", [0.0, m["kl_ppo_vs_sft"]], [m["gold_score_sft"], m["gold_score_ppo"]]))
    if _plot(out / "score_vs_kl.png", "Score vs KL (over-optimisation curve)", "KL(policy || SFT) per response", lines):
        plots.append("score_vs_kl.png")
    rm_lines = [("train accuracy", *_series(rm, "train/accuracy"))]
    ex, ey = _series(rm, "eval/accuracy")
    rm_lines.append(("held-out accuracy", ex, ey))
    if _plot(out / "rm_accuracy.png", "Reward model pairwise accuracy", "RM optimizer step", rm_lines):
        plots.append("rm_accuracy.png")
    if _plot(out / "losses.png", "Training losses", "step",
             [("SFT loss", *_series(sft, "train/loss")), ("RM loss", *_series(rm, "train/loss")),
              ("PPO policy loss", *_series(ppo, "loss/policy_avg")), ("PPO value loss", *_series(ppo, "loss/value_avg"))]):
        plots.append("losses.png")

    samples_path = artifacts.stage_dir(artifact_dir, "ppo") / artifacts.SAMPLES
    samples = [json.loads(ln) for ln in samples_path.read_text().splitlines()[:20]] if samples_path.is_file() else []
    rows = "".join(
        f"<tr><td>{html.escape(s['prompt'])}</td><td>{html.escape(s.get('sft_response', ''))}</td>"
        f"<td>{html.escape(s['response'])}</td><td>{s.get('gold_score_sft', '')}</td><td>{s.get('gold_score', '')}</td></tr>"
        for s in samples)
    figures = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in summary.items() if isinstance(v, (int, float)))
    imgs = "".join(f'<figure><img src="{p}" alt="{p}"></figure>' for p in plots)
    (out / "index.html").write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>RLHF report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}figure{{display:inline-block;margin:0.5em}}</style></head>
<body><h1>RLHF report: {html.escape(str(artifact_dir))}</h1>
<p>Stages: {html.escape(json.dumps(summary['stages']))}</p>
<h2>Figures</h2><table>{figures}</table><h2>Plots</h2>{imgs}
<h2>SFT vs PPO on held-out prompts</h2>
<table><tr><th>prompt</th><th>SFT</th><th>PPO</th><th>gold SFT</th><th>gold PPO</th></tr>{rows}</table>
</body></html>""")
    return out

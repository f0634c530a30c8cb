"""DIR/report/: summary.json, PNG plots made from the manifests and DIR/metrics/*.jsonl, and index.html.

index.html is one self-contained file (the plots inside it as data: URIs; the PNGs stay beside it)
that opens with a verdict paragraph (`verdict`, also summary.json's "verdict"): the score gain, the
win rate, the KL against its budget and best-of-n at the same KL, in summary.json's figures.

Plots: the over-optimisation chart (score_vs_kl.png: proxy and gold score against sqrt(KL) for
PPO's held-out evaluations and the best-of-n baseline, the published update marked), the same
evaluations against the update (eval_vs_update.png), the reward model's diagnostics
(rm_calibration.png, rm_reward_hist.png, rm_length.png) and the training curves (ppo_scores.png,
ppo_kl.png with beta on its own axis, rm_accuracy.png, losses.png with a panel per loss)."""
from __future__ import annotations

import base64
import html
import json
import math
import random
from typing import Any
from pathlib import Path

from rlhf import artifacts
from rlhf.metric_names import HF, PPO
from rlhf.metric_names import Summary as S
from rlhf.tracking import read_metrics

SUMMARY_KEYS = {  # summary key -> (stage, manifest metric)
    "rm_eval_accuracy": ("reward", S.EVAL_ACCURACY),
    "rm_spearman_gold": ("reward", S.SPEARMAN_GOLD),
    "calibration_ece": ("reward", S.CALIBRATION_ECE),
    "length_reward_corr": ("reward", S.LENGTH_REWARD_CORR),
    "length_reward_corr_sft": ("reward", S.LENGTH_REWARD_CORR_SFT),
    "rm_warnings": ("reward", S.WARNINGS),
    "sft_eval_loss": ("sft", S.EVAL_LOSS),
    "sft_eval_loss_initial": ("sft", S.EVAL_LOSS_INITIAL),
    "gold_score_sft": ("ppo", S.GOLD_SCORE_SFT),
    "gold_score_ppo": ("ppo", S.GOLD_SCORE_PPO),
    "gold_score_sft_std": ("ppo", S.GOLD_SCORE_SFT_STD),
    "rm_score_sft": ("ppo", S.RM_SCORE_SFT),
    "rm_score_ppo": ("ppo", S.RM_SCORE_PPO),
    "kl_ppo_vs_sft": ("ppo", S.KL_PPO_VS_SFT),
    "kl_budget": ("ppo", S.KL_BUDGET),
    "win_rate_rm": ("ppo", S.WIN_RATE_RM),
    "win_rate_gold": ("ppo", S.WIN_RATE_GOLD),
    "response_length_sft": ("ppo", S.RESPONSE_LENGTH_SFT),
    "response_length_ppo": ("ppo", S.RESPONSE_LENGTH_PPO),
    "eos_rate_sft": ("ppo", S.EOS_RATE_SFT),
    "eos_rate_ppo": ("ppo", S.EOS_RATE_PPO),
    "updates": ("ppo", S.UPDATES),
    "selected_update": ("ppo", S.SELECTED_UPDATE),
    "stop_reason": ("ppo", S.STOP_REASON),
    "guard_metric": ("ppo", S.GUARD_METRIC),
    "guard_reason": ("ppo", S.GUARD_REASON),
    "ppo_warnings": ("ppo", S.WARNINGS),  # possible reward hacking, with its evidence (rlhf.ppo.drift)
    "eval_curve": ("ppo", S.EVAL_CURVE),    # [{update, kl, rm_score, gold_score, response_length, eos_rate}]
    "best_of_n": ("ppo", S.BEST_OF_N),      # [{n, kl, rm_score, gold_score}], kl analytic
}

LABELS = {  # what the figures table calls a summary key
    "sft_eval_loss_initial": "SFT held-out loss, untrained",
    "sft_eval_loss": "SFT held-out loss, trained",
    "rm_eval_accuracy": "RM held-out pairwise accuracy",
    "rm_spearman_gold": "Spearman(RM score, gold) on fresh SFT samples",
    "calibration_ece": "RM calibration error (ECE, held-out pairs)",
    "length_reward_corr": "Pearson(RM reward, length), held-out responses",
    "length_reward_corr_sft": "Pearson(RM reward, length), SFT samples",
    "gold_score_sft": "gold score, SFT",
    "gold_score_ppo": "gold score, PPO (published policy)",
    "gold_score_sft_std": "gold score std over SFT samples",
    "gold_gain_in_sft_std": "gold gain, in SFT standard deviations",
    "rm_score_sft": "RM score (raw reward-model output), SFT",
    "rm_score_ppo": "RM score (raw reward-model output), PPO",
    "kl_ppo_vs_sft": "KL(PPO || SFT), nats per response",
    "kl_budget": "KL budget (ppo.kl_budget), nats per response",
    "win_rate_rm": "win rate of PPO over SFT, under the RM",
    "win_rate_gold": "win rate of PPO over SFT, under gold",
    "response_length_sft": "response length (tokens), SFT",
    "response_length_ppo": "response length (tokens), PPO",
    "eos_rate_sft": "EOS rate, SFT",
    "eos_rate_ppo": "EOS rate, PPO",
    "updates": "PPO updates run",
    "selected_update": "PPO update published",
    "samples_per_prompt": "PPO samples per prompt (ppo.samples_per_prompt)",
}

SMALL = (6.4, 4.0)  # inches at 100 dpi: 640 x 400 pixels



def _best_of_n_prompts_note(ev: dict, pm: dict) -> str:
    """Which held-out prompts best-of-n and PPO's evaluation used (the chart compares them)."""
    if not pm.get(S.BEST_OF_N) or not ev:
        return ""
    n_eval, n_bon = pm.get(S.EVAL_PROMPTS) or ev.get("num_prompts"), ev.get("best_of_n_prompts")
    if n_bon is None or (n_eval is not None and n_bon >= n_eval):
        return (f"Best-of-n and PPO's evaluation use the same {n_eval} held-out prompts: their KL-0 points (both the "
                "SFT policy) differ by sampling noise only.")
    return (f"Best-of-n samples the first {n_bon} held-out prompts and PPO's evaluation {n_eval}: their KL-0 points "
            "(both the SFT policy) differ by that and by sampling noise.")

def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return True


def _plot(path: Path, title: str, xlabel: str, lines: list[tuple[str, list, list]], ylabel: str = "") -> bool:
    lines = [ln for ln in lines if ln[1]]
    if not lines:
        return False
    fig, ax = _pyplot().subplots(figsize=SMALL, dpi=100)
    for label, x, y in lines:
        ax.plot(x, y, marker="." if len(x) < 40 else None, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def kl_plot(path: Path, kl: tuple[list, list], coef: tuple[list, list]) -> bool:
    """KL per response against the update (left axis) and the KL coefficient (right axis: another unit)."""
    if not kl[0]:
        return False
    fig, ax = _pyplot().subplots(figsize=SMALL, dpi=100)
    ax.plot(*kl, color="C0", label="objective/kl (KL to SFT)")
    ax.set_xlabel("PPO update")
    ax.set_ylabel("KL to SFT [nats per response]", color="C0")
    ax.grid(alpha=0.3)
    if coef[0]:
        right = ax.twinx()
        right.plot(*coef, color="C1", ls="--", label="objective/kl_coef (beta)")
        right.set_ylabel("KL coefficient beta", color="C1")
        right.set_ylim(bottom=0)
    ax.set_title("KL to the SFT policy and the KL coefficient per update")
    return _save(fig, path)


def losses_plot(path: Path, series: list[tuple[str, str, tuple[list, list]]]) -> bool:
    """One panel per loss that was logged (their units and scales differ), in a grid of two columns."""
    series = [s for s in series if s[2][0]]
    if not series:
        return False
    rows = (len(series) + 1) // 2
    fig, axes = _pyplot().subplots(rows, 2, figsize=(9.6, 2.6 * rows + 0.4), dpi=100, squeeze=False)
    for ax, (title, xlabel, (x, y)) in zip(axes.flat, series):
        ax.plot(x, y, lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    return _save(fig, path)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _sqrt_kl(kl: float) -> float:
    """sqrt of a KL estimate; a sampled (k1) estimate a little below 0 counts as 0."""
    return math.sqrt(max(float(kl), 0.0))


# ----------------------------------------------------------------- the over-optimisation chart

def overoptimisation_plot(path: Path, ppo_metrics: dict, ppo_rows: list[dict]) -> bool:
    """Proxy (RM) score and gold score against sqrt(KL to the SFT policy), as Gao, Schulman &
    Hilton (2022) plot them: PPO's held-out evaluations (one point per evaluation, update 0 = the
    SFT policy), the best-of-n baseline at its analytic KL, the published update marked and the
    KL budget drawn. Proxy and gold have different units: one panel each, sharing the x axis.
    Without held-out evaluations: the training rollouts' raw RM scores against their KL."""
    curve = [p for p in ppo_metrics.get(S.EVAL_CURVE) or [] if _num(p.get("kl"))]
    bon = [b for b in ppo_metrics.get(S.BEST_OF_N) or [] if _num(b.get("kl"))]
    selected = ppo_metrics.get(S.SELECTED_UPDATE)
    budget = ppo_metrics.get(S.KL_BUDGET)
    if not curve:
        rows = [r for r in ppo_rows if _num(r.get(PPO.KL)) and _num(r.get(PPO.RAW_SCORES))]
        if not rows:
            return False
        curve = [{"update": r["step"], "kl": r[PPO.KL], "rm_score": r[PPO.RAW_SCORES]} for r in rows]
        ppo_label = "PPO training rollouts (one point per update)"
    else:
        ppo_label = "PPO, held-out evaluation (one point per evaluation)"
    has_gold = any(_num(p.get("gold_score")) for p in curve + bon)
    has_ensemble = any(_num(p.get("conservative_score")) for p in curve)
    panels = ([("rm_score", "proxy: reward-model score (raw)")] + ([("gold_score", "gold score")] if has_gold else [])
              + ([("conservative_score", "ensemble, normalised units")] if has_ensemble else []))
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(7.2, 1.6 + 2.4 * len(panels)), dpi=100,
                             squeeze=False)
    flagged = [p for p in curve if p.get("flags")]
    for ax, (key, ylabel) in zip(axes[:, 0], panels):
        pts = [(_sqrt_kl(p["kl"]), p[key], p["update"]) for p in curve if _num(p.get(key))]
        if key == "conservative_score":
            _ensemble_panel(ax, curve)
        else:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color="C0", ms=4, label=ppo_label)
        fpts = [(_sqrt_kl(p["kl"]), p[key]) for p in flagged if _num(p.get(key))]
        if fpts:
            ax.plot([x for x, _ in fpts], [y for _, y in fpts], "x", color="C3", ms=9, mew=2, zorder=6,
                    label=f"drift flagged ({', '.join(sorted({f for p in flagged for f in p['flags']}))})")
        for (x, y, u), dy in ((pts[0], -11), (pts[-1], -14))[: min(2, len(pts))]:  # where the curve starts and ends
            ax.annotate("SFT" if u == 0 else f"update {u}", (x, y), textcoords="offset points", xytext=(6, dy),
                        fontsize=7, color="C0")
        bpts = [(_sqrt_kl(b["kl"]), b[key], b["n"]) for b in bon if _num(b.get(key))]
        if bpts:
            ax.plot([p[0] for p in bpts], [p[1] for p in bpts], "--s", color="C1", ms=4,
                    label="best-of-n of SFT samples (analytic KL)")
            for x, y, n in bpts:
                ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7, color="C1")
        sel = [p for p in pts if p[2] == selected]
        if sel:
            ax.plot([sel[0][0]], [sel[0][1]], "*", color="C3", ms=16, mec="black", mew=0.6, zorder=5,
                    label=f"published policy (update {selected})")
        if _num(budget) and budget > 0:
            ax.axvline(_sqrt_kl(budget), color="grey", ls=":", lw=1.2, label=f"KL budget ({budget:g})")
        ax.set_ylabel(ylabel)
        ax.margins(y=0.12)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title("Over-optimisation: score against sqrt(KL to the SFT policy)")
    axes[-1, 0].set_xlabel("sqrt(KL(policy || SFT)) per response  [sqrt(nats)]")
    axes[0, 0].legend(fontsize=7.5, loc="best")
    if has_ensemble:
        axes[-1, 0].legend(fontsize=7, loc="best")
    return _save(fig, path)


def _ensemble_panel(ax: Any, curve: list[dict]) -> None:
    """A reward ensemble on the over-optimisation chart: the optimised members' mean with a band of
    +-1 spread (their disagreement), the conservative score the guard selects by, and the held-out
    member PPO never optimised, in the members' SFT units (0 = the SFT policy's mean)."""
    pts = [(_sqrt_kl(p["kl"]), p) for p in curve if _num(p.get("conservative_score"))]  # in update order
    xs = [x for x, _ in pts]
    mean = [p.get("ensemble_mean") for _, p in pts]
    spread = [p.get("ensemble_spread") for _, p in pts]
    if all(_num(v) for v in mean + spread):
        ax.plot(xs, mean, "-", color="C0", lw=1.2, label="members' mean (optimised)")
        ax.fill_between(xs, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)],
                        color="C0", alpha=0.18, label="+-1 spread across members")
    ax.plot(xs, [p["conservative_score"] for _, p in pts], "-o", color="C4", ms=4, label="conservative: mean - lambda x spread")
    held = [(x, p["held_out_member_score"]) for x, p in pts if _num(p.get("held_out_member_score"))]
    if held:
        ax.plot([x for x, _ in held], [y for _, y in held], ":", color="C5", lw=1.5, label="held-out member")


def eval_curve_plot(path: Path, ppo_metrics: dict) -> bool:
    """PPO's held-out evaluations against the update: RM score (raw), gold score and KL, one panel
    each, the published update marked: where the gold score turns while the RM score still rises."""
    curve = [p for p in ppo_metrics.get(S.EVAL_CURVE) or [] if _num(p.get("update"))]
    panels = [(k, lab) for k, lab in (("rm_score", "RM score (raw)"), ("gold_score", "gold score"),
                                      ("conservative_score", "conservative score"),
                                      ("token_kl", "token-frequency KL to SFT"), ("kl", "KL to SFT [nats/response]"))
              if any(_num(p.get(k)) for p in curve)]
    if len(curve) < 2 or not panels:
        return False
    selected = ppo_metrics.get(S.SELECTED_UPDATE)
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(7.2, 1.9 + 1.6 * len(panels)), dpi=100, squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], panels):
        pts = [(p["update"], p[key]) for p in curve if _num(p.get(key))]
        ax.plot([u for u, _ in pts], [v for _, v in pts], "-o", ms=3, color={"rm_score": "C0", "gold_score": "C2"}.get(key, "C4"))
        if selected is not None:
            ax.axvline(selected, color="C3", ls="--", lw=1, label=f"published (update {selected})")
        first_flag = next((p["update"] for p in curve if p.get("flags")), None)
        if first_flag is not None:
            ax.axvline(first_flag, color="C1", ls=":", lw=1.5, label=f"first drift flag (update {first_flag})")
        if key == "kl" and _num(ppo_metrics.get(S.KL_BUDGET)):
            ax.axhline(ppo_metrics[S.KL_BUDGET], color="grey", ls=":", lw=1.2, label=f"KL budget ({ppo_metrics[S.KL_BUDGET]:g})")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title("Held-out evaluations during PPO")
    axes[0, 0].legend(fontsize=8, loc="best")
    if panels[-1][0] == "kl" and _num(ppo_metrics.get(S.KL_BUDGET)):
        axes[-1, 0].legend(fontsize=8, loc="best")
    axes[-1, 0].set_xlabel("PPO update (0 = the SFT policy)")
    return _save(fig, path)


def best_of_n_at_kl(bon: list[dict], kl: float, key: str) -> float | None:
    """The best-of-n baseline's `key` at KL `kl`, interpolated linearly between the two n whose
    analytic KL brackets it; None outside the range of n that was run."""
    pts = sorted((b["kl"], b[key]) for b in bon if _num(b.get("kl")) and _num(b.get(key)))
    for (k0, v0), (k1, v1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1:
            return v0 if k1 == k0 else v0 + (v1 - v0) * (kl - k0) / (k1 - k0)
    return None


def _g(v: float) -> str:
    return f"{v:.3g}"


def verdict(summary: dict) -> str:
    """The report's first paragraph: what PPO did, in the figures of summary.json: the score gain
    (gold when there is a gold scorer, else the RM's), the win rate, the KL against its budget, and
    best-of-n at the same KL (or its largest n when PPO's KL lies beyond it)."""
    stages = summary.get("stages", {})
    if not _num(summary.get("kl_ppo_vs_sft")):
        done = [s for s, state in stages.items() if state == "complete"]
        if not done:
            return "No stage has published a result yet."
        rm = (f" The reward model ranks {summary['rm_eval_accuracy']:.1%} of the held-out pairs correctly."
              if _num(summary.get("rm_eval_accuracy")) else "")
        return f"Complete: {', '.join(done)}; PPO has not published a policy yet.{rm}"
    gold = _num(summary.get("gold_score_ppo")) and _num(summary.get("gold_score_sft"))
    key, name = ("gold_score", "gold score") if gold else ("rm_score", "RM score (raw)")
    before, after = summary[f"{key}_sft"], summary[f"{key}_ppo"]
    kl = summary["kl_ppo_vs_sft"]
    est = summary.get("advantage_estimator")
    k = summary.get("samples_per_prompt", 1)
    how = f" ({est}, {k} sample{'s' if k != 1 else ''} per prompt)" if est else ""
    verb = "raised" if after > before else "lowered" if after < before else "left"
    text = f"PPO{how} {verb} the {name} from {_g(before)} (SFT) to {_g(after)}"
    if gold and _num(summary.get("gold_gain_in_sft_std")):
        text += f", {summary['gold_gain_in_sft_std']:+.2f} SFT standard deviations"
    text += f", at a KL to the SFT policy of {_g(kl)} nats per response"
    if _num(summary.get("kl_budget")):
        text += f" (budget {_g(summary['kl_budget'])})"
    text += "."
    win = summary.get("win_rate_gold" if gold else "win_rate_rm")
    if _num(win):
        text += f" It beats the SFT policy on {win:.0%} of the held-out prompts under the {'gold scorer' if gold else 'reward model'}"
        text += (f" ({summary['win_rate_rm']:.0%} under the reward model)." if gold and _num(summary.get("win_rate_rm"))
                 else ".")
    at = summary.get("best_of_n_at_ppo_kl") or {}
    top = summary.get("best_of_n_top") or {}
    if _num(at.get(key)):
        diff = after - at[key]
        text += (f" Best-of-n of SFT samples at the same KL scores {_g(at[key])} (interpolated): PPO is "
                 f"{'ahead by' if diff >= 0 else 'behind by'} {_g(abs(diff))}.")
    elif _num(top.get(key)) and _num(top.get("kl")):
        diff = after - top[key]
        text += (f" Best-of-{top['n']}, the strongest baseline run, scores {_g(top[key])} at KL {_g(top['kl'])}: "
                 f"PPO is {'ahead by' if diff >= 0 else 'behind by'} {_g(abs(diff))}"
                 f"{' with more KL' if kl > top['kl'] else ' with less KL'}.")
    if _num(at.get(key)) and after < at[key] or (not _num(at.get(key)) and _num(top.get(key)) and after < top[key]
                                                 and kl >= top.get("kl", 0)):
        text += " Best-of-n gets more for less KL here: see the README's \"What to tune first\"."
    return text


# ----------------------------------------------------------------- reward-model diagnostics

def calibration_plot(path: Path, bins: list[dict], ece: float | None) -> bool:
    """Reliability diagram of P(chosen > rejected) on the held-out pairs (folded: confidence in
    [0.5, 1], see rlhf.reward_training.calibration): accuracy per bin against its mean
    confidence, the diagonal of perfect calibration, and the pairs per bin below."""
    if not bins or not any(b.get("count") for b in bins):
        return False
    plt = _pyplot()
    fig, (ax, axc) = plt.subplots(2, 1, sharex=True, figsize=(6.4, 4.8), dpi=100, gridspec_kw={"height_ratios": [3, 1]})
    full = [b for b in bins if b["count"]]
    width = bins[0]["hi"] - bins[0]["lo"]
    ax.bar([b["lo"] for b in full], [b["accuracy"] for b in full], width=width, align="edge", color="C0", alpha=0.35,
           edgecolor="C0", label="empirical accuracy per bin")
    ax.plot([b["confidence"] for b in full], [b["accuracy"] for b in full], "o", color="C0", ms=4,
            label="bin's mean predicted vs empirical")
    ax.plot([0.5, 1.0], [0.5, 1.0], "--", color="grey", label="perfect calibration")
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel("accuracy: chosen ranked higher")
    ax.set_title("RM reliability on held-out pairs" + (f" (ECE {ece:.3f})" if _num(ece) else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    bars = axc.bar([b["lo"] for b in bins], [b["count"] for b in bins], width=width, align="edge", color="grey", alpha=0.6)
    axc.bar_label(bars, fontsize=7)
    axc.set_ylim(0, max(b["count"] for b in bins) * 1.35)
    axc.set_ylabel("pairs")
    axc.set_xlabel("predicted P(model's favourite is the chosen one) = sigmoid(|r_chosen - r_rejected|)")
    axc.grid(alpha=0.3)
    return _save(fig, path)


def reward_hist_plot(path: Path, hist: dict) -> bool:
    """Histograms of the RM's rewards of the chosen and of the rejected held-out responses."""
    edges = hist.get("edges") or []
    if len(edges) < 2:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SMALL, dpi=100)
    for key, color in (("chosen", "C2"), ("rejected", "C3")):
        counts = hist[key]
        ax.stairs(counts, edges, fill=True, alpha=0.3, color=color)
        ax.stairs(counts, edges, color=color, label=f"{key} ({sum(counts)})")
        total = sum(counts)
        if total:
            mids = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
            mean = sum(m * c for m, c in zip(mids, counts)) / total
            ax.axvline(mean, color=color, ls="--", lw=1)
    ax.set_title("RM rewards on held-out pairs: chosen vs rejected (dashed: means)")
    ax.set_xlabel("reward (raw RM output)")
    ax.set_ylabel("responses")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def length_plot(path: Path, points: dict, corr: float | None, corr_sft: float | None) -> bool:
    """Reward against response length (tokens) for held-out responses and fresh SFT samples,
    each with its least-squares line and Pearson r (lengths jittered by up to +-0.2 to show overlaps)."""
    sources = [(k, lab, c, color) for k, lab, c, color in
               (("held_out", "held-out pair responses", corr, "C0"), ("sft", "fresh SFT samples", corr_sft, "C2"))
               if points.get(k) and points[k].get("length")]
    if not sources:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SMALL, dpi=100)
    jitter = random.Random(0)
    for key, label, c, color in sources:
        xs, ys = points[key]["length"], points[key]["reward"]
        ax.scatter([x + jitter.uniform(-0.2, 0.2) for x in xs], ys, s=6, alpha=0.35, color=color,
                   label=f"{label} (Pearson r = {c:.2f})" if _num(c) else label)
        n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        if n > 1 and sxx > 0:
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
            lo, hi = min(xs), max(xs)
            ax.plot([lo, hi], [my + slope * (lo - mx), my + slope * (hi - mx)], color=color, lw=1.5)
    ax.set_title("RM reward against response length")
    ax.set_xlabel("response length (tokens, EOS not counted)")
    ax.set_ylabel("reward (raw RM output)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# ----------------------------------------------------------------- per stage (also for W&B)

def stage_charts(stage: str, metrics: dict, out: Path, ppo_rows: list[dict] = ()) -> dict[str, Path]:
    """The report's charts of one stage's published metrics, written into `out`: {name: PNG}. `build`
    draws the report's with them, and the reward and PPO stages log them to W&B
    (rlhf.tracking.Tracker.charts). `ppo_rows`: DIR/metrics/ppo.jsonl, which the over-optimisation
    chart falls back to when there are no held-out evaluations."""
    out = Path(out)
    made: dict[str, Path] = {}
    if stage == "ppo":
        charts = (("score_vs_kl", lambda p: overoptimisation_plot(p, metrics, list(ppo_rows))),
                  ("eval_vs_update", lambda p: eval_curve_plot(p, metrics)))
    elif stage == "reward":
        charts = (("rm_calibration", lambda p: calibration_plot(p, metrics.get("calibration_bins") or [],
                                                                metrics.get(S.CALIBRATION_ECE))),
                  ("rm_reward_hist", lambda p: reward_hist_plot(p, metrics.get("reward_histogram") or {})),
                  ("rm_length", lambda p: length_plot(p, metrics.get("length_reward_points") or {},
                                                      metrics.get(S.LENGTH_REWARD_CORR),
                                                      metrics.get(S.LENGTH_REWARD_CORR_SFT))))
    else:
        charts = ()
    for name, draw in charts:
        if draw(out / f"{name}.png"):
            made[name] = out / f"{name}.png"
    return made


def stage_tables(stage: str, metrics: dict) -> dict[str, tuple[list[str], list[list]]]:
    """The data behind the report's charts and tables of one stage: {name: (columns, rows)}; a
    chart's data is named after the chart with `_data` (W&B keys: images and tables apart)."""
    tables: dict[str, tuple[list[str], list[list]]] = {}
    if stage == "ppo":
        curve = metrics.get(S.EVAL_CURVE) or []
        if curve:
            cols = ["update", "kl", "sqrt_kl", "rm_score", "gold_score", "response_length", "eos_rate"]
            tables["eval_curve"] = (cols, [[p.get("update"), p.get("kl"), _sqrt_kl(p["kl"]) if _num(p.get("kl")) else None,
                                            p.get("rm_score"), p.get("gold_score"), p.get("response_length"),
                                            p.get("eos_rate")] for p in curve])
        bon = metrics.get(S.BEST_OF_N) or []
        if bon:
            tables["best_of_n"] = (["n", "kl", "sqrt_kl", "rm_score", "gold_score"],
                                   [[b.get("n"), b.get("kl"), _sqrt_kl(b["kl"]) if _num(b.get("kl")) else None,
                                     b.get("rm_score"), b.get("gold_score")] for b in bon])
    elif stage == "reward":
        bins = metrics.get("calibration_bins") or []
        if bins:
            tables["rm_calibration_data"] = (["lo", "hi", "pairs", "confidence", "accuracy"],
                                        [[b.get("lo"), b.get("hi"), b.get("count"), b.get("confidence"), b.get("accuracy")]
                                         for b in bins])
        hist = metrics.get("reward_histogram") or {}
        edges = hist.get("edges") or []
        if len(edges) > 1:
            tables["rm_reward_hist_data"] = (["lo", "hi", "chosen", "rejected"],
                                        [[a, b, c, r] for a, b, c, r in zip(edges, edges[1:], hist.get("chosen") or [],
                                                                             hist.get("rejected") or [])])
        pts = metrics.get("length_reward_points") or {}
        rows = [[src, x, y] for src in ("held_out", "sft") for x, y in
                zip((pts.get(src) or {}).get("length") or [], (pts.get(src) or {}).get("reward") or [])]
        if rows:
            tables["rm_length_data"] = (["source", "length", "reward"], rows)
    return tables


# ----------------------------------------------------------------- the report

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
    ppo_cfg = ((manifests.get("ppo") or {}).get("config") or {}).get("ppo") or {}
    if ppo_cfg:  # what produced the PPO figures (manifests from before the estimators read as gae, k = 1)
        summary["advantage_estimator"] = ppo_cfg.get("advantage_estimator", "gae")
        summary["samples_per_prompt"] = ppo_cfg.get("samples_per_prompt", 1)
    bon = ((manifests.get("ppo") or {}).get("metrics") or {}).get(S.BEST_OF_N) or []
    if bon:  # the strongest baseline, beside PPO's published figures
        top = max(bon, key=lambda r: r["n"])
        summary["best_of_n_top"] = {k: top.get(k) for k in ("n", "kl", "rm_score", "gold_score")}
    if bon and _num(summary.get("kl_ppo_vs_sft")):  # the baseline where PPO's published policy is
        at = {k: best_of_n_at_kl(bon, summary["kl_ppo_vs_sft"], k) for k in ("rm_score", "gold_score")}
        if any(v is not None for v in at.values()):
            summary["best_of_n_at_ppo_kl"] = {"kl": summary["kl_ppo_vs_sft"], **at}
    origins = {s: artifacts.origin(manifests.get(s)) for s in (artifacts.SFT, artifacts.REWARD)}
    if any(origins.values()):  # where the policy and the reward model came from
        summary["models"] = {s: o for s, o in origins.items() if o}
    summary["verdict"] = verdict(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    ppo, rm, sft = (read_metrics(artifact_dir, s) for s in ("ppo", "reward", "sft"))
    pm = (manifests.get("ppo") or {}).get("metrics", {})
    rmm = (manifests.get("reward") or {}).get("metrics", {})
    plots: dict[str, list[tuple[str, str]]] = {"overopt": [], "ppo": [], "rm": [], "training": []}
    ev = ((manifests.get("ppo") or {}).get("config") or {}).get("eval") or {}
    captions = {"score_vs_kl": "Over-optimisation chart. Top: the proxy reward PPO maximises; bottom: the score it "
                               "stands for (gold). A gold curve that bends down while the proxy still rises is reward "
                               "over-optimisation; best-of-n is the baseline at the same KL. "
                               + ("Last panel: the reward ensemble in its members' SFT units, their mean with +-1 spread, "
                                  "the conservative score the guard selects by without gold, and the held-out member. "
                                  if any(p.get("conservative_score") is not None for p in pm.get(S.EVAL_CURVE) or []) else "")
                               + ("Crosses: evaluations whose drift signals flagged exploitation (see the warnings). "
                                  if any(p.get("flags") for p in pm.get(S.EVAL_CURVE) or []) else "")
                               + _best_of_n_prompts_note(ev, pm),
                "eval_vs_update": "The same held-out evaluations against the update: the gold score turning down "
                                  "while the RM score still rises is the over-optimisation turn.",
                "rm_calibration": "Reliability diagram: bars on the diagonal mean P(chosen > rejected) is calibrated; "
                                  "below it, over-confident.",
                "rm_reward_hist": "The further apart, the better the RM separates the pairs.",
                "rm_length": "Up to 512 points per source; lines: least-squares fits. A steep line means the RM pays "
                             "for length, and PPO will learn to change length."}
    for name, png in stage_charts("ppo", pm, out, ppo).items():
        plots["overopt"].append((png.name, captions[name]))
    if _plot(out / "ppo_scores.png", "RM score and RLHF reward per update", "PPO update",
             [(f"{PPO.SCORES} (normalised RM score)", *_series(ppo, PPO.SCORES)),
              (f"{PPO.RLHF_REWARD} (score - beta x KL)", *_series(ppo, PPO.RLHF_REWARD))],
             ylabel="normalised RM units"):
        plots["ppo"].append(("ppo_scores.png", "Training rollouts: the normalised RM score PPO maximises (the raw "
                             "score standardised with the reward stage's statistics) and the KL-penalised reward."))
    if kl_plot(out / "ppo_kl.png", _series(ppo, PPO.KL), _series(ppo, PPO.KL_COEF)):
        plots["ppo"].append(("ppo_kl.png", "Training rollouts: KL per response (left axis, nats) and the KL "
                             "coefficient beta (right axis)."))
    for name, png in stage_charts("reward", rmm, out).items():
        plots["rm"].append((png.name, captions[name]))
    rm_lines = [("train accuracy", *_series(rm, HF.TRAIN_ACCURACY))]
    ex, ey = _series(rm, HF.EVAL_ACCURACY)
    rm_lines.append(("held-out accuracy", ex, ey))
    if _plot(out / "rm_accuracy.png", "Reward model pairwise accuracy", "RM optimizer step", rm_lines):
        plots["rm"].append(("rm_accuracy.png", "Pairwise accuracy while training."))
    if losses_plot(out / "losses.png",
                   [("SFT loss (cross-entropy, nats/token)", "SFT optimizer step", _series(sft, HF.TRAIN_LOSS)),
                    ("RM loss (Bradley-Terry, nats/pair)", "RM optimizer step", _series(rm, HF.TRAIN_LOSS)),
                    ("PPO policy loss", "PPO update", _series(ppo, PPO.POLICY_LOSS)),
                    ("PPO value loss", "PPO update", _series(ppo, PPO.VALUE_LOSS)),
                    ("PPO KL loss term (before beta)", "PPO update", _series(ppo, PPO.KL_LOSS))]):
        plots["training"].append(("losses.png", "Losses of the three stages, one panel each (each against its own steps)."))

    samples_path = artifacts.stage_dir(artifact_dir, "ppo") / artifacts.SAMPLES
    samples = [json.loads(ln) for ln in samples_path.read_text().splitlines()[:20]] if samples_path.is_file() else []
    (out / "index.html").write_text(_html(artifact_dir, summary, plots, samples, out))
    return out


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def _figures(plots: list[tuple[str, str]], where: Path | None = None) -> str:
    """The plots as figures whose images are inside the page (data: URIs), so index.html is one
    self-contained file; the PNGs stay beside it. `where`: the directory holding them."""
    out = []
    for p, c in plots:
        src = p
        if where is not None and (where / p).is_file():
            src = "data:image/png;base64," + base64.b64encode((where / p).read_bytes()).decode("ascii")
        out.append(f'<figure><img src="{src}" alt="{html.escape(p)}" title="{html.escape(p)}">'
                   f'<figcaption>{html.escape(c)} <span class="file">({html.escape(p)})</span></figcaption></figure>')
    return "".join(out)


def _html(artifact_dir: Path, summary: dict, plots: dict, samples: list[dict], where: Path | None = None) -> str:
    e = html.escape
    stages = " · ".join(f"{e(s)}: <b>{e(str(v))}</b>" for s, v in summary["stages"].items())
    figures = "".join(f"<tr><td>{e(LABELS.get(k, k))}</td><td><code>{e(k)}</code></td><td>{_fmt(v)}</td></tr>"
                      for k, v in summary.items() if _num(v))
    warn = list(summary.get("rm_warnings") or []) + list(summary.get("ppo_warnings") or [])
    selected = summary.get("selected_update")
    if summary.get("stop_reason") not in (None, "completed"):
        warn.append(f"PPO stopped early ({summary['stop_reason']}) after update {summary.get('updates')}.")
    warnings = "".join(f'<p class="warn">{e(w)}</p>' for w in warn)
    names = {"sft": "Policy (SFT)", "reward": "Reward model"}
    models = ("<p>" + "<br>".join(f"{names[s]}: {e(o)}" for s, o in summary["models"].items()) + "</p>"
              if summary.get("models") else "")
    selection = ""
    if selected is not None:
        guard = summary.get("guard_metric")
        est, k = summary.get("advantage_estimator"), summary.get("samples_per_prompt")
        trained = f" (advantages: <code>{e(str(est))}</code>, {k} sample{'s' if k != 1 else ''} per prompt)" if est else ""
        selection = (f"<p>Published policy{trained}: update <b>{selected}</b> of {summary.get('updates', '?')}, "
                     + (e(summary["guard_reason"]) if summary.get("guard_reason") else
                        f"the best <code>{e(guard)}</code> among the evaluations within the KL budget"
                        if guard else "the last update")
                     + f"; stop reason: <code>{e(str(summary.get('stop_reason')))}</code>.</p>")
    curve = summary.get("eval_curve") or []
    curve_rows = "".join(
        f"<tr{' class=sel' if p.get('update') == selected else ''}><td>{p.get('update')}</td><td>{_fmt(p.get('kl'))}</td>"
        f"<td>{_fmt(_sqrt_kl(p['kl']) if _num(p.get('kl')) else None)}</td><td>{_fmt(p.get('rm_score'))}</td>"
        f"<td>{_fmt(p.get('gold_score'))}</td><td>{_fmt(p.get('response_length'))}</td><td>{_fmt(p.get('eos_rate'))}</td>"
        f"<td>{_fmt(p.get('conservative_score'))}</td><td>{e(', '.join(p.get('flags') or []))}</td></tr>"
        for p in curve)
    curve_table = ("<h3>Held-out evaluations during PPO</h3><table><tr><th>update</th><th>KL [nats/response]</th>"
                   "<th>sqrt KL</th><th>RM score (raw)</th><th>gold score</th><th>length [tokens]</th><th>EOS rate</th>"
                   "<th>conservative score</th><th>drift flags</th>"
                   "</tr>" + curve_rows + "</table>"
                   if curve else "")
    bon = summary.get("best_of_n") or []
    bon_table = ("<h3>Best-of-n baseline (SFT samples, the RM's favourite of n)</h3><table><tr><th>n</th>"
                 "<th>KL (analytic) [nats/response]</th><th>RM score (raw)</th><th>gold score</th></tr>"
                 + "".join(f"<tr><td>{b.get('n')}</td><td>{_fmt(b.get('kl'))}</td><td>{_fmt(b.get('rm_score'))}</td>"
                           f"<td>{_fmt(b.get('gold_score'))}</td></tr>" for b in bon) + "</table>" if bon else "")
    ppo_html = (f"""{selection}<div class="row">{_figures(plots['overopt'], where)}<div>{curve_table}{bon_table}</div></div>
<h3>Training rollouts</h3>{_figures(plots['ppo'], where)}""" if selection or plots["overopt"] or plots["ppo"]
                else "<p>No PPO results yet.</p>")
    has_gold = any("gold_score" in s for s in samples)
    sample_rows = "".join(
        f"<tr><td>{e(s['prompt'])}</td><td>{e(s.get('sft_response', ''))}</td><td>{e(s['response'])}</td>"
        f"<td>{_fmt(s.get('rm_score_sft'), 3)}</td><td>{_fmt(s.get('rm_score'), 3)}</td>"
        + (f"<td>{_fmt(s.get('gold_score_sft'), 3)}</td><td>{_fmt(s.get('gold_score'), 3)}</td>" if has_gold else "")
        + "</tr>" for s in samples)
    gold_heads = "<th>gold SFT</th><th>gold PPO</th>" if has_gold else ""
    samples_html = (f"<p>The first {len(samples)} held-out prompts of <code>ppo/samples.jsonl</code>: the published "
                    f"policy{f' (update {selected})' if selected is not None else ''} and the SFT policy, sampled "
                    f"with the same seed.</p><table><tr><th>prompt</th><th>SFT response</th><th>PPO response</th>"
                    f"<th>RM SFT (raw)</th><th>RM PPO (raw)</th>{gold_heads}</tr>{sample_rows}</table>"
                    if samples else "<p>No samples (no <code>ppo/samples.jsonl</code>).</p>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>RLHF report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1500px;color:#222}}table{{border-collapse:collapse;margin:0.5em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px;vertical-align:top}}th{{background:#f3f3f3}}
tr.sel td{{background:#fff3c4;font-weight:bold}}figure{{display:inline-block;margin:0.5em;vertical-align:top;max-width:740px}}
figcaption{{font-size:13px;color:#555;max-width:720px}}.warn{{background:#fff0f0;border-left:4px solid #c33;padding:6px 10px}}
code{{font-size:13px}}.verdict{{font-size:17px;max-width:1100px;background:#f4f8ff;border-left:4px solid #36c;padding:8px 12px}}
.file{{color:#999}}.row{{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}}</style></head>
<body><h1>RLHF report</h1><p><code>{e(str(artifact_dir))}</code></p>
<p class="verdict">{e(summary.get("verdict", ""))}</p>
<p>Stages: {stages}</p>{models}{warnings}
<h2>Key figures</h2><table><tr><th>figure</th><th>summary.json key</th><th>value</th></tr>{figures}</table>
<h2>PPO: over-optimisation and the published policy</h2>{ppo_html}
<h2>Reward model diagnostics</h2>{_figures(plots['rm'], where)}
<h2>Training curves</h2>{_figures(plots['training'], where)}
<h2>Samples from the published policy</h2>{samples_html}
</body></html>"""

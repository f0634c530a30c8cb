"""`rlhf compare DIR1 DIR2 ...`: the PPO stages of several artifact directories (runs of one task,
e.g. one per advantage estimator) on one over-optimisation chart, with a table of each run's
published policy and of the best-of-n baseline, printed and written as JSON beside the chart.

The runs are read from their PPO manifests only (`eval_curve`, `best_of_n` and the final
evaluation's figures), so a comparison costs no model loading."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rlhf import artifacts
from rlhf.artifacts import ArtifactError
from rlhf.metric_names import Summary as S
from rlhf.report import _num, _pyplot, _save, _sqrt_kl


@dataclass(frozen=True)
class Run:
    """One artifact directory's published PPO stage, as the comparison reads it."""

    directory: Path
    label: str                  # the legend's and the table's name for the run
    estimator: str              # ppo.advantage_estimator (gae in manifests older than the option)
    k: int                      # ppo.samples_per_prompt (1 in manifests older than the option)
    metrics: dict               # the PPO manifest's metrics
    reward_sha256: str | None   # the manifest of the RM that PPO maximised: RM scores compare under one RM only

    @property
    def curve(self) -> list[dict]:
        """The held-out evaluations with a KL (update 0 = the SFT policy)."""
        return [p for p in self.metrics.get(S.EVAL_CURVE) or [] if _num(p.get("kl"))]

    @property
    def best_of_n(self) -> list[dict]:
        return [b for b in self.metrics.get(S.BEST_OF_N) or [] if _num(b.get("kl"))]

    @property
    def published(self) -> dict:
        """The published update's held-out evaluation: where the chart marks the run's policy."""
        sel = self.metrics.get(S.SELECTED_UPDATE)
        return next((p for p in self.curve if p.get("update") == sel), {})


def load_run(directory: Path, label: str | None = None) -> Run:
    """DIR's published PPO stage, labelled `label` or `<DIR's name> (<estimator>, k=<k>)`. An
    ArtifactError that says what to do when DIR holds no complete PPO stage, or one without
    held-out evaluations (no curve to draw)."""
    directory = Path(directory)
    ppo = artifacts.stage_dir(directory, artifacts.PPO)
    m = artifacts.read_manifest(ppo)
    if m is None or m.get("status") != "complete" or m.get("stage") != artifacts.PPO:
        if (artifacts.read_manifest(directory) or {}).get("stage") == artifacts.PPO:
            raise ArtifactError(f"{directory} is a PPO stage directory; pass the artifact directory that holds it: "
                                f"{directory.parent}")
        raise ArtifactError(f"{directory} holds no complete PPO stage ({ppo / artifacts.MANIFEST} is missing, "
                            f"unreadable or not 'complete'): run the pipeline's PPO stage there first "
                            f"(rlhf pipeline CONFIG artifact_dir={directory})")
    cfg = (m.get("config") or {}).get("ppo") or {}
    estimator, k = cfg.get("advantage_estimator", "gae"), int(cfg.get("samples_per_prompt", 1))
    reward = next((p.get("manifest_sha256") for p in m.get("parents") or [] if p.get("stage") == artifacts.REWARD), None)
    run = Run(directory, label or f"{directory.resolve().name} ({estimator}, k={k})", estimator, k,
              m.get("metrics") or {}, reward)
    if not run.curve:
        raise ArtifactError(f"{ppo / artifacts.MANIFEST} has no held-out evaluations (empty {S.EVAL_CURVE}), so no "
                            f"curve to compare: give PPO held-out prompts (ppo.eval_prompts) and re-run its PPO stage")
    return run


def best_of_n_groups(runs: list[Run]) -> list[tuple[list[dict], list[Run]]]:
    """The distinct best-of-n baselines, each with the runs that share it. Runs of one SFT policy,
    RM and held-out prompts share one (same prompts, same seed); a second baseline means the runs
    differ in one of these, and their scores are not measured alike."""
    groups: list[tuple[list[dict], list[Run]]] = []
    for run in runs:
        same = next((g for g in groups if _best_of_n_key(g[0]) == _best_of_n_key(run.best_of_n)), None)
        if same:
            same[1].append(run)
        elif run.best_of_n:
            groups.append((run.best_of_n, [run]))
    return groups


def _best_of_n_key(bon: list[dict]) -> list[tuple]:
    return [(b.get("n"), round(b["kl"], 6), b.get("rm_score"), b.get("gold_score")) for b in bon]


# ----------------------------------------------------------------- the table

def rows(runs: list[Run]) -> dict:
    """What the table prints and `<out>.json` holds: each run's published policy (the final
    evaluation's figures on the held-out prompts) and each distinct best-of-n baseline."""
    return {
        "runs": [{"label": r.label, "dir": str(r.directory), "estimator": r.estimator, "k": r.k,
                  "selected_update": r.metrics.get(S.SELECTED_UPDATE), "kl": r.metrics.get(S.KL_PPO_VS_SFT),
                  "rm_score": r.metrics.get(S.RM_SCORE_PPO), "gold_score": r.metrics.get(S.GOLD_SCORE_PPO),
                  "win_rate_gold": r.metrics.get(S.WIN_RATE_GOLD), "eval_prompts": r.metrics.get(S.EVAL_PROMPTS)}
                 for r in runs],
        "best_of_n": [{"runs": [r.label for r in group],
                       "rows": [{k: b.get(k) for k in ("n", "kl", "rm_score", "gold_score")} for b in bon]}
                      for bon, group in best_of_n_groups(runs)],
    }


def _cell(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _text_table(head: list[str], body: list[list]) -> str:
    """Columns padded to their widest cell; the first left-aligned, the others right-aligned."""
    cells = [head] + [[_cell(v) for v in row] for row in body]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


def table(data: dict) -> str:
    """`rows(runs)` as plain text: the runs, then each best-of-n baseline."""
    keys = ("label", "estimator", "k", "selected_update", "kl", "rm_score", "gold_score", "win_rate_gold")
    out = [_text_table(["run", "estimator", "k", "update", "KL", "RM score", "gold score", "gold win rate"],
                       [[r[k] for k in keys] for r in data["runs"]])]
    for g in data["best_of_n"]:
        who = "" if len(data["best_of_n"]) == 1 else f" of {', '.join(g['runs'])}"
        out.append(f"\nbest-of-n{who} (SFT samples, the RM's favourite of n; KL analytic)\n"
                   + _text_table(["n", "KL", "RM score", "gold score"],
                                 [[b[k] for k in ("n", "kl", "rm_score", "gold_score")] for b in g["rows"]]))
    return "\n".join(out)


# ----------------------------------------------------------------- the chart

def compare_plot(path: Path, runs: list[Run]) -> None:
    """RM score (top) and gold score (bottom; left out when no run has one) against sqrt(KL to the
    SFT policy), as rlhf.report.overoptimisation_plot draws one run: a curve of held-out
    evaluations per run with its published update starred, and the best-of-n baseline once (each
    distinct baseline, dashed in its first run's colour, when the runs' differ). The legend sits
    right of the panels: with several runs it would hide their curves."""
    groups = best_of_n_groups(runs)
    has_gold = any(_num(p.get("gold_score")) for r in runs for p in r.curve + r.best_of_n)
    panels = [("rm_score", "proxy: reward-model score (raw)")] + ([("gold_score", "gold score")] if has_gold else [])
    fig, axes = _pyplot().subplots(len(panels), 1, sharex=True, figsize=(10.0, 6.4) if has_gold else (10.0, 4.0),
                                   dpi=100, squeeze=False)
    for ax, (key, ylabel) in zip(axes[:, 0], panels):
        for i, run in enumerate(runs):
            pts = [(_sqrt_kl(p["kl"]), p[key]) for p in run.curve if _num(p.get(key))]
            if pts:
                ax.plot(*zip(*pts), "-o", color=f"C{i}", ms=3.5, lw=1.4, label=run.label)
        for j, (bon, group) in enumerate(groups):
            color = "dimgrey" if len(groups) == 1 else f"C{runs.index(group[0])}"
            bpts = [(_sqrt_kl(b["kl"]), b[key], b["n"]) for b in bon if _num(b.get(key))]
            if not bpts:
                continue
            label = ("best-of-n of SFT samples (analytic KL)" if len(groups) == 1 else f"best-of-n of {group[0].label}"
                     + (f" and {len(group) - 1} more" if len(group) > 1 else ""))
            ax.plot([p[0] for p in bpts], [p[1] for p in bpts], "--s", color=color, ms=3.5, lw=1.2, label=label)
            for x, y, n in bpts if j == 0 else []:  # one baseline's n labels: the others' sit on the same KLs
                ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(3, -10), fontsize=6.5, color=color)
        for i, run in enumerate(runs):  # last: the stars on top, and last in the legend
            pub = run.published
            if _num(pub.get(key)):
                x = _sqrt_kl(pub["kl"])
                ax.plot([x], [pub[key]], "*", color=f"C{i}", ms=15, mec="black", mew=0.6, zorder=5,
                        label="published policy (its update written beside)" if i == 0 else None)
                ax.annotate(str(pub["update"]), (x, pub[key]), textcoords="offset points", xytext=(6, 4), fontsize=7,
                            color=f"C{i}")
        ax.set_ylabel(ylabel)
        ax.margins(y=0.12)
        ax.grid(alpha=0.3)
    runs_n = f"{len(runs)} run{'s' if len(runs) > 1 else ''}"
    axes[0, 0].set_title(f"Over-optimisation, {runs_n}: score against sqrt(KL to the SFT policy)")
    axes[-1, 0].set_xlabel("sqrt(KL(policy || SFT)) per response  [sqrt(nats)]")
    axes[0, 0].legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)


# ----------------------------------------------------------------- the command

def compare(directories: list[Path], out: Path, labels: list[str] | None = None) -> dict:
    """Chart to `out`, rows to `out` with suffix .json, the table and any caveats printed; the rows.
    `labels`: one per directory, or None for the default ones. ArtifactError before anything is
    written when a directory has nothing to compare."""
    runs = [load_run(Path(d), label) for d, label in zip(directories, labels or [None] * len(directories), strict=True)]
    data = rows(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    compare_plot(out, runs)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    print(table(data))
    if len({r.reward_sha256 for r in runs} - {None}) > 1:
        print("\nnote: the runs maximised different reward models: their RM scores are on different scales "
              "(compare gold scores)")
    if len(data["best_of_n"]) > 1:
        print("\nnote: the runs' best-of-n baselines differ (a different SFT policy, reward model, held-out prompts "
              "or eval.best_of_n_prompts): each is drawn, dashed")
    print(f"\nchart: {out}  (rows: {out.with_suffix('.json')})")
    return data

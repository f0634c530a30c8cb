"""The pipeline's W&B workspace, as code (wandb-workspaces).

One workspace per W&B project ("RLHF pipeline"), a section per stage: PPO reward, KL,
held-out evaluation and optimisation panels against `episode` (rlhf.tracking defines every PPO
metric on that axis), the reward model's loss, accuracy and diagnostics, the report's charts
(images) and tables (held-out evaluations, best-of-n, the samples during training and the final
ones), and SFT's losses. Runs are not grouped (a group's runs would be drawn as their mean): each
run is one line, named <run_name>-<stage>.

`rlhf dashboard --artifact-dir DIR` writes the definition to DIR/report/wandb_workspace.json
(always) and, when W&B is online, creates the workspace or updates the one it made before.
Offline (the default) it prints the two commands that publish it later.

PANELS is the one list of panel metric keys; tests check each against the names the stages
really log (DIR/metrics/<stage>.jsonl)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf import artifacts
from rlhf.metric_names import HF, PPO, Eval, Summary

WORKSPACE_NAME = "RLHF pipeline"
DEFINITION_FILE = "wandb_workspace.json"


@dataclass(frozen=True)
class Panel:
    stage: str            # the stage whose metrics file logs `keys` (sft, reward, ppo)
    title: str
    keys: tuple[str, ...]
    kind: str = "line"    # line: history against the section's x axis; scalar: the run's last value;
                          # media: logged images (the report's charts); table: a logged W&B table


@dataclass(frozen=True)
class SectionSpec:
    name: str
    x: str                # x axis of the section's line plots: "episode" or "Step" (W&B's step)
    panels: tuple[Panel, ...]
    is_open: bool = True


def _ppo(title: str, *keys: str) -> Panel:
    return Panel("ppo", title, keys)


SECTIONS: tuple[SectionSpec, ...] = (
    SectionSpec("PPO: reward", "episode", (
        _ppo("RM score (normalised), per rollout", PPO.SCORES),
        _ppo("RLHF reward = score - KL penalty", PPO.RLHF_REWARD),
        _ppo("raw RM score, per rollout", PPO.RAW_SCORES),
        _ppo("KL penalty (non-score reward)", PPO.NON_SCORE_REWARD),
    )),
    SectionSpec("PPO: KL", "episode", (
        _ppo("KL(policy || SFT) per response", PPO.KL),
        _ppo("KL coefficient beta", PPO.KL_COEF),
        _ppo("approx. KL between PPO epochs", PPO.APPROXKL),
    )),
    SectionSpec("PPO: held-out evaluation", "episode", (
        _ppo("eval: RM score (proxy)", Eval.RM_SCORE),
        _ppo("eval: gold score", Eval.GOLD_SCORE),
        _ppo("eval: KL to SFT", Eval.KL_TO_SFT),
        _ppo("eval: response length", Eval.RESPONSE_LENGTH),
        _ppo("eval: EOS rate", Eval.EOS_RATE),
    )),
    SectionSpec("PPO: optimisation", "episode", (
        _ppo("policy loss", PPO.POLICY_LOSS),
        _ppo("value loss (gae)", PPO.VALUE_LOSS),
        _ppo("KL loss term (ppo.kl_penalty=loss)", PPO.KL_LOSS),
        _ppo("prompts whose k samples all scored the same", PPO.ZERO_STD_GROUPS),
        _ppo("clip fractions", PPO.CLIPFRAC, PPO.VALUE_CLIPFRAC),
        _ppo("entropy", PPO.ENTROPY, PPO.POLICY_ENTROPY),
        _ppo("probability ratio", PPO.RATIO),
        _ppo("learning rate", PPO.LR),
        _ppo("throughput (episodes/s)", PPO.EPISODES_PER_S),
    ), is_open=False),
    SectionSpec("Reward model", "Step", (
        Panel("reward", "RM train loss (RM runs)", (HF.TRAIN_LOSS,)),
        Panel("reward", "RM pairwise accuracy: train, held-out", (HF.TRAIN_ACCURACY, HF.EVAL_ACCURACY)),
        Panel("reward", "RM reward margin (train)", (HF.TRAIN_MARGIN,)),
    )),
    SectionSpec("Reward model diagnostics", "Step", (
        Panel("reward", "held-out pairwise accuracy", (HF.EVAL_ACCURACY,), "scalar"),
        Panel("reward", "calibration error (ECE)", (Summary.CALIBRATION_ECE,), "scalar"),
        Panel("reward", "Pearson(reward, length), held-out", (Summary.LENGTH_REWARD_CORR,), "scalar"),
        Panel("reward", "Pearson(reward, length), SFT samples", (Summary.LENGTH_REWARD_CORR_SFT,), "scalar"),
        Panel("reward", "Spearman(RM, gold), SFT samples", (Summary.SPEARMAN_GOLD,), "scalar"),
    )),
    SectionSpec("Report: charts and tables (end of each stage)", "Step", (
        Panel("ppo", "over-optimisation: score against sqrt(KL), PPO and best-of-n", ("report/score_vs_kl",), "media"),
        Panel("ppo", "held-out evaluations against the update", ("report/eval_vs_update",), "media"),
        Panel("ppo", "held-out evaluations (table)", ("report/eval_curve",), "table"),
        Panel("ppo", "best-of-n baseline (table)", ("report/best_of_n",), "table"),
        Panel("ppo", "final samples: published policy beside SFT", ("final_samples",), "table"),
        Panel("ppo", "samples during training (update is a column)", ("samples",), "table"),
        Panel("reward", "RM reliability diagram", ("report/rm_calibration",), "media"),
        Panel("reward", "RM rewards: chosen vs rejected", ("report/rm_reward_hist",), "media"),
        Panel("reward", "RM reward against length", ("report/rm_length",), "media"),
        Panel("reward", "RM calibration bins (table)", ("report/rm_calibration_data",), "table"),
        Panel("reward", "RM reward histogram (table)", ("report/rm_reward_hist_data",), "table"),
        Panel("reward", "RM reward and length points (table)", ("report/rm_length_data",), "table"),
    )),
    SectionSpec("SFT", "Step", (
        Panel("sft", "SFT train loss (SFT runs)", (HF.TRAIN_LOSS,)),
        Panel("sft", "SFT held-out loss", (HF.EVAL_LOSS,)),
        Panel("sft", "SFT token accuracy", (HF.TOKEN_ACCURACY,)),
        Panel("sft", "SFT learning rate", (HF.LEARNING_RATE,)),
    ), is_open=False),
)


def panel_keys(kinds: tuple[str, ...] = ("line", "scalar")) -> dict[str, set[str]]:
    """{stage: every key a panel of `kinds` shows}: the line and scalar panels' metrics are what the
    stages log to DIR/metrics/<stage>.jsonl; the media and table panels' keys are W&B-only."""
    out: dict[str, set[str]] = {}
    for section in SECTIONS:
        for p in section.panels:
            if p.kind in kinds:
                out.setdefault(p.stage, set()).update(p.keys)
    return out


def build_workspace(entity: str, project: str, name: str = WORKSPACE_NAME) -> Any:
    """The workspace (a wandb_workspaces.workspaces.Workspace); builds offline, saves nothing."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as e:  # a dependency of the project: pip install -e .
        raise RuntimeError("the W&B dashboard needs wandb-workspaces (pip install wandb-workspaces)") from e

    sections = []
    for s in SECTIONS:
        panels = []
        for p in s.panels:
            if p.kind == "scalar":
                panels.append(wr.ScalarChart(title=p.title, metric=p.keys[0]))
            elif p.kind == "media":
                panels.append(wr.MediaBrowser(title=p.title, media_keys=list(p.keys), num_columns=1))
            elif p.kind == "table":
                panels.append(wr.WeavePanelSummaryTable(table_name=p.keys[0]))
            else:
                panels.append(wr.LinePlot(title=p.title, x=s.x, y=list(p.keys), title_x=s.x))
        sections.append(ws.Section(name=s.name, panels=panels, is_open=s.is_open,
                                   panel_settings=ws.SectionPanelSettings(x_axis=s.x)))
    return ws.Workspace(
        entity=entity, project=project, name=name, sections=sections,
        settings=ws.WorkspaceSettings(x_axis="Step", max_runs=30),
        # no grouping: W&B draws a group's mean, so two pipelines under one run_name (or a stage run
        # twice) would show as one averaged line; each run is its own line, named <run_name>-<stage>
        runset_settings=ws.RunsetSettings(groupby=[]),
    )


def view_name(entity: str, project: str, name: str = WORKSPACE_NAME) -> str:
    """A stable internal view name ("nw-<id>-v"), so that a second push updates the first."""
    digest = hashlib.sha1(f"{entity}/{project}/{name}".encode()).hexdigest()[:11]
    return f"nw-rlhf{digest}-v"


def definition(workspace: Any) -> dict:
    """The workspace as W&B stores it (its view model, JSON-ready)."""
    return json.loads(workspace._to_model().model_dump_json(by_alias=True, exclude_none=True))


def load_definition(path: Path) -> Any:
    """A Workspace back from a written definition (what `push` saves)."""
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces.workspaces import internal

    view = internal.View.model_validate(json.loads(Path(path).read_text())["view"])
    return ws.Workspace._from_model(view)


def push(workspace: Any) -> str:
    """Create the workspace in W&B, or update the one a previous push created; returns its URL.
    Needs network and a W&B login."""
    from wandb_workspaces.workspaces import internal

    name = view_name(workspace.entity, workspace.project, workspace.name)
    try:
        existing = internal.get_view_dict(workspace.entity, workspace.project, name)
    except ValueError:  # no such view yet (or no such project: the save says which)
        existing = None
    workspace._internal_name = name
    workspace._internal_id = existing["id"] if existing else ""
    workspace.save()
    return workspace.url


def _pipeline_config(artifact_dir: Path) -> dict:
    """The resolved config of the newest published stage (PPO, else RM, else SFT)."""
    for stage in reversed(artifacts.STAGES):
        m = artifacts.read_manifest(artifacts.stage_dir(artifact_dir, stage))
        if m and m.get("config"):
            return m["config"]
    return {}


def run(artifact_dir: Path, *, project: str | None = None, entity: str | None = None, mode: str | None = None) -> int:
    """`rlhf dashboard`: write DIR/report/wandb_workspace.json; push it when W&B is online."""
    from rlhf.tracking import wandb_mode

    artifact_dir = Path(artifact_dir)
    cfg = _pipeline_config(artifact_dir)
    wcfg = cfg.get("wandb") or {}
    project = project or wcfg.get("project") or "rlhf"
    entity = entity or wcfg.get("entity")
    mode = mode or wandb_mode(wcfg.get("mode"))
    if mode == "online" and not entity:
        import wandb

        entity = wandb.Api().default_entity
    workspace = build_workspace(entity or "<your-entity>", project)
    out = artifacts.report_dir(artifact_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / DEFINITION_FILE
    path.write_text(json.dumps({"entity": entity, "project": project, "name": workspace.name,
                                "run_group": cfg.get("run_name"), "panel_keys": {k: sorted(v) for k, v in panel_keys().items()},
                                "view": definition(workspace)}, indent=1))
    print(f"workspace definition: {path} ({sum(len(s.panels) for s in SECTIONS)} panels in {len(SECTIONS)} sections)")
    if mode == "online":
        url = push(workspace)
        print(f"W&B workspace '{workspace.name}' saved: {url}")
        return 0
    runs = artifacts.wandb_dir(artifact_dir).resolve()
    where = f" --entity {entity}" if entity else ""
    print(f"W&B is {mode} here: nothing was uploaded. To publish the runs and this workspace from a machine with "
          f"network and a W&B login (`wandb login`):\n"
          f"  wandb sync --project {project}{where} {runs}/offline-run-*\n"
          f"  rlhf dashboard --artifact-dir {artifact_dir.resolve()} --push{where}")
    return 0

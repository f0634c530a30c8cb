"""Metrics: one JSON object per logged step in DIR/metrics/<stage>.jsonl, mirrored to W&B.

W&B runs offline by default (nothing needs a network): `wandb sync DIR/wandb/offline-run-*`
uploads them later. Mode: the config's wandb.mode, else WANDB_MODE, else online when an
API key is configured, else offline. Runs of one pipeline share a group (the run name);
each stage is one run with job_type = stage. Only rank 0 logs.
"""
from __future__ import annotations

import json
import math
import netrc
import os
from pathlib import Path
from typing import Any

from rlhf import artifacts


def wandb_mode(configured: str | None) -> str:
    if configured:
        return configured
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


SAMPLES_TABLE = "samples"            # PPO's samples during training: one table, the update a column
SAMPLE_COLUMNS = ("update", "prompt", "response", "rm_score")
FINAL_SAMPLES_TABLE = "final_samples"  # the published policy beside the SFT policy (ppo/samples.jsonl)

# W&B x axes per stage: {stage: {metric glob: step metric}}. Every PPO row carries `episode`
# (episodes done so far), so every PPO panel shares that axis, whatever the number of processes.
STEP_METRICS = {"ppo": {"*": "episode"}}


class Tracker:
    def __init__(self, artifact_dir: str | Path, stage: str, run_name: str, config: dict, wandb_cfg: Any,
                 enabled: bool = True, resume_step: int | None = None, clock: artifacts.StageClock | None = None):
        self.enabled = enabled
        self.stage = stage
        self.path = artifacts.metrics_path(artifact_dir, stage)
        self.clock = clock
        self._run = None
        self._sample_rows: list[list] = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            # a resumed run logs again what came after its checkpoint, and its own end-of-run rows
            self.path.write_text("".join(json.dumps(r) + "\n" for r in _rows(self.path)
                                         if r.get("step", 0) <= resume_step and not r.get("summary")))
        mode = wandb_mode(wandb_cfg.mode)
        if mode != "disabled":
            import wandb

            wdir = artifacts.wandb_dir(artifact_dir)
            wdir.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_SILENT", "true")
            self._run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, group=run_name, job_type=stage,
                                   name=f"{run_name}-{stage}", dir=str(Path(artifact_dir).resolve()), config=config,
                                   mode=mode, reinit="finish_previous")
            for key, axis in STEP_METRICS.get(stage, {}).items():
                self._run.define_metric(axis)
                self._run.define_metric(key, step_metric=axis)

    def log(self, metrics: dict, step: int, summary: bool = False) -> None:
        """One row in DIR/metrics/<stage>.jsonl (and W&B). `summary`: an end-of-run row (final
        evaluation, totals), which a resumed run replaces instead of repeating."""
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean, **({"summary": True} if summary else {})}) + "\n")
        if self.clock is not None:
            self.clock.tick()
        if self._run is not None:
            self._run.log(clean, step=step)

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        if self._run is not None:
            import wandb

            self._run.log({name: wandb.Table(columns=columns, data=rows)})

    def samples(self, update: int, rows: list[list], columns: tuple[str, ...] = SAMPLE_COLUMNS) -> None:
        """PPO's samples of the held-out prompts at `update`, added to the run's one `samples` table
        (the update is a column; each log holds every row so far, so W&B's table panel shows the
        latest with all updates in it)."""
        if self._run is None:
            return
        self._sample_rows.extend(rows)
        self.table(SAMPLES_TABLE, list(columns), self._sample_rows)

    def charts(self, stage: str, metrics: dict) -> None:
        """What the HTML report draws from this stage's published metrics, into W&B at the end of
        the stage: the report's charts as images (`report/<chart>`) and their data as tables
        (`report/<table>`), so the W&B run holds all the report does (rlhf.report renders both)."""
        if self._run is None:
            return
        import tempfile

        import wandb

        from rlhf import report

        with tempfile.TemporaryDirectory() as tmp:
            logged = {}
            for name, path in report.stage_charts(stage, metrics, Path(tmp)).items():
                logged[f"report/{name}"] = wandb.Image(str(path))
            for name, (columns, rows) in report.stage_tables(stage, metrics).items():
                logged[f"report/{name}"] = wandb.Table(columns=columns, data=rows)
            if logged:
                self._run.log(logged)

    def summary(self, metrics: dict) -> None:
        if self._run is not None:
            for k, v in metrics.items():
                self._run.summary[k] = _plain(v)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _rows(path: Path) -> list[dict]:
    """The rows of a metrics file; a line cut short by a kill (the last one) is left out."""
    out = []
    for ln in path.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except ValueError:
            continue
    return out


def read_metrics(artifact_dir: str | Path, stage: str) -> list[dict]:
    p = artifacts.metrics_path(artifact_dir, stage)
    return _rows(p) if p.exists() else []

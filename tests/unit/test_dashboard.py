"""The W&B workspace as code (rlhf.dashboard), built offline; its panels plot names the
pipeline logs (the slow check against real metrics files is in tests/stages/test_report_dashboard.py)."""
from __future__ import annotations

import inspect
import json
import re
from types import SimpleNamespace

import pytest

pytest.importorskip("wandb_workspaces")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # wandb-workspaces' own pydantic v1 validators

from rlhf import dashboard  # noqa: E402


def _panels(view: dict) -> list[tuple[str, dict]]:
    """(section name, panel) of every panel in a stored view."""
    sections = view["spec"]["section"]["panelBankConfig"]["sections"]
    return [(s["name"], p) for s in sections for p in s["panels"]]


def test_definition_builds_offline_with_every_declared_panel():
    view = dashboard.definition(dashboard.build_workspace("my-team", "rlhf"))
    assert view["entity"] == "my-team" and view["project"] == "rlhf" and view["displayName"] == "RLHF pipeline"
    panels = _panels(view)
    assert len(panels) == sum(len(s.panels) for s in dashboard.SECTIONS)
    plotted = {m for _, p in panels for m in p["config"].get("metrics", [])}
    assert plotted == set().union(*dashboard.panel_keys().values())
    # the report's charts (images) and tables, one panel each
    media = {m for _, p in panels for m in p["config"].get("mediaKeys", [])}
    assert media == set().union(*dashboard.panel_keys(("media",)).values()) == {
        "report/score_vs_kl", "report/eval_vs_update", "report/rm_calibration", "report/rm_reward_hist", "report/rm_length"}
    weave = [json.dumps(p["config"]) for _, p in panels if p["viewType"] == "Weave"]
    tables = set().union(*dashboard.panel_keys(("table",)).values())
    assert {"samples", "final_samples", "report/eval_curve", "report/best_of_n"} <= tables and len(weave) == len(tables)
    assert all(sum(f'"{t}"' in w for w in weave) == 1 for t in tables)
    # the metrics the brief of each section asks for
    must = {"objective/scores", "objective/rlhf_reward", "objective/raw_scores", "objective/kl", "objective/kl_coef",
            "eval/rm_score", "eval/gold_score", "eval/kl_to_sft", "eval/response_length", "eval/eos_rate",
            "calibration_ece", "length_reward_corr", "length_reward_corr_sft", "train/loss", "eval/loss"}
    assert must <= plotted
    # PPO sections plot against `episode`; runs are not grouped (W&B would draw a group's mean)
    sections = {s["name"]: s for s in view["spec"]["section"]["panelBankConfig"]["sections"]}
    for name, s in sections.items():
        if name.startswith("PPO"):
            assert s["localPanelSettings"]["xAxis"] == "episode"
            assert all(p["config"]["xAxis"] == "episode" for p in s["panels"])
    assert view["spec"]["section"]["runSets"][0].get("grouping", []) == []


def test_ppo_panel_keys_are_names_the_trainer_logs():
    from rlhf.metric_names import PPO, Eval
    from rlhf.ppo.trainer import PPOTrainer

    source = inspect.getsource(PPOTrainer._metrics)
    # the per-update names the trainer's metrics dict is built from (PPO.NAME: value)
    logged = {v for k, v in vars(PPO).items() if k.isupper() and re.search(rf"PPO\.{k}:", source)} | set(Eval.ALL)
    assert len(logged) > 20
    assert set(Eval.ALL) <= dashboard.panel_keys()["ppo"]
    assert dashboard.panel_keys()["ppo"] <= logged, dashboard.panel_keys()["ppo"] - logged


def test_rm_diagnostic_panels_are_keys_the_reward_stage_logs():
    from rlhf.reward_training import rm_diagnostics

    diag = rm_diagnostics(([1.0, 2.0], [0.0, 1.0], [1, 2], [2, 1]), ([1.0, 2.0], [1, 3]))
    scalars = {k for k, v in diag.items() if isinstance(v, float)}
    rm_scalar_panels = {p.keys[0] for s in dashboard.SECTIONS for p in s.panels if p.kind == "scalar"}
    # the stage logs its scalar metrics as they are, eval_* ones as eval/*
    assert rm_scalar_panels <= scalars | {"eval/accuracy", "spearman_gold"}


def test_offline_command_writes_the_definition_and_says_how_to_push(tmp_path, capsys, monkeypatch):
    from rlhf.cli import main

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "ppo").mkdir()
    (tmp_path / "ppo" / "rlhf_artifact.json").write_text(json.dumps(
        {"stage": "ppo", "config": {"run_name": "demo", "wandb": {"project": "proj", "entity": None, "mode": None}}}))
    assert main(["dashboard", "--artifact-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"wandb sync --project proj {tmp_path.resolve()}/wandb/offline-run-*" in out
    assert f"rlhf dashboard --artifact-dir {tmp_path.resolve()} --push" in out
    written = json.loads((tmp_path / "report" / "wandb_workspace.json").read_text())
    assert written["project"] == "proj" and written["run_group"] == "demo"
    assert written["panel_keys"] == {k: sorted(v) for k, v in dashboard.panel_keys().items()}
    # the file loads back into a workspace with the same sections and panels
    ws = dashboard.load_definition(tmp_path / "report" / "wandb_workspace.json")
    assert [(s.name, len(s.panels)) for s in ws.sections] == [(s.name, len(s.panels)) for s in dashboard.SECTIONS]


def test_push_creates_then_updates_the_same_view(monkeypatch):
    """push() without a network: W&B's GraphQL calls replaced by a fake store of views."""
    import wandb
    import wandb_workspaces.workspaces.interface as interface
    from wandb_workspaces.workspaces import internal

    store: dict[str, dict] = {}
    saved = []

    def get_view_dict(entity, project, name):
        if name not in store:
            raise ValueError(f"Workspace `{name}` not found in project `{project}`")
        return store[name]

    def upsert_view2(view):
        saved.append(view)
        store.setdefault(view.name, {"id": view.id or f"id-{len(store)}", "displayName": view.display_name})
        return {"upsertView": {"view": {"name": view.name, "id": store[view.name]["id"]}}}

    monkeypatch.setattr(internal, "get_view_dict", get_view_dict)
    monkeypatch.setattr(internal, "upsert_view2", upsert_view2)
    monkeypatch.setattr(wandb, "Api", lambda *a, **k: SimpleNamespace())
    monkeypatch.setattr(interface, "get_app_url", lambda api: "https://wandb.example")
    url = dashboard.push(dashboard.build_workspace("team", "proj"))
    assert saved[0].id == "" and saved[0].name == dashboard.view_name("team", "proj")
    assert url.startswith("https://wandb.example/team/proj?nw=")
    dashboard.push(dashboard.build_workspace("team", "proj"))
    assert saved[1].name == saved[0].name and saved[1].id == "id-0"   # an update of the first view
    assert len(store) == 1


def test_ppo_metrics_share_the_episode_axis(tmp_path, monkeypatch):
    """Tracker defines every PPO metric against `episode` in W&B (and nothing for other stages)."""
    import wandb

    from rlhf.tracking import Tracker

    calls: list[tuple] = []

    class FakeRun:
        def define_metric(self, name, **kw):
            calls.append((name, kw))

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: FakeRun())
    cfg = SimpleNamespace(project="p", entity=None, mode="offline")
    Tracker(tmp_path, "ppo", "demo", {}, cfg).finish()
    assert calls == [("episode", {}), ("*", {"step_metric": "episode"})]
    calls.clear()
    Tracker(tmp_path, "sft", "demo", {}, cfg).finish()
    assert calls == []

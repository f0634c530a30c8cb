"""Shared helpers: run a stage the way a user does (a subprocess), read artifacts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "launch" / "configs" / "demo.yaml"
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_stage(script: str, *overrides: str, timeout: int = 900, deepspeed_procs: int | None = None,
              port: int = 29611) -> subprocess.CompletedProcess:
    """`python launch/<script> --config demo.yaml ...`, or under `deepspeed --num_gpus N`."""
    if deepspeed_procs:
        cmd = ["deepspeed", "--num_gpus", str(deepspeed_procs), "--master_port", str(port)]
    else:
        cmd = [sys.executable]
    cmd += [str(ROOT / "launch" / script), "--config", str(DEMO), *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def manifest(d: Path, stage: str) -> dict:
    return json.loads((d / stage / "rlhf_artifact.json").read_text())


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The demo pipeline, one process, stage by stage (shared by the stage tests)."""
    d = tmp_path_factory.mktemp("demo")
    for script in ("sft.py", "rm.py", "ppo.py"):
        ok(run_stage(script, f"artifact_dir={d}"))
    return d


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-init checkpoints of gpt2, pythia, qwen2, llama3 and opt (tests/families.py), built once."""
    from families import FAMILIES, build_family

    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, root / name) for name in FAMILIES}

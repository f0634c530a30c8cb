"""The stage launchers need no `deepspeed` (nor the environment's python) on PATH: launch/_stage.sh runs
`$RLHF_PYTHON -m deepspeed.launcher.runner` and the pipeline driver names its own interpreter there,
so an environment that is not activated works. Fakes stand in for the interpreter and the stages."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf import cli, locking, report

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "launch" / "configs" / "demo.yaml"
BARE_PATH = "/usr/bin:/bin"  # neither this interpreter's bin directory nor pyenv's shims: no `deepspeed`


def fake_python(path: Path) -> Path:
    """An 'interpreter' that prints the arguments it was given, one a line; asked for the GPU count
    (`-c ...`), it answers FAKE_GPUS (1 when unset, as the launcher's probe prints on a machine
    without GPUs), or fails when FAKE_GPUS=fail."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nif [ \"$1\" = -c ]; then [ \"$FAKE_GPUS\" = fail ] && exit 1; echo \"${FAKE_GPUS:-1}\"; "
                    "exit 0; fi\nprintf '%s\\n' \"$@\"\n")
    path.chmod(0o755)
    return path


def launch(launcher: str, env: dict[str, str]) -> list[str]:
    proc = subprocess.run(["bash", str(REPO / "launch" / launcher), "CONFIG", "ppo.kl_coef=0.1"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.parametrize("launcher, script", [("sft.sh", "sft.py"), ("rm.sh", "rm.py"), ("ppo.sh", "ppo.py")])
@pytest.mark.parametrize("settings, flags", [
    ({}, ["--master_port", "29500", "--num_gpus", "1"]),
    ({"FAKE_GPUS": "8"}, ["--master_port", "29500", "--num_gpus", "8"]),  # every visible GPU by default
    ({"FAKE_GPUS": "fail"}, ["--master_port", "29500", "--num_gpus", "1"]),  # torch cannot tell: one process
    ({"FAKE_GPUS": "8", "NUM_GPUS": "2"}, ["--master_port", "29500", "--num_gpus", "2"]),
    ({"NUM_GPUS": "2", "MASTER_PORT": "29777"}, ["--master_port", "29777", "--num_gpus", "2"]),
    ({"HOSTFILE": "hosts"}, ["--master_port", "29500", "--hostfile", "hosts"]),  # the hostfile's slots decide
    ({"HOSTFILE": "hosts", "NUM_GPUS": "4"}, ["--master_port", "29500", "--hostfile", "hosts", "--num_gpus", "4"]),
])
def test_stage_launcher_runs_deepspeed_with_the_named_interpreter(tmp_path, launcher, script, settings, flags):
    python = fake_python(tmp_path / "venv" / "bin" / "python")
    argv = launch(launcher, {"PATH": BARE_PATH, "RLHF_PYTHON": str(python), **settings})
    assert argv == ["-m", "deepspeed.launcher.runner", *flags, str(REPO / "launch" / script), "--config", "CONFIG",
                    "ppo.kl_coef=0.1"]


def test_stage_launcher_defaults_to_python3_on_path(tmp_path):
    fake_python(tmp_path / "bin" / "python3")
    argv = launch("sft.sh", {"PATH": f"{tmp_path / 'bin'}:{BARE_PATH}"})
    assert argv[:2] == ["-m", "deepspeed.launcher.runner"]


def test_pipeline_launcher_runs_the_driver_with_the_named_interpreter(tmp_path):
    python = fake_python(tmp_path / "venv" / "bin" / "python")
    assert launch("pipeline.sh", {"PATH": BARE_PATH, "RLHF_PYTHON": str(python)}) == [
        "-m", "rlhf.cli", "pipeline", "CONFIG", "ppo.kl_coef=0.1"]


def test_deepspeed_runner_module_takes_the_launchers_flags():
    """The module _stage.sh runs exists in this interpreter and is DeepSpeed's launcher (the `deepspeed`
    script is `from deepspeed.launcher.runner import main; main()`), without PATH's help."""
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--help"], env={"PATH": BARE_PATH},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--master_port", "--num_gpus", "--hostfile", "--no_ssh", "--node_rank"):
        assert flag in proc.stdout


def test_pipeline_runs_its_stages_with_its_own_interpreter(tmp_path, monkeypatch):
    """Whatever RLHF_PYTHON or PATH say, the stages get the driver's interpreter (whose DeepSpeed it checked)."""
    monkeypatch.setenv("PATH", BARE_PATH)
    monkeypatch.setenv("RLHF_PYTHON", "/elsewhere/bin/python")
    monkeypatch.setattr(cli, "_stage_command", lambda *a: [sys.executable, "-c",
                                                           "import os; print('python=' + os.environ['RLHF_PYTHON'])"])
    monkeypatch.setattr(report, "build", lambda d: Path(d) / "report")
    assert cli._stage_env()[cli.PYTHON_ENV] == sys.executable
    art = tmp_path / "art"
    assert cli.run_pipeline(str(DEMO), [f"artifact_dir={art}"]) == 0
    for stage in cli.STAGE_LAUNCHERS:
        assert f"python={sys.executable}\n" in (art / "logs" / f"{stage}.log").read_text()


def test_pipeline_without_deepspeed_says_how_to_install_it_before_locking(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    monkeypatch.setattr(locking.DirLock, "acquire", lambda self: pytest.fail("locked before the check"))
    assert cli.run_pipeline(str(DEMO), [f"artifact_dir={tmp_path / 'art'}"]) == 2
    err = capsys.readouterr().err
    assert f"DeepSpeed is not installed for {sys.executable}" in err and f"{sys.executable} -m pip install" in err

"""A non-editable install (`pip install .`, or from a git URL): the wheel carries the launchers and the
shipped configs, and `rlhf demo` run from another directory completes with artifacts there.

The virtual environment sees the test machine's packages (--system-site-packages: nothing is
downloaded); the wheel is built from a copy of the tracked files, as a fresh clone would give."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ENV, ROOT

pytestmark = pytest.mark.slow

IGNORED = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "artifacts", "tests", ".ci")


def test_wheel_install_runs_the_demo_from_another_directory(tmp_path):
    src = tmp_path / "clone"
    shutil.copytree(ROOT, src, ignore=IGNORED)
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    wheel = next(wheels.glob("rlhf-*.whl"))
    inst = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(py), "-c", "import rlhf, rlhf.install as i; print(rlhf.__file__); print(i.LAUNCH_DIR)"],
                           cwd=elsewhere, capture_output=True, text=True, timeout=120)
    site = str(venv / "lib")
    assert where.returncode == 0 and all(line.startswith(site) for line in where.stdout.split()), where.stdout + where.stderr
    assert where.stdout.split()[1].endswith("rlhf_launch")

    env = {**ENV, "MASTER_PORT": "29683", "PATH": f"{venv / 'bin'}:{ENV.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(venv / "bin" / "rlhf"), "demo", "sft.epochs=0.2", "reward.epochs=0.2",
                           "ppo.total_episodes=128", "eval.num_prompts=16"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    art = elsewhere / "artifacts" / "demo"
    for stage in ("sft", "reward", "ppo"):
        assert json.loads((art / stage / "rlhf_artifact.json").read_text())["status"] == "complete"
    assert (art / "report" / "index.html").is_file()
    assert f"{venv / 'lib'}" in proc.stdout and "rlhf_launch/ppo.sh" in proc.stdout  # the installed launchers ran
    assert str(ROOT) not in proc.stdout

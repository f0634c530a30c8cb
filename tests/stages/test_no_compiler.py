"""A machine without a C++ compiler (slim containers, many CI images): DeepSpeed's CPU
communication op is never compiled, so stages run; an option whose op needs compiling (CPU Adam
under deepspeed.offload) is refused before any work, saying what to install."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEEPSPEED, DEMO, ENV, ROOT

pytestmark = pytest.mark.slow

COMPILER = re.compile(r"^(.*-)?(c\+\+|g\+\+|gcc|cc|clang|clang\+\+)(-[0-9.]+)?$")


def path_without_compilers(bin_dir: Path) -> str:
    """A PATH of one directory linking every program on PATH but the C/C++ compilers."""
    bin_dir.mkdir()
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            link = bin_dir / name
            if not COMPILER.match(name) and not link.exists() and not link.is_symlink():
                link.symlink_to(os.path.join(d, name))
    return str(bin_dir)


@pytest.fixture
def no_compiler_env(tmp_path) -> dict:
    env = {k: v for k, v in ENV.items() if k not in ("CXX", "CC")}
    env["PATH"] = path_without_compilers(tmp_path / "bin")
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")  # nothing cached from earlier builds
    return env


def test_stage_runs_without_a_compiler(no_compiler_env, tmp_path):
    check = subprocess.run(["bash", "-c", "command -v c++ g++ gcc cc clang || echo none"], env=no_compiler_env,
                           capture_output=True, text=True)
    assert check.stdout.strip() == "none", check.stdout
    proc = subprocess.run([*DEEPSPEED, "--num_gpus", "1", "--master_port", "29672", str(ROOT / "launch" / "sft.py"),
                           "--config", str(DEMO), f"artifact_dir={tmp_path / 'art'}", "sft.epochs=0.2"],
                          cwd=ROOT, env=no_compiler_env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out and "shm_comm" not in out
    assert (tmp_path / "art" / "sft" / "rlhf_artifact.json").is_file()
    assert not (tmp_path / "torch_extensions").exists()  # nothing was compiled


def test_offload_without_a_compiler_is_refused_before_any_work(no_compiler_env, tmp_path):
    art = tmp_path / "art"
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "pipeline", str(DEMO), f"artifact_dir={art}",
                           "deepspeed.offload=true"], cwd=ROOT, env=no_compiler_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: deepspeed.offload=true: DeepSpeed's CPU Adam"), proc.stderr
    assert "apt-get install g++" in proc.stderr and "deepspeed.offload=false" in proc.stderr
    assert "Traceback" not in proc.stderr and "==" not in proc.stdout  # no stage was started
    assert not (art / "logs").exists() and not (art / "checkpoints").exists()

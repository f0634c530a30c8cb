"""Two runs into one artifact directory: the second stops at once, naming the first; the first
completes untouched. A stage started by the pipeline uses the pipeline's lock."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import DEMO, ENV, ROOT, manifest
from test_fault_injection import small

pytestmark = pytest.mark.slow


def test_two_pipelines_on_one_directory_never_run_side_by_side(tmp_path):
    d = tmp_path / "art"
    cmd = [sys.executable, "-m", "rlhf.cli", "pipeline", str(DEMO), f"artifact_dir={d}", *small(tmp_path)]
    first = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "MASTER_PORT": "29751"}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (d / ".rlhf.lock").exists():
            assert first.poll() is None and time.time() < deadline, "the first pipeline never took the lock"
            time.sleep(0.1)
        second = subprocess.run(cmd, cwd=ROOT, env={**ENV, "MASTER_PORT": "29752"}, capture_output=True, text=True,
                                timeout=300)
        # a stage started by hand while the pipeline runs is refused too
        stage = subprocess.run([sys.executable, str(ROOT / "launch" / "sft.py"), "--config", str(DEMO),
                                f"artifact_dir={d}", *small(tmp_path)], cwd=ROOT, env=ENV, capture_output=True,
                               text=True, timeout=300)
        out, err = first.communicate(timeout=1200)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert "in use by rlhf pipeline" in second.stderr and "another artifact_dir" in second.stderr
    assert "== sft" not in second.stdout  # refused before any stage started
    assert stage.returncode == 2 and "in use by rlhf pipeline" in stage.stderr, stage.stderr[-2000:]
    assert first.returncode == 0, err[-4000:]
    assert "up to date" not in out and all(manifest(d, s)["invocations"] == 1 for s in ("sft", "reward", "ppo"))
    assert not (d / ".rlhf.lock").exists()  # released at the end

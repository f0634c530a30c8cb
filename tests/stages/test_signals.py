"""The signal contract (README, "Stopping a run"): SIGTERM, SIGINT or SIGHUP sent to the command
that started a stage (`bash launch/<stage>.sh`, `deepspeed launch/<stage>.py`) or the pipeline
(`rlhf pipeline`), and nothing else, stops every process of the stage within seconds: nothing is
published, the artifact directory's lock is released, and the directory is resumable from the last
checkpoint. Batch schedulers (Slurm, Kubernetes) stop jobs this way."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import DEMO, DEEPSPEED, ENV, ROOT

pytestmark = pytest.mark.slow


def _session_alive(sid: int) -> list[int]:
    out = []
    for q in psutil.process_iter():
        try:
            if os.getsid(q.pid) == sid and q.status() != psutil.STATUS_ZOMBIE:
                out.append(q.pid)
        except (psutil.Error, OSError):
            pass
    return out


def _stop_after_first_checkpoint(cmd: list[str], d, port: str, sig: int = signal.SIGTERM) -> tuple[float, int, str]:
    """Start `cmd` in a session of its own, send `sig` to its first process only once the SFT stage
    has written a checkpoint; (seconds until no process of the session is left, exit code, output)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "MASTER_PORT": port}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    ckpt = d / "checkpoints" / "sft"
    t0 = time.time()
    try:
        while not (ckpt.is_dir() and any(p.name.startswith("checkpoint-") for p in ckpt.iterdir())):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() - t0 < 400, "no checkpoint was written"
            time.sleep(0.2)
        time.sleep(1.0)
        assert proc.poll() is None, "the stage ended before it could be stopped"
        t = time.time()
        os.kill(proc.pid, sig)
        while _session_alive(proc.pid) and time.time() - t < 60:
            time.sleep(0.2)
        took = time.time() - t
        rc = proc.wait(timeout=10)
        return took, rc, proc.stdout.read()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _left_resumable(d) -> None:
    from rlhf import artifacts
    from rlhf.locking import DirLock

    assert not (d / "sft").exists(), "nothing is published"
    assert artifacts.resume_point(d, "sft"), "the run can be resumed from its checkpoint"
    lock = DirLock(d, "a test")
    lock.acquire()  # the stopped run released it
    lock.release()


@pytest.mark.parametrize("how", ["launcher", "deepspeed-2-processes", "pipeline"])
def test_sigterm_to_the_command_alone_stops_every_process_of_the_stage(tmp_path, how):
    d = tmp_path / "run"
    overrides = [f"artifact_dir={d}", "sft.save_steps=5", "wandb.mode=disabled"]
    port = {"launcher": "29781", "deepspeed-2-processes": "29782", "pipeline": "29783"}[how]
    if how == "launcher":
        cmd = ["bash", str(ROOT / "launch" / "sft.sh"), str(DEMO), *overrides]
    elif how == "pipeline":
        cmd = [sys.executable, "-m", "rlhf.cli", "pipeline", str(DEMO), *overrides]
    else:
        cmd = [*DEEPSPEED, "--num_gpus", "2", "--master_port", port, str(ROOT / "launch" / "sft.py"), "--config",
               str(DEMO), *overrides]
    took, rc, out = _stop_after_first_checkpoint(cmd, d, port)
    assert took < 30, f"processes of the stage still ran {took:.0f} s after SIGTERM"
    assert rc != 0
    assert "stopped by SIGTERM" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    _left_resumable(d)

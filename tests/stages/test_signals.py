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


SEED = int(os.environ.get("RLHF_FAULT_SEED", "1234"))


def test_sigterm_at_a_random_moment_of_each_stage_then_the_same_command_finishes(tmp_path):
    """Each stage, started by its launcher, gets SIGTERM at a seeded random moment of its work (data
    preparation, training, a checkpoint being written, evaluation); the re-run of the same command
    finishes it, and whatever is published, then or before, is complete."""
    import random

    from conftest import _head
    from rlhf import artifacts

    rng = random.Random(SEED)
    d = tmp_path / "run"
    extra = [f"artifact_dir={d}", "wandb.mode=disabled", "sft.epochs=1", "sft.save_steps=5",
             f"sft.train_data={_head('sft_train.jsonl', tmp_path / 'sft.jsonl', 480)}",
             f"reward.train_data={_head('prefs_train.jsonl', tmp_path / 'prefs.jsonl', 320)}", "reward.save_steps=3",
             "reward.stats_samples=32", "ppo.total_episodes=192", "ppo.save_every=1", "eval.num_prompts=16"]
    for launcher, stage in (("sft.sh", "sft"), ("rm.sh", "reward"), ("ppo.sh", "ppo")):
        cmd = ["bash", str(ROOT / "launch" / launcher), str(DEMO), *extra]
        env = {**ENV, "MASTER_PORT": "29784"}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        delay = rng.uniform(4.0, 14.0)
        time.sleep(delay)
        stopped = proc.poll() is None
        if stopped:
            t = time.time()
            os.kill(proc.pid, signal.SIGTERM)
            while _session_alive(proc.pid) and time.time() - t < 60:
                time.sleep(0.2)
            assert time.time() - t < 30, f"{stage}: processes still ran after SIGTERM at {delay:.1f} s"
            out = proc.stdout.read()
            proc.wait()
            assert "Traceback" not in out, out[-3000:]
            if (d / stage).exists():  # the signal came after the publish: what is there is complete
                artifacts.load(d / stage, stage)
        else:
            proc.communicate()
        again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
        artifacts.load(d / stage, stage)  # complete and intact
        print(f"{stage}: SIGTERM at {delay:.1f} s" if stopped else f"{stage}: finished within {delay:.1f} s")

"""A full disk while a checkpoint is written (not only while publishing): the stage ends with one
clear line saying to free space and re-run (no traceback, although torch.save reports it as
"unexpected pos ..."), publishes nothing, and the re-run after space is freed completes. The
artifact directory lies on a small tmpfs, filled up with a file before each of the three stages; the test is
skipped where mounting one is not permitted (it needs root)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import DEMO, ENV, ROOT, _head

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt, leave: int) -> None:
    """A file that leaves `leave` bytes free on the disk of `mnt`."""
    free = shutil.disk_usage(mnt).free
    with open(mnt / "filler", "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave))


def _stage(script: str, d, extra: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch" / script), "--config", str(DEMO), f"artifact_dir={d}", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


def test_a_full_disk_during_a_checkpoint_save_is_a_clear_error_and_the_re_run_completes(small_disk, tmp_path):
    d = small_disk / "run"
    extra = ["wandb.mode=disabled", "sft.save_steps=5", "sft.epochs=1",
             f"sft.train_data={_head('sft_train.jsonl', tmp_path / 'sft.jsonl', 320)}",
             f"reward.train_data={_head('prefs_train.jsonl', tmp_path / 'prefs.jsonl', 160)}", "reward.stats_samples=16",
             "reward.save_steps=2",
             "ppo.total_episodes=128", "ppo.save_every=1", "eval.num_prompts=16", "ppo.max_new_tokens=8"]
    for script, stage, leave in (("sft.py", "sft", 3 << 20), ("rm.py", "reward", 3 << 20), ("ppo.py", "ppo", 3 << 20)):
        if leave:
            _fill(small_disk, leave)
            full = _stage(script, d, extra)
            assert full.returncode == 2, (full.returncode, full.stderr[-3000:])
            assert "Traceback" not in full.stderr + full.stdout, full.stderr[-3000:]
            assert f"[{stage}] error: " in full.stderr and "Free space" in full.stderr, full.stderr[-2000:]
            assert not (d / stage).exists(), "nothing is published"
            os.unlink(small_disk / "filler")
        done = _stage(script, d, extra)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (d / stage / "rlhf_artifact.json").is_file()

"""The artifact directory's lock: one writer, inheritance by the pipeline's stages, stale locks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from rlhf import locking
from rlhf.artifacts import ArtifactError
from rlhf.locking import DirLock, lock_path, read_holder

from conftest import ROOT


def test_second_writer_is_refused_until_the_first_releases(tmp_path):
    with DirLock(tmp_path, "rlhf pipeline") as first:
        rec = read_holder(tmp_path)
        assert rec["pid"] == os.getpid() and rec["token"] == first.token and rec["what"] == "rlhf pipeline"
        with pytest.raises(ArtifactError) as e:
            DirLock(tmp_path, "the sft stage").acquire()
        msg = str(e.value)
        assert "in use by rlhf pipeline" in msg and f"pid {os.getpid()}" in msg and "another artifact_dir" in msg
    assert not lock_path(tmp_path).exists()
    with DirLock(tmp_path, "the sft stage"):
        pass


def test_a_stage_started_by_the_holder_inherits_the_lock(tmp_path):
    with DirLock(tmp_path, "rlhf pipeline") as driver:
        with DirLock(tmp_path, "the sft stage", token=driver.token) as stage:
            assert not stage.held
        assert read_holder(tmp_path)["token"] == driver.token  # the stage leaving does not release it
        with pytest.raises(ArtifactError):
            DirLock(tmp_path, "the sft stage", token="someone-else").acquire()


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    lock_path(tmp_path).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start": "1",
                                               "token": "old", "what": "rlhf pipeline", "since": "earlier"}))
    with DirLock(tmp_path, "rlhf pipeline") as lock:
        assert read_holder(tmp_path)["token"] == lock.token
    assert f"stale lock of pid {dead.pid}" in capsys.readouterr().err


def test_pid_reused_by_another_program_is_stale(tmp_path):
    import socket

    # our own pid, but another start time: the recorded process is gone and the pid was reused
    lock_path(tmp_path).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": "-1",
                                               "token": "old", "what": "x", "since": "earlier"}))
    with DirLock(tmp_path, "y"):
        pass


def test_lock_of_another_host(tmp_path):
    rec = {"host": "node-7", "pid": 4242, "start": "1", "token": "t", "what": "rlhf pipeline", "since": "then"}
    lock_path(tmp_path).write_text(json.dumps(rec))
    with pytest.raises(ArtifactError, match="in use by rlhf pipeline .pid 4242 on node-7"):
        DirLock(tmp_path, "the sft stage").acquire()
    old = time.time() - 2 * locking.STALE_AFTER_S
    os.utime(lock_path(tmp_path), (old, old))
    with pytest.raises(ArtifactError) as e:
        DirLock(tmp_path, "the sft stage").acquire()
    assert "looks stale" in str(e.value) and f"remove {lock_path(tmp_path)}" in str(e.value)
    assert lock_path(tmp_path).exists()  # never removed automatically across hosts


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    lock = DirLock(tmp_path, "a")
    lock.acquire()
    lock_path(tmp_path).write_text(json.dumps({"token": "someone-else"}))
    lock.release()
    assert lock_path(tmp_path).exists()


def test_artifact_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ArtifactError, match="artifact_dir"):
        DirLock(f, "a").acquire()


def test_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(locking, "HEARTBEAT_S", 0.05)
    with DirLock(tmp_path, "a"):
        old = time.time() - 1000
        os.utime(lock_path(tmp_path), (old, old))
        time.sleep(0.3)
        assert time.time() - lock_path(tmp_path).stat().st_mtime < 5


@pytest.mark.slow
def test_processes_racing_for_the_lock_exactly_one_wins(tmp_path):
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from rlhf.locking import DirLock\nfrom rlhf.artifacts import ArtifactError\n"
            "time.sleep(max(0, float(sys.argv[2]) - time.time()))\n"
            "try:\n    l = DirLock(sys.argv[1], 'racer'); l.acquire(); print('won', flush=True); time.sleep(4); l.release()\n"
            "except ArtifactError:\n    print('refused', flush=True)\n") % str(ROOT)
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(start)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["refused", "refused", "refused", "won"]
    assert not lock_path(tmp_path).exists()

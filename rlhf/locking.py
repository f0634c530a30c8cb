"""One writer per artifact directory: an advisory lock file, DIR/.rlhf.lock.

Whoever writes to the directory holds it: `rlhf pipeline` / `rlhf demo` for the whole pipeline
(its stage processes inherit it through a token), a stage started on its own (`launch/*.py`,
`launch/*.sh`) for that stage; only global rank 0 takes it. The file is created with
O_CREAT|O_EXCL, which is atomic on local filesystems and on NFS (v3 and later), so it works on a
filesystem shared by several nodes, where fcntl/flock locks are not reliable. It records host,
pid, the process's start time and a token; while held, a thread touches it every
HEARTBEAT_S seconds.

A lock whose holder is gone is stale:
- on the same host, the recorded pid no longer runs (or runs another program: the start time
  differs): certain, so the lock is taken over with a notice;
- on another host the pid cannot be checked: after STALE_AFTER_S without a heartbeat the error
  says the lock looks stale and how to remove it, but it is never removed automatically (a
  clock skew between nodes must not let two runs in).
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

from rlhf.artifacts import ArtifactError

LOCK = ".rlhf.lock"
TOKEN_ENV = "RLHF_LOCK_TOKEN"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def lock_path(artifact_dir: str | Path) -> Path:
    return Path(artifact_dir) / LOCK


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _running(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    now = _start_ticks(pid)
    return start is None or now is None or now == start


def read_holder(artifact_dir: str | Path) -> dict | None:
    """The lock's record ({} while it is being written or when unreadable), None when unlocked."""
    p = lock_path(artifact_dir)
    try:
        text = p.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        rec = json.loads(text)
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) else {}


class DirLock:
    """`with DirLock(DIR, "rlhf pipeline"):` holds DIR/.rlhf.lock, or raises ArtifactError saying
    who holds it and what to do. `token`: a lock held by this token (the pipeline driver that
    started this process) is used as it is instead of taken."""

    def __init__(self, artifact_dir: str | Path, what: str, token: str | None = None):
        self.dir = Path(artifact_dir)
        self.path = lock_path(artifact_dir)
        self.what = what
        self.inherited_token = token
        self.token = secrets.token_hex(8)
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "DirLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ArtifactError(f"artifact_dir={self.dir} cannot be created ({e.strerror}): choose a writable "
                                "directory") from None
        record = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_ticks(os.getpid()),
                  "token": self.token, "what": self.what, "command": " ".join(sys.argv)[:300],
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._inherit_or_clear():
                    return
                continue
            except OSError as e:
                raise ArtifactError(f"cannot create the lock {self.path} ({e.strerror}): artifact_dir must be a "
                                    "writable directory") from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record))
            self.held = True
            self._thread = threading.Thread(target=self._heartbeat, name="rlhf-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise ArtifactError(f"could not take {self.path}: it keeps reappearing; is another run starting?")

    def _inherit_or_clear(self) -> bool:
        """True when the existing lock is ours to use (inherited); removes a certainly stale one
        (then the caller tries again); raises when another live or possibly live run holds it."""
        holder = read_holder(self.dir)
        if holder is None:
            return False  # released in between: try again
        if not holder:  # being written right now
            time.sleep(0.2)
            holder = read_holder(self.dir)
            if holder is None:
                return False
            if not holder:
                raise ArtifactError(f"{self.path} exists but is unreadable or empty. If no run is using "
                                    f"{self.dir}, remove it and re-run.")
        if self.inherited_token and holder.get("token") == self.inherited_token:
            return True
        same_host = holder.get("host") == socket.gethostname()
        if same_host and isinstance(holder.get("pid"), int) and not _running(holder["pid"], holder.get("start")):
            print(f"[lock] {self.path}: removing a stale lock of pid {holder['pid']} ({holder.get('what')}, since "
                  f"{holder.get('since')}), which no longer runs", file=sys.stderr, flush=True)
            if read_holder(self.dir) == holder:  # not replaced meanwhile by a run that cleared it first
                self.path.unlink(missing_ok=True)
            return False
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return False
        who = (f"{holder.get('what', 'another run')} (pid {holder.get('pid')} on {holder.get('host')}, since "
               f"{holder.get('since')}; last heartbeat {age:.0f}s ago)")
        if not same_host and age > STALE_AFTER_S:
            raise ArtifactError(
                f"{self.dir} is locked by {who}, which looks stale: no heartbeat for {age / 60:.0f} minutes. "
                f"If no run is using {self.dir} any more, remove {self.path} and re-run.")
        raise ArtifactError(
            f"{self.dir} is in use by {who}. Two runs writing one artifact directory would train the same stage "
            f"side by side and publish over each other: wait for it to finish, or use another artifact_dir.")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                print(f"[lock] warning: {self.path} disappeared while held; another run may now start in "
                      f"{self.dir}", file=sys.stderr, flush=True)
                return

    def release(self) -> None:
        self._stop.set()
        if not self.held:
            return
        self.held = False
        holder = read_holder(self.dir)
        if holder and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

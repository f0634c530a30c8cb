"""What every stage does around its training: parse and start, skip when up to date,
print one summary line, and turn user-fixable errors into a clean exit."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from rlhf import artifacts, distributed, faults
from rlhf.artifacts import ArtifactError
from rlhf.config import ConfigError
from rlhf.data import DataError

USER_ERRORS = (ConfigError, DataError, ArtifactError)


class Stopped(BaseException):
    """A stop signal (SIGTERM, SIGHUP; SIGINT arrives as KeyboardInterrupt) reached this process:
    raised where the process is, so the lock is released on the way out and nothing after that
    point (a publish) happens. A BaseException, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP raise Stopped in this process from now on (Python's default ends it at once,
    without running a single `finally`)."""
    def handler(signum: int, frame: Any) -> None:
        # once: the launcher passes the group's signal on to its ranks a second time, which must not
        # interrupt the way out (the lock's release)
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def watch_launcher(every: float = 1.0) -> None:
    """Under DeepSpeed's launcher, stop this rank (as SIGTERM would) once the launcher or the
    `deepspeed` runner above it is gone: the runner installs no signal handler for a run on one node,
    so a SIGTERM sent to `deepspeed launch/<stage>.py` ends it alone and the ranks would train on,
    and publish, with nobody waiting (launch/_stage.sh signals the whole group instead)."""
    import threading

    import psutil

    try:
        launcher = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" not in " ".join(launcher.cmdline()):
            return
        watched = [launcher] + [p for p in [launcher.parent()] if p is not None and p.pid > 1]
    except psutil.Error:
        return

    def alive(p: Any) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def watch() -> None:
        while all(alive(p) for p in watched):
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="rlhf-launcher-watch", daemon=True).start()


def say(stage: str, msg: str) -> None:
    if distributed.is_main():
        print(f"[{stage}] {msg}", flush=True)


def skip_if_up_to_date(artifact_dir: str, stage: str, config: dict, parents: list, force: bool,
                       data: dict | None = None) -> artifacts.Artifact | None:
    if force:
        return None
    reasons = artifacts.why_rebuild(artifact_dir, stage, config, parents, data)
    if reasons:
        if artifacts.stage_dir(artifact_dir, stage).exists():
            shown = "; ".join(reasons[:4]) + (f"; and {len(reasons) - 4} more" if len(reasons) > 4 else "")
            say(stage, f"rebuilding {artifacts.stage_dir(artifact_dir, stage)}: {shown}")
        return None
    say(stage, f"{artifacts.stage_dir(artifact_dir, stage)} is complete and up to date: skipping (force=true reruns it)")
    if distributed.is_main():  # a run killed between publish and clean-up left these
        _remove_leftovers(artifact_dir, stage, checkpoints=True)
    distributed.barrier()
    return artifacts.load(artifacts.stage_dir(artifact_dir, stage), stage, verify=False)


def _remove_leftovers(artifact_dir: str, stage: str, checkpoints: bool = False) -> None:
    for d in artifacts.leftovers(artifact_dir, stage) + ([artifacts.checkpoint_dir(artifact_dir, stage)] if checkpoints else []):
        if d.exists():
            say(stage, f"removing {d}, left by an interrupted run")
            shutil.rmtree(d, ignore_errors=True)


def open_checkpoints(artifact_dir: str, stage: str, config: dict, data: dict | None,
                     started: float) -> tuple[Path, bool, artifacts.StageClock]:
    """Start a stage that is not up to date: rank 0 removes what an interrupted publish left and
    prepares checkpoints/<stage> (artifacts.prepare_checkpoints); every rank gets its result, or
    the same error. Returns (checkpoint dir, resuming?, the stage's clock)."""
    out: tuple = ()
    if distributed.is_main():
        try:
            _remove_leftovers(artifact_dir, stage)
            out = ("ok", artifacts.prepare_checkpoints(artifact_dir, stage, config, data, distributed.world_size()))
        except ArtifactError as e:
            out = ("error", str(e))
    kind, value = distributed.broadcast_object(out)
    if kind == "error":
        raise ArtifactError(value)
    ckpt_dir, resuming = value
    distributed.barrier()
    return ckpt_dir, resuming, artifacts.StageClock(ckpt_dir, started, enabled=distributed.is_main())


def finish(artifact_dir: str, stage: str, staged: Path, ckpt_dir: Path, tracker: Any, clock: artifacts.StageClock,
           metrics: dict, summary_keys: list[str], **manifest: Any) -> artifacts.Artifact:
    """End of every stage, after the collective save into `staged`: rank 0 writes the manifest
    and publishes (artifacts.publish), then removes the checkpoints; all ranks wait, then print
    the summary line. `manifest`: build_manifest's other arguments."""
    art = None
    metrics = {**metrics, **peak_memory()}
    if distributed.is_main():
        clock.tick(force=True)
        faults.point("publish:staged")
        art = artifacts.publish(artifact_dir, stage, staged,
                                artifacts.build_manifest(stage, metrics=metrics, clock=clock, **manifest))
        faults.point("publish:done")
        try:  # the artifact is published: a chart that fails to draw must not fail the stage
            tracker.charts(stage, metrics)
        except Exception as e:  # noqa: BLE001
            say(stage, f"warning: drawing the report charts for W&B failed ({type(e).__name__}: {e}); the artifact is "
                       f"published, `rlhf report` draws them from it")
        tracker.summary(metrics)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    tracker.finish()
    distributed.barrier()
    art = art or artifacts.load(artifacts.stage_dir(artifact_dir, stage), stage, verify=False)
    summary_line(stage, art, summary_keys)
    return art


def peak_memory() -> dict:
    """This process's peak memory so far: {"peak_memory_mb", "peak_memory_kind"}: the CUDA allocator's
    peak on a GPU, else the peak resident set of the process (what the machine had to hold)."""
    import torch

    if torch.cuda.is_available():
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                "peak_memory_kind": "cuda max_memory_allocated"}
    import resource

    return {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_memory_kind": "peak resident set"}


def summary_line(stage: str, art: artifacts.Artifact, keys: list[str]) -> None:
    m = art.metrics
    parts = [f"{k}={m[k]:.4g}" if isinstance(m.get(k), float) else f"{k}={m.get(k)}" for k in keys if k in m]
    origin = art.manifest.get("imported") and artifacts.origin(art.manifest)
    shown = ", ".join(parts + ([origin] if origin else []))
    say(stage, f"done in {art.manifest.get('duration_s', 0):.0f}s: {art.path}" + (f" ({shown})" if shown else ""))
    if isinstance(m.get("peak_memory_mb"), (int, float)):
        say(stage, f"peak memory {m['peak_memory_mb']:.0f} MiB ({m.get('peak_memory_kind')}, rank 0)")
    if stage == "ppo" and m.get("guard_reason"):
        say(stage, f"published update {m.get('selected_update')}: {m['guard_reason']}")
    if stage == "ppo":  # the reward stage prints its own warnings as it finds them
        for w in m.get("warnings") or []:
            say(stage, f"warning: {w}")


def main(stage: str, run: Callable[[Any], Any], argv: list[str] | None = None) -> int:
    """Entry point of launch/<stage>.py: `--config CONFIG [key=value ...]` (plus the
    launcher's --local_rank), errors the user can fix printed without a traceback. Rank 0 holds
    the artifact directory's lock for the run (or uses the one of the `rlhf pipeline` that
    started it, whose token comes as --lock-token)."""
    import argparse

    from rlhf import preflight
    from rlhf.config import load_config, per_process
    from rlhf.locking import TOKEN_ENV

    ap = argparse.ArgumentParser(prog=f"launch/{stage}.py", description=f"Run the {stage} stage.")
    ap.add_argument("--config", required=True, help="pipeline YAML")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--lock-token", default=os.environ.get(TOKEN_ENV), help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. ppo.kl_coef=0.1")
    args = ap.parse_args(argv)
    started = time.time()
    lock, cfg = None, None
    stop_on_signals()
    watch_launcher()
    try:
        cfg = load_config(args.config, args.overrides)
        preflight.check(cfg, [stage])  # inputs, parents, DeepSpeed JSON, dtype, artifact_dir: before any work
        distributed.init_distributed()
        per_process(cfg, distributed.world_size())  # global batch sizes that do not divide: said before any work
        say(stage, f"{distributed.world_size()} process(es) on {distributed.describe_devices()}; "
                   f"artifact directory {cfg.artifact_dir}")
        lock = _take_lock(cfg.artifact_dir, stage, args.lock_token)
        run(cfg)
    except USER_ERRORS as e:
        print(f"[{stage}] error: {e}", file=sys.stderr, flush=True)
        return 2
    except (Stopped, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        if distributed.is_main():
            point = artifacts.resume_point(cfg.artifact_dir, stage) if cfg else None
            print(f"[{stage}] stopped by {signal.Signals(signum).name}: nothing was published; re-run the same command "
                  f"to {'resume from ' + point if point else 'start the stage again'}", file=sys.stderr, flush=True)
        return 128 + signum
    except Exception as e:  # a full disk, a directory made read-only, a quota: the user's to fix
        storage = isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS
        if not storage and not (cfg is not None and disk_full(cfg.artifact_dir)):
            raise
        # torch.save and the tokenizers' Rust writer report a full disk in words of their own
        # ("unexpected pos 2624 vs 2516", "os error 28"): the disk is looked at instead
        what = f"{e.strerror or e}" + (f" writing {e.filename}" if e.filename else "") if storage else \
            f"the disk of {cfg.artifact_dir} is full ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]})"
        print(f"[{stage}] error: {what}. Free space (or fix the permissions) in "
              f"{cfg.artifact_dir if cfg else 'the artifact directory'} and re-run the same "
              f"command: the stage resumes from its last complete checkpoint (a torn one is passed over) and "
              f"nothing half-written was published.", file=sys.stderr, flush=True)
        return 2
    finally:
        if lock is not None:
            lock.release()
    # from the process's start, as the manifest's duration counts (imports and launcher set-up included)
    say(stage, f"finished in {time.time() - min(started, artifacts.process_started() or started):.0f}s")
    return 0


def disk_full(path: str, reserve: int = 64 << 20) -> bool:
    """Whether the filesystem holding `path` (or its nearest existing parent) has less than
    `reserve` bytes (or 0.5 % of its size) free."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return False
    return usage.free < min(reserve, usage.total // 200) or usage.free < 1 << 20


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _take_lock(artifact_dir: str, stage: str, token: str | None) -> Any:
    """Rank 0 takes the artifact directory's lock; every rank gets the same error if it cannot."""
    from rlhf.locking import DirLock

    lock, error = None, None
    if distributed.is_main():
        lock = DirLock(artifact_dir, f"the {stage} stage", token=token)
        try:
            lock.acquire()
        except ArtifactError as e:
            lock, error = None, str(e)
    error = distributed.broadcast_object(error)
    if error:
        raise ArtifactError(error)
    return lock

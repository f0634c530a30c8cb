"""What every stage does around its training: parse and start, skip when up to date,
print one summary line, and turn user-fixable errors into a clean exit."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

from rlhf import artifacts, distributed
from rlhf.artifacts import ArtifactError
from rlhf.config import ConfigError
from rlhf.data import DataError

USER_ERRORS = (ConfigError, DataError, ArtifactError)


def say(stage: str, msg: str) -> None:
    if distributed.is_main():
        print(f"[{stage}] {msg}", flush=True)


def skip_if_up_to_date(artifact_dir: str, stage: str, config: dict, parents: list, force: bool,
                       data: dict | None = None) -> artifacts.Artifact | None:
    if force or not artifacts.is_up_to_date(artifact_dir, stage, config, parents, data):
        return None
    say(stage, f"{artifacts.stage_dir(artifact_dir, stage)} is complete and up to date: skipping (force=true reruns it)")
    return artifacts.load(artifacts.stage_dir(artifact_dir, stage), stage)


def summary_line(stage: str, art: artifacts.Artifact, keys: list[str]) -> None:
    m = art.metrics
    parts = [f"{k}={m[k]:.4g}" if isinstance(m.get(k), float) else f"{k}={m.get(k)}" for k in keys if k in m]
    say(stage, f"done in {art.manifest.get('duration_s', 0):.0f}s: {art.path} ({', '.join(parts)})")


def main(stage: str, run: Callable[[Any], Any], argv: list[str] | None = None) -> int:
    """Entry point of launch/<stage>.py: `--config CONFIG [key=value ...]` (plus the
    launcher's --local_rank), errors the user can fix printed without a traceback."""
    import argparse

    from rlhf.config import load_config

    ap = argparse.ArgumentParser(prog=f"launch/{stage}.py", description=f"Run the {stage} stage.")
    ap.add_argument("--config", required=True, help="pipeline YAML")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. ppo.kl_coef=0.1")
    args = ap.parse_args(argv)
    started = time.time()
    try:
        cfg = load_config(args.config, args.overrides)
        distributed.init_distributed()
        run(cfg)
    except USER_ERRORS as e:
        print(f"[{stage}] error: {e}", file=sys.stderr, flush=True)
        return 2
    say(stage, f"finished in {time.time() - started:.0f}s")
    return 0

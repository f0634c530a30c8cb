"""Named fault points, armed through the environment, for the fault-injection tests.

    RLHF_FAULT=publish:manifest            SIGKILL this process the 1st time it passes that point
    RLHF_FAULT=checkpoint:saved@3          ... the 3rd time
    RLHF_FAULT=publish:staged:enospc       raise OSError(ENOSPC) there instead (a full disk)

Several, comma-separated. Unset (always, outside tests) a point costs one environment lookup.
The points sit where a crash is most likely to leave something half-done: between the writes
of a checkpoint, of a staged artifact and of its manifest, around the publishing rename, and
at the start of an evaluation.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
from collections import Counter

ENV = "RLHF_FAULT"
_hits: Counter = Counter()


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        target, _, action = item.strip().rpartition(":") if item.count(":") > 1 else (item.strip(), "", "")
        where, _, nth = target.partition("@")
        if where != name:
            continue
        _hits[name] += 1
        if _hits[name] != int(nth or 1):
            continue
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected at {name})")
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

"""Reading a W&B offline run (DIR/wandb/offline-run-*/run-*.wandb) in the tests: the file is a
LevelDB-style log (32 KiB blocks of records with a 7-byte header: crc32, length, type) after a
7-byte file header, each record a wandb_internal_pb2.Record."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
    parsed = []
    for raw in out:
        rec = pb.Record()
        rec.ParseFromString(raw)
        parsed.append(rec)
    return parsed


def run_info(run_dir: Path) -> dict:
    """{job_type, history: [{key: value}], keys} of one offline run directory."""
    (wandb_file,) = Path(run_dir).glob("run-*.wandb")
    job_type, history = None, []
    for rec in records(wandb_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            job_type = rec.run.job_type
        elif kind == "history":
            history.append({it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in rec.history.item})
    return {"job_type": job_type, "history": history, "keys": set().union(*history) if history else set()}


def runs_by_stage(artifact_dir: Path) -> dict[str, dict]:
    """The newest offline run of each stage (job_type) under DIR/wandb, with its directory."""
    out: dict[str, dict] = {}
    for d in sorted(Path(artifact_dir, "wandb").glob("offline-run-*")):
        info = run_info(d)
        out[info["job_type"]] = {**info, "dir": d}
    return out

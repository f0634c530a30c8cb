"""The artifact directory: layout, manifests, atomic publish and lineage checks.

    DIR/<stage>/                 published model directory; rlhf_artifact.json written last
    DIR/checkpoints/<stage>/     resumable training state, removed after publish
    DIR/metrics/<stage>.jsonl    one JSON object per logged step
    DIR/report/  DIR/wandb/

A stage directory is published by writing everything into a temporary sibling and
renaming it into place, so `DIR/<stage>/` is either absent or complete. Only the
process of rank 0 publishes; the others wait at a barrier (see `distributed`).

The manifest lists every file of the artifact with its size and sha256. Sizes are checked
wherever an artifact is looked at (`rlhf status`, up-to-date checks: a stat per file); the
hashes when a stage loads it as its parent, once per process and file (sha256 reads ~1-2
GB/s, small beside loading the weights that follow), and by `rlhf status --verify`.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rlhf import faults

SFT, REWARD, PPO = "sft", "reward", "ppo"
STAGES = (SFT, REWARD, PPO)
MANIFEST = "rlhf_artifact.json"
SAMPLES = "samples.jsonl"
REBUILD = {
    SFT: "deepspeed launch/sft.py --config CONFIG (or bash launch/pipeline.sh CONFIG)",
    REWARD: "deepspeed launch/rm.py --config CONFIG (or bash launch/pipeline.sh CONFIG)",
    PPO: "deepspeed launch/ppo.py --config CONFIG (or bash launch/pipeline.sh CONFIG)",
}
_LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "deepspeed", "accelerate", "wandb")


class ArtifactError(RuntimeError):
    """An artifact is missing, partial, of the wrong stage or incompatible; the message says what to do."""


def stage_dir(artifact_dir: str | Path, stage: str) -> Path:
    return Path(artifact_dir) / stage


def checkpoint_dir(artifact_dir: str | Path, stage: str) -> Path:
    return Path(artifact_dir) / "checkpoints" / stage


def metrics_path(artifact_dir: str | Path, stage: str) -> Path:
    return Path(artifact_dir) / "metrics" / f"{stage}.jsonl"


def report_dir(artifact_dir: str | Path) -> Path:
    return Path(artifact_dir) / "report"


def wandb_dir(artifact_dir: str | Path) -> Path:
    return Path(artifact_dir) / "wandb"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict:
    """What must match between stages that exchange token ids: vocabulary, special ids, chat template."""
    return {
        "vocab_sha256": sha256_json(sorted(tokenizer.get_vocab().items())),
        "vocab_size": len(tokenizer),
        "special_token_ids": {
            name: getattr(tokenizer, f"{name}_token_id", None) for name in ("pad", "eos", "bos", "unk")
        },
        "chat_template_sha256": sha256_json(tokenizer.chat_template) if tokenizer.chat_template else None,
    }


def data_fingerprint(sources: dict[str, str | None]) -> dict:
    """sha256 of each local input file (hub ids are recorded by name)."""
    out = {}
    for key, src in sources.items():
        if src is None:
            continue
        p = Path(src)
        out[key] = {"path": str(src), "sha256": _cached_sha256(p) if p.is_file() else None}
    return out


def library_versions() -> dict:
    out = {}
    for lib in _LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass(frozen=True)
class Artifact:
    """A published stage directory and its manifest."""

    path: Path
    manifest: dict

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @property
    def use_chat_template(self) -> bool:
        """Whether prompts were rendered with the chat template: what every later stage and
        `rlhf generate` must do too (True, the config's default, for manifests without it)."""
        return bool(self.manifest.get("model", {}).get("use_chat_template", True))

    def parent_ref(self) -> dict:
        return {"stage": self.stage, "path": str(self.path.resolve()),
                "manifest_sha256": sha256_file(self.path / MANIFEST)}


def file_checksums(directory: str | Path) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file under `directory` but the manifest."""
    root = Path(directory)
    return {str(f.relative_to(root)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(root.rglob("*")) if f.is_file() and f.name not in (MANIFEST, MANIFEST + ".part")}


_HASHED: set[tuple[str, int, int]] = set()  # (file, size, mtime_ns) whose sha256 matched in this process


WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def files_digest(files: dict) -> str:
    """The sha256 of a manifest's file list, kept beside it: an edit of the list (an entry removed
    to silence a check) shows."""
    return sha256_json(files)


def damaged_files(path: str | Path, manifest: dict, hashes: bool = False) -> list[str]:
    """What is wrong with the artifact's files, one line each ([] when intact): no file list, a list
    edited since the publish (its digest), no model weights listed, a listed file missing or of
    another size, and with `hashes` another sha256."""
    root, problems = Path(path), []
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [f"{root / MANIFEST}: lists no files with checksums (edited, or published by a version before "
                "them), so nothing can vouch for the weights"]
    if manifest.get("files_sha256") != files_digest(files):
        return [f"{root / MANIFEST}: its file list was changed after the publish (files_sha256 does not match)"]
    if not any(w in files for w in WEIGHTS):
        problems.append(f"{root / MANIFEST}: lists no model weights ({' or '.join(WEIGHTS)})")
    for rel, want in files.items():
        f = root / rel
        try:
            st = f.stat()
        except OSError:
            problems.append(f"{f}: missing")
            continue
        if st.st_size != want["bytes"]:
            problems.append(f"{f}: {st.st_size} bytes, the manifest says {want['bytes']}")
            continue
        key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
        if hashes and key not in _HASHED:
            if sha256_file(f) != want["sha256"]:
                problems.append(f"{f}: sha256 differs from the manifest's (the file changed after publish)")
                continue
            _HASHED.add(key)
    return problems


def read_manifest(path: str | Path) -> dict | None:
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load(path: str | Path, expect_stage: str, tokenizer_fp: dict | None = None, verify: bool = True) -> Artifact:
    """Open a published artifact, refusing a missing, partial, wrong-stage, damaged (with
    `verify`: every file's size and sha256 against the manifest) or incompatible one."""
    path = Path(path)
    rebuild = REBUILD.get(expect_stage, "re-run the stage that produces it")
    if not path.exists():
        raise ArtifactError(f"no {expect_stage} artifact at {path}: run the {expect_stage} stage first: {rebuild}")
    manifest = read_manifest(path)
    if manifest is None:
        raise ArtifactError(
            f"{path} is not a complete {expect_stage} artifact: {MANIFEST} is missing or unreadable "
            f"(an interrupted or foreign directory). Re-run the {expect_stage} stage: {rebuild}")
    if manifest.get("status") != "complete":
        raise ArtifactError(f"{path}: manifest status is {manifest.get('status')!r}, not 'complete'. Re-run: {rebuild}")
    if manifest.get("stage") != expect_stage:
        raise ArtifactError(
            f"{path} is a {manifest.get('stage')!r} artifact, but a {expect_stage!r} artifact is needed here. "
            f"Point to the {expect_stage} directory of the artifact dir, or build it: {rebuild}")
    damaged = damaged_files(path, manifest, hashes=True) if verify else []
    if damaged:
        raise ArtifactError(
            f"the {expect_stage} artifact {path} is damaged: " + "; ".join(damaged[:5])
            + (f" (and {len(damaged) - 5} more)" if len(damaged) > 5 else "")
            + f". Rebuild it: {rebuild} with force=true")
    if tokenizer_fp is not None and manifest.get("tokenizer") != tokenizer_fp:
        theirs = manifest.get("tokenizer") or {}
        diff = [k for k in set(tokenizer_fp) | set(theirs) if tokenizer_fp.get(k) != theirs.get(k)]
        raise ArtifactError(
            f"{path}: its tokenizer differs from the one this stage uses ({', '.join(sorted(diff))} differ). "
            f"Every stage must share the SFT tokenizer: rebuild {path} from the same SFT artifact ({rebuild}).")
    return Artifact(path=path, manifest=manifest)


def check_lineage(child: Artifact, parent: Artifact) -> None:
    """ArtifactError unless `child` was built from `parent` as it is now (its manifest lists the
    parent's current manifest hash): a reward model trained on an SFT policy that has since been
    rebuilt or replaced scores another policy's text, with another rendering."""
    theirs = {p.get("stage"): p.get("manifest_sha256") for p in child.manifest.get("parents", [])}
    if theirs.get(parent.stage) == sha256_file(parent.path / MANIFEST):
        return
    how = ("lists no parent of that stage" if parent.stage not in theirs else
           f"was built from another {parent.stage} artifact (manifest {str(theirs[parent.stage])[:12]}), not the one in "
           f"{parent.path} now")
    raise ArtifactError(f"{child.path} {how}: rebuild it from this {parent.stage} artifact "
                        f"({REBUILD[child.stage]}; the pipeline does so by itself), or restore the "
                        f"{parent.stage} artifact it was built from")


def build_manifest(stage: str, config: dict, parents: list[Artifact], tokenizer_fp: dict,
                   data: dict, metrics: dict, clock: "StageClock", **extra: Any) -> dict:
    return {
        "stage": stage,
        "status": "complete",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(clock.total(), 1),   # every invocation of the stage (killed and resumed ones too)
        "invocations": clock.count(),
        "config": config,
        "identity": stage_identity(config, stage, data),
        "parents": [p.parent_ref() for p in parents],
        "tokenizer": tokenizer_fp,
        "data": data,
        "versions": library_versions(),
        "git_commit": git_commit(),
        "metrics": metrics,
        **extra,
    }


def staging_dir(artifact_dir: str | Path, stage: str) -> Path:
    """Where a stage's files are written (by every rank, for collective ZeRO-3 saves) before publish."""
    return Path(artifact_dir) / f".{stage}.staging"


def publish(artifact_dir: str | Path, stage: str, staged: Path, manifest: dict) -> Artifact:
    """Publish the fully written directory `staged` as `DIR/<stage>`: the manifest goes in
    last, then one rename puts it in place (an older artifact is swapped out first)."""
    final = stage_dir(artifact_dir, stage)
    files = file_checksums(staged)
    manifest = {**manifest, "files": files, "files_sha256": files_digest(files)}
    manifest_tmp = staged / (MANIFEST + ".part")
    manifest_tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(manifest_tmp, staged / MANIFEST)
    faults.point("publish:manifest")
    old = None
    if final.exists():
        old = final.parent / f".{stage}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        faults.point("publish:swapped")
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return Artifact(path=final, manifest=manifest)


STAGE_CONFIG_KEYS = {
    SFT: ("seed", "model", "deepspeed", "sft"),
    REWARD: ("seed", "model", "deepspeed", "sft", "reward"),
    PPO: ("seed", "model", "deepspeed", "sft", "reward", "ppo", "eval"),
}


# the reward stage measures reward_stats by sampling as PPO will: these ppo keys shape its result too
REWARD_STATS_PPO_KEYS = ("temperature", "top_k", "top_p", "max_new_tokens", "max_prompt_length")
# with ppo.rollout_engine=vllm these vllm keys shape PPO's result (the engine's precision, where pi_old
# comes from, the importance weights); the others (memory, eager mode) only its speed
VLLM_RESULT_KEYS = ("dtype", "old_logprobs", "importance_cap")


def stage_config(config: dict, stage: str) -> dict:
    """The part of the resolved config that determines a stage's result (and so its skip/resume)."""
    out = {k: config[k] for k in STAGE_CONFIG_KEYS[stage]}
    if stage == REWARD:
        out["ppo_sampling"] = {k: config.get("ppo", {}).get(k) for k in REWARD_STATS_PPO_KEYS}
    if stage == PPO and config.get("ppo", {}).get("rollout_engine") == "vllm":
        out["vllm"] = {k: config.get("vllm", {}).get(k) for k in VLLM_RESULT_KEYS}
    return out


# config values that name a local file or directory (besides the keys marked path=True in rlhf.config,
# which reads them relative to the config file): what they hold counts, not where they lie
_CONTENT_KEYS = ("model.name_or_path",)
_content_ids: dict[tuple, str] = {}


def content_id(value: Any) -> Any:
    """What a path-valued config entry stands for wherever it lies: a published artifact's manifest
    hash, a local file's sha256 or a local directory's (every file's relative name and content);
    `file.py:function` as its file's id and the function's name; hub ids and absent paths as given.
    Each file is hashed once per process while its size and mtime stay the same."""
    if not isinstance(value, str) or not value:
        return value
    head, colon, func = value.rpartition(":") if ".py:" in value else (value, "", "")
    p = Path(head).expanduser()
    try:
        if p.is_dir() and (p / MANIFEST).is_file():
            ident = "artifact:" + _cached_sha256(p / MANIFEST)
        elif p.is_dir():
            h = hashlib.sha256()
            for f in sorted(x for x in p.rglob("*") if x.is_file()):
                h.update(f"{f.relative_to(p).as_posix()}\0{_cached_sha256(f)}\n".encode())
            ident = "dir:" + h.hexdigest()
        elif p.is_file():
            ident = "file:" + _cached_sha256(p)
        else:
            return _hub_revision(value)
    except OSError:
        return value
    return ident + colon + func


def _hub_revision(value: str) -> str:
    """A hub model id as `id@commit` when the local Hugging Face cache has it (the commit its `main`
    pointed to when last fetched: a model rewritten on the hub and fetched again is another input),
    else as given. Nothing is downloaded."""
    if value.count("/") != 1 or value.startswith((".", "/", "~")):
        return value
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        ref = Path(HF_HUB_CACHE) / f"models--{value.replace('/', '--')}" / "refs" / "main"
        return f"{value}@{ref.read_text().strip()}" if ref.is_file() else value
    except (ImportError, OSError):
        return value


def _cached_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _content_ids:
        _content_ids[key] = sha256_file(path)
    return _content_ids[key]


def stage_identity(config: dict, stage: str, data: dict | None = None) -> dict:
    """What decides whether a published stage can be reused, independent of where the checkout, the
    data and the artifact directory lie: the stage config (stage_config) with every path-valued
    entry replaced by its content_id, and each input file's sha256 (hub datasets by name)."""
    from rlhf.config import path_keys

    cfg = json.loads(json.dumps(stage_config(config, stage), default=str))
    for dotted in (*path_keys(), *_CONTENT_KEYS):
        *parents, leaf = dotted.split(".")
        node = cfg
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = content_id(node[leaf])
    out = {"config": cfg}
    if data is not None:
        out["data"] = {k: "file:" + v["sha256"] if (v or {}).get("sha256") else (v or {}).get("path")
                       for k, v in data.items()}
    return out


def _flat(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _shown(v: Any) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    if s.startswith(("file:", "dir:", "artifact:")):  # content ids: the hash's head, a function's name kept
        kind, rest = s.split(":", 1)
        digest, colon, func = rest.partition(":")
        return f"{kind} {digest[:12]}{colon}{func}"
    return s if len(s) <= 60 else s[:57] + "..."


def why_rebuild(artifact_dir: str | Path, stage: str, config: dict, parents: list[Artifact],
                data: dict | None = None) -> list[str]:
    """Why DIR/<stage> cannot be reused for this run, one short reason each; [] when it is complete
    and built from the same stage identity (stage_identity: the config with inputs by content, the
    input files' content) and the same parents."""
    d = stage_dir(artifact_dir, stage)
    m = read_manifest(d)
    if m is None:
        return ["not built yet" if not d.exists() else f"{d} has no readable {MANIFEST}"]
    if m.get("status") != "complete" or m.get("stage") != stage:
        return [f"{d} is not a complete {stage} artifact"]
    damaged = damaged_files(d, m)
    if damaged:
        return [f"{d} is damaged ({damaged[0]})"]
    reasons = []
    if "identity" in m:
        ours, theirs = stage_identity(config, stage, data), m["identity"]
        if data is None:
            theirs = {"config": theirs.get("config")}
        a, b = _flat(theirs), _flat(ours)
        changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        # an input file that changed is named by its config key; data.* names it only when that key did not
        named = {b.get(k) for k in changed if not k.startswith("data.")}
        for key in changed:
            if key.startswith("data.") and b.get(key) in named:
                continue
            reasons.append(f"{key.replace('config.', '', 1).replace('data.', 'input file ', 1)}: "
                           f"{_shown(a.get(key))} -> {_shown(b.get(key))}")
    else:  # published by an older version: compared as it was then, paths included
        if sha256_json(stage_config(m.get("config", {}), stage)) != sha256_json(stage_config(config, stage)):
            reasons.append("the stage config differs (published by an older version, which compared paths too)")
        if data is not None and m.get("data") != data:
            reasons.append("the input files differ")
    theirs = {(p["stage"], p["manifest_sha256"]) for p in m.get("parents", [])}
    ours = {(p.stage, sha256_file(p.path / MANIFEST)) for p in parents}
    if theirs != ours:
        changed = sorted({s for s, _ in theirs ^ ours})
        reasons.append(f"its parent{'s' if len(changed) > 1 else ''} {', '.join(changed)} "
                       f"{'were' if len(changed) > 1 else 'was'} rebuilt since")
    return reasons


def is_up_to_date(artifact_dir: str | Path, stage: str, config: dict, parents: list[Artifact],
                  data: dict | None = None) -> bool:
    """True when DIR/<stage> is complete and built from the same stage config, the same parents
    and (when `data` is given: a `data_fingerprint`) the same input files (why_rebuild)."""
    return not why_rebuild(artifact_dir, stage, config, parents, data)


def prepare_checkpoints(artifact_dir: str | Path, stage: str, config: dict,
                        data: dict | None = None, processes: int = 1) -> tuple[Path, bool]:
    """(checkpoint dir, resuming?). Checkpoints left by a run with another stage config (or other
    input files, when `data` is given) are discarded, so a change never resumes stale state.
    Resumable state written by another number of processes is refused (DeepSpeed's optimizer
    state is partitioned per process): ArtifactError saying how to go on. Call on rank 0 only."""
    ckpt = checkpoint_dir(artifact_dir, stage)
    marker = ckpt / "stage_config.json"
    want = sha256_json(stage_identity(config, stage, data))
    if ckpt.exists():
        try:
            have = json.loads(marker.read_text()) if marker.is_file() else {}
        except (OSError, ValueError):
            have = {}
        if have.get("sha256") != want:
            print(f"[{stage}] discarding checkpoints in {ckpt}: they come from a different configuration", flush=True)
            shutil.rmtree(ckpt)
        elif have.get("processes", processes) != processes and resume_point(artifact_dir, stage):
            n = have["processes"]
            raise ArtifactError(
                f"{ckpt} holds {stage} state from a run on {n} process(es), this run has {processes}: DeepSpeed's "
                f"partitioned optimizer state cannot be resumed on another number of processes. Re-run on {n} "
                f"(deepspeed --num_gpus {n}, NUM_GPUS={n}, or the same hostfile) to continue from "
                f"{resume_point(artifact_dir, stage)}, or delete {ckpt} to start the {stage} stage over.")
    resuming = ckpt.exists()
    ckpt.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"sha256": want, "processes": processes}))
    return ckpt, resuming


def process_started() -> float | None:
    """When this process started (wall clock, from /proc), or None where /proc is missing."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return None


class StageClock:
    """Wall time of a stage summed over its invocations, so a stage that was killed and resumed
    reports the time of all its runs, not the last one's. Rank 0 keeps it in
    checkpoints/<stage>/clock.json; tick() (from every logged step, at most every `every`
    seconds) records the running invocation, so a killed run counts up to its last tick."""

    FILE = "clock.json"

    def __init__(self, ckpt_dir: Path | None, started: float, enabled: bool = True, every: float = 1.0):
        self.path = ckpt_dir / self.FILE if ckpt_dir is not None else None
        # from the process's start: its imports and set-up are part of the stage's time
        self.started, self.enabled, self.every = min(started, process_started() or started), enabled, every
        self.earlier: list[float] = []
        if self.path is not None and self.path.is_file():
            try:
                self.earlier = [float(x) for x in json.loads(self.path.read_text())["seconds"]]
            except (OSError, ValueError, KeyError, TypeError):
                self.earlier = []
        self._last = 0.0

    def total(self) -> float:
        return sum(self.earlier) + time.time() - self.started

    def count(self) -> int:
        return len(self.earlier) + 1

    def tick(self, force: bool = False) -> None:
        now = time.time()
        if not self.enabled or self.path is None or (not force and now - self._last < self.every):
            return
        self._last = now
        tmp = self.path.with_name(self.FILE + ".part")
        tmp.write_text(json.dumps({"seconds": self.earlier + [round(now - self.started, 3)]}))
        os.replace(tmp, self.path)


CKPT_SEAL = "rlhf_checkpoint.json"  # in an HF checkpoint-N: its files' sizes, written after they reach the disk


def seal(root: Path, dirs: list[Path]) -> dict[str, int]:
    """Flush every file under `dirs` to the disk (fsync) and return {path relative to `root`: bytes}:
    what a checkpoint must hold to be trusted. Written after the files, a seal names a checkpoint
    complete; a crash that tears a file (the page cache lost, an empty optimizer file) leaves a file
    whose size disagrees with it, or no seal."""
    sizes = {}
    for d in dirs:
        for f in sorted(x for x in Path(d).rglob("*") if x.is_file()):
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
            sizes[f.relative_to(root).as_posix()] = f.stat().st_size
    return sizes


def write_durably(path: Path, text: str) -> None:
    """`text` into `path` atomically (a temporary sibling renamed into place), flushed to the disk."""
    tmp = path.with_name(path.name + ".part")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def seal_problems(root: Path, sizes: dict | None) -> list[str]:
    """Why a sealed checkpoint under `root` cannot be trusted ([] when every file has its size)."""
    if not sizes:
        return ["no seal (written by an interrupted save, or by an older version)"]
    problems = []
    for rel, size in sizes.items():
        f = root / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{rel} has {f.stat().st_size} bytes, {size} were written")
    return problems


def hf_checkpoints(ckpt_dir: Path, verified: bool = True) -> list[tuple[int, Path]]:
    """(step, path) of each `checkpoint-N` the HF trainer wrote completely (its trainer_state.json
    exists) and, with `verified`, whose seal holds (checkpoint_problems), oldest first."""
    found = []
    for p in Path(ckpt_dir).glob("checkpoint-*"):
        step = p.name[len("checkpoint-"):]
        if step.isdigit() and (p / "trainer_state.json").is_file() and not (verified and checkpoint_problems(p)):
            found.append((int(step), p))
    return sorted(found)


def checkpoint_problems(path: Path) -> list[str]:
    """Why the HF checkpoint `path` cannot be resumed from ([] when its seal holds)."""
    try:
        sizes = json.loads((path / CKPT_SEAL).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        sizes = None
    return seal_problems(path, sizes)


def ppo_states(ckpt_dir: Path) -> list[tuple[Path, dict, list[str]]]:
    """PPO's checkpoints, newest first: (state file, its state or {}, why it cannot be trusted). PPO
    keeps the last two: state.json and state.prev.json, each naming its engines' tag and sizes."""
    out = []
    for name in ("state.json", "state.prev.json"):
        f = Path(ckpt_dir) / name
        if not f.is_file():
            continue
        try:
            state = json.loads(f.read_text())
            problems = seal_problems(Path(ckpt_dir), state["files"]) if "files" in state else []
        except (OSError, ValueError, KeyError, TypeError) as e:
            state, problems = {}, [f"{name} is unreadable ({type(e).__name__})"]
        out.append((f, state, problems))
    return out


def resume_point(artifact_dir: str | Path, stage: str) -> str | None:
    """Where a re-run of an unfinished stage continues ("update 5", "step 40"), or None when it
    has no usable checkpoint (a re-run starts over). Damaged checkpoints are passed over, as the
    re-run passes over them (damaged_checkpoints says which)."""
    ckpt = checkpoint_dir(artifact_dir, stage)
    states = ppo_states(ckpt)
    if states:
        good = [s for _, s, problems in states if not problems and "update" in s]
        return f"update {good[0]['update']}" if good else None
    found = hf_checkpoints(ckpt)
    return f"step {found[-1][0]}" if found else None


def damaged_checkpoints(artifact_dir: str | Path, stage: str) -> list[str]:
    """'NAME: problem' of each checkpoint a re-run of `stage` will pass over."""
    ckpt = checkpoint_dir(artifact_dir, stage)
    out = [f"{f.name}: {problems[0]}" for f, _, problems in ppo_states(ckpt) if problems]
    for _, p in hf_checkpoints(ckpt, verified=False):
        problems = checkpoint_problems(p)
        if problems:
            out.append(f"{p.name}: {problems[0]}")
    return out


def leftovers(artifact_dir: str | Path, stage: str) -> list[Path]:
    """Directories an interrupted publish left behind (the staging dir, a swapped-out old copy);
    the stage's next run removes them."""
    d = Path(artifact_dir)
    return [p for p in [staging_dir(d, stage), *sorted(d.glob(f".{stage}.old-*"))] if p.exists()]


def origin(manifest: dict | None) -> str | None:
    """Where a published stage's model came from, in words: "imported from SRC (...)" for a model
    the pipeline did not train (sft.import_model, reward.import_model), "trained from BASE" for
    one it trained; None for a manifest without a model."""
    if not manifest:
        return None
    imported, model = manifest.get("imported"), manifest.get("model") or {}
    if imported:
        held = imported.get("content") or imported.get("revision")
        details = [imported.get("kind"), _shown(held) if held else None,
                   "its own tokenizer, scored on text" if model.get("own_tokenizer") else None]
        return f"imported from {imported.get('source')} (" + ", ".join(d for d in details if d) + ")"
    if manifest.get("stage") == PPO:
        return None
    base = model.get("base")
    return f"trained from {base}" if base else None


def stage_state(artifact_dir: str | Path, stage: str) -> str:
    """complete / damaged (complete manifest, files missing or of the wrong size) / partial
    (resumable state or an unfinished publish exists) / missing."""
    m = read_manifest(stage_dir(artifact_dir, stage))
    if m is not None and m.get("status") == "complete" and m.get("stage") == stage:
        return "damaged" if damaged_files(stage_dir(artifact_dir, stage), m) else "complete"
    ckpt = checkpoint_dir(artifact_dir, stage)
    if (ckpt.exists() and any(ckpt.iterdir())) or stage_dir(artifact_dir, stage).exists() or leftovers(artifact_dir, stage):
        return "partial"
    return "missing"

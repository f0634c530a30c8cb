"""Loaders and validators for the data formats of reward_data/README.md.

Every loader reads rows from a local .jsonl/.json/.parquet/.csv file or a `datasets`
hub id (`name` or `name:split`), checks each row, and returns plain Python records.
A bad row raises DataError naming the file, the 1-based row number and the field.

Prompts are kept as either a string (used as written, or wrapped as one user turn
when a chat template is in use) or a list of chat messages; `render_prompt` turns
them into the exact text every stage feeds the model.

A malformed row (bad JSON, a missing or wrongly typed field, a non-finite number, a wrong
structure) raises DataError. A well-formed row that cannot be used (an empty response,
chosen == rejected, an all-tied ranking, transcripts whose histories differ, no prompt) is
skipped and counted by reason (SKIP_REASONS); the SFT and preference loaders fail when
more than `max_skipped_fraction` of the rows were skipped.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Union

Prompt = Union[str, list]  # str or [{"role", "content"}, ...]


class DataError(ValueError):
    """A data problem, located: file, row, field (and the config key that names the file, when known)."""

    def __init__(self, source: str, row: int | None, field: str | None, msg: str, key: str | None = None):
        where = (f"{key}: " if key else "") + f"{source}" + (f", row {row}" if row is not None else "") \
            + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {msg}")
        self.source, self.row, self.field, self.msg, self.key = source, row, field, msg, key

    def under_key(self, key: str) -> "DataError":
        """The same error, its message led by the config key that named the file."""
        return DataError(self.source, self.row, self.field, self.msg, key=key)


# ---------------------------------------------------------------- reading rows

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def is_local(source: str) -> bool:
    """True when `source` names a local file (or something on disk), False for a datasets hub id."""
    p = Path(source)
    return p.exists() or p.suffix.lower() in SUFFIXES or source.startswith((".", "/"))


def iter_rows(source: str) -> Iterator[tuple[int, Any]]:
    """(1-based row number, row) for every row of a local file or hub dataset."""
    p = Path(source)
    if p.is_dir():
        raise DataError(source, None, None, f"is a directory; give a data file ({', '.join(SUFFIXES)})")
    if p.is_file():
        suffix = p.suffix.lower()
        try:
            if suffix == ".jsonl":
                yield from _jsonl_rows(source, p)
            elif suffix == ".json":
                yield from _json_rows(source, p)
            elif suffix in (".parquet", ".csv"):
                yield from _table_rows(source, p, suffix[1:])
            else:
                raise DataError(source, None, None, f"unsupported file type; use {', '.join(SUFFIXES)}")
        except OSError as e:
            raise DataError(source, None, None, f"cannot be read ({e.strerror or e})") from None
        return
    if is_local(source):
        raise DataError(source, None, None, "file not found")
    import datasets  # a hub id; needs a network

    name, _, split = source.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001 - report any hub failure the same way
        raise DataError(source, None, None, f"not a local file, and loading it as a datasets hub id failed: {e}") from None
    yield from enumerate(_dataset_rows(ds), 1)


def _not_utf8(raw: bytes, e: UnicodeDecodeError, column: int) -> str:
    return f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); save the file with UTF-8 encoding"


def _utf8_line(source: str, row: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig" if row == 1 else "utf-8")  # a byte-order mark may open the file
    except UnicodeDecodeError as e:
        raise DataError(source, row, None, _not_utf8(raw, e, e.start + 1)) from None


def _check_utf8_lines(source: str, data: bytes) -> None:
    """DataError naming the line and column of the first byte of `data` that is not UTF-8."""
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(source, None, None, f"line {line}: " + _not_utf8(data, e, e.start - line_start + 1)) from None


def _jsonl_rows(source: str, p: Path) -> Iterator[tuple[int, Any]]:
    """One JSON value per line; rows are numbered by line (blank lines count, and are skipped)."""
    with p.open("rb") as f:
        for i, raw in enumerate(f, 1):
            line = _utf8_line(source, i, raw)
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(source, i, None, f"not valid JSON ({e.msg}); each line must be one JSON object") from None


def _json_rows(source: str, p: Path) -> Iterator[tuple[int, Any]]:
    data = p.read_bytes()
    _check_utf8_lines(source, data)
    try:
        rows = json.loads(data.decode("utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(source, None, None, f"not valid JSON ({e})") from None
    if isinstance(rows, dict):  # {"data": [...]} or {"train": [...]} style
        lists = [v for v in rows.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(source, None, None, "expected a JSON list of rows (or an object holding one list)")
        rows = lists[0]
    if not isinstance(rows, list):
        raise DataError(source, None, None, "expected a JSON list of rows")
    yield from enumerate(rows, 1)


def _table_rows(source: str, p: Path, kind: str) -> Iterator[tuple[int, Any]]:
    """Rows of a .parquet or .csv file, read by `datasets` (a CSV is checked for UTF-8 line by line first)."""
    import datasets

    if kind == "csv":
        with p.open("rb") as f:
            for i, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(source, None, None, f"line {i}: " + _not_utf8(raw, e, e.start + 1)) from None
    try:
        ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    except Exception as e:  # noqa: BLE001 - any reader failure is a file the user must fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(source, None, None, f"could not be read as {kind.upper()}: {first}") from None
    yield from enumerate(_dataset_rows(ds), 1)


def _dataset_rows(ds: Any) -> Iterator[dict]:
    """The rows of a `datasets.Dataset` as dicts, read in column batches (reading row by row
    costs ~15 us a row in `datasets`' formatting; batches make 160k rows take a fraction of a second)."""
    for batch in ds.iter(batch_size=1024):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield dict(zip(keys, values))


def _text(source: str, row: int, rec: dict, key: str, allow_empty: bool = False) -> str:
    if key not in rec or rec[key] is None:
        raise DataError(source, row, key, f"missing (row has {sorted(rec)})")
    v = rec[key]
    if not isinstance(v, str):
        raise DataError(source, row, key, f"must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataError(source, row, key, "is empty")
    return v


def _messages(source: str, row: int, v: Any, key: str) -> list:
    if not isinstance(v, list) or not v:
        raise DataError(source, row, key, "must be a non-empty list of {role, content} messages")
    for j, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(source, row, f"{key}[{j}]", "each message needs string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in v]


def _object(source: str, row: int, rec: Any) -> dict:
    if not isinstance(rec, dict):
        raise DataError(source, row, None, f"each row must be a JSON object, got {type(rec).__name__}")
    return rec


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector while a loader builds its records.

    Loading creates millions of small dicts/tuples that all stay alive, and every collection
    pass rescans them: about half of the time of loading a 160k-row file. The loaders create
    no reference cycles, so nothing is left uncollected.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# ---------------------------------------------------------------- skipped rows

NO_ROWS = "no rows (the file is empty, holds only blank lines, or an empty list); see reward_data/README.md for the formats"
SKIP_REASONS = ("empty_response", "identical", "tie", "prompt_mismatch", "empty_prompt")


class _Skip(Exception):
    """A well-formed row that cannot be used; carries one of SKIP_REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _check_skipped(source: str, rows: int, used: int, skipped: dict[str, int], max_skipped_fraction: float,
                   skip_key: str, what: str) -> None:
    """Fail when nothing is usable, or when more than max_skipped_fraction of the rows were skipped."""
    n_skipped = sum(skipped.values())
    counts = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    if used == 0:
        detail = f"; {n_skipped} of {rows} rows skipped ({counts})" if n_skipped else ""
        raise DataError(source, None, None, f"no usable {what}{detail}")
    if rows and n_skipped / rows > max_skipped_fraction:
        raise DataError(source, None, None,
                        f"{n_skipped} of {rows} rows ({n_skipped / rows:.2%}) are unusable and were skipped "
                        f"({counts}), more than {skip_key}={max_skipped_fraction:g} "
                        f"({max_skipped_fraction:.2%}) allows; clean the file or raise {skip_key}")


def _empty_prompt(prompt: Prompt) -> bool:
    if isinstance(prompt, str):
        return not prompt.strip()
    return not any(m["content"].strip() for m in prompt)


def _finite(source: str, row: int, key: str, v: Any) -> float:
    """A JSON number that is finite (NaN and ±Infinity parse in Python's json, and are malformed here)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise DataError(source, row, key, f"must be a number, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise DataError(source, row, key, f"must be a finite number, got {v!r}")
    return f


# ---------------------------------------------------------------- SFT

@dataclass(frozen=True)
class SFTExample:
    prompt: Prompt       # everything before the last assistant turn
    completion: str      # the last assistant turn
    messages: list | None = None  # the whole conversation, for conversational rows; else None


@dataclass(frozen=True)
class SFTData:
    examples: list[SFTExample]
    rows: int                   # rows read, skipped ones included
    skipped: dict[str, int]     # reason -> rows skipped for it (only reasons that occurred)


def load_sft(source: str, *, max_skipped_fraction: float = 0.01,
             skip_key: str = "max_skipped_fraction") -> SFTData:
    """{"prompt", "completion"} (prompt a string or messages, completion a string or messages)
    or {"messages": [..., assistant]}. Rows with an empty final response or an empty prompt are
    skipped and counted; more than max_skipped_fraction of them is an error naming skip_key."""
    with _gc_paused():
        out: list[SFTExample] = []
        skipped: dict[str, int] = {}
        rows = 0
        for row, rec in iter_rows(source):
            rec = _object(source, row, rec)
            rows += 1
            try:
                out.append(_sft_row(source, row, rec))
            except _Skip as s:
                skipped[s.reason] = skipped.get(s.reason, 0) + 1
        if rows == 0:
            raise DataError(source, None, None, NO_ROWS)
        _check_skipped(source, rows, len(out), skipped, max_skipped_fraction, skip_key, "SFT examples")
        return SFTData(examples=out, rows=rows, skipped=skipped)


def _sft_row(source: str, row: int, rec: dict) -> SFTExample:
    if rec.get("messages") is not None:
        msgs = _messages(source, row, rec["messages"], "messages")
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise DataError(source, row, "messages", "must end with an assistant message that follows at least one other turn")
        return _sft_conversation(msgs)
    if rec.get("prompt") is not None:
        prompt = rec["prompt"]
        prompt = _messages(source, row, prompt, "prompt") if isinstance(prompt, list) else _text(source, row, rec, "prompt", allow_empty=True)
        completion = rec.get("completion")
        if isinstance(completion, list):  # conversational completion, ending with an assistant message
            comp = _messages(source, row, completion, "completion")
            if comp[-1]["role"] != "assistant":
                raise DataError(source, row, "completion", "a message-list completion must end with an assistant message")
            if isinstance(prompt, list) or len(comp) > 1:
                head = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
                return _sft_conversation(head + comp)
            completion = comp[-1]["content"]
        else:
            completion = _text(source, row, rec, "completion", allow_empty=True)
        if _empty_prompt(prompt):
            raise _Skip("empty_prompt")
        if not completion.strip():
            raise _Skip("empty_response")
        return SFTExample(prompt=prompt, completion=completion)
    raise DataError(source, row, None, "expected {'prompt', 'completion'} or {'messages'} (see reward_data/README.md)")


def _sft_conversation(msgs: list) -> SFTExample:
    if _empty_prompt(msgs[:-1]):
        raise _Skip("empty_prompt")
    if not msgs[-1]["content"].strip():
        raise _Skip("empty_response")
    return SFTExample(prompt=msgs[:-1], completion=msgs[-1]["content"], messages=msgs)


# ---------------------------------------------------------------- preferences

@dataclass(frozen=True)
class PreferencePair:
    prompt: Prompt
    chosen: str
    rejected: str
    margin: float = 0.0
    weight: float = 1.0
    group: int = 0          # index of the source row: pairs of one prompt share it
    rank_distance: int = 1  # |rank(chosen) - rank(rejected)| within a ranking; 1 for plain pairs


@dataclass(frozen=True)
class PreferenceData:
    pairs: list[PreferencePair]
    ties_dropped: int           # tied pairs dropped inside rankings that still gave pairs, plus tied rows
    rows: int                   # rows read, skipped ones included
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows skipped (only reasons that occurred)


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class PromptMismatch(ValueError):
    """Chosen and rejected transcripts differ before their last assistant turn."""


def parse_hh(text: str) -> list[dict]:
    """Split a raw HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not an HH-RLHF transcript: expected it to start with '\\n\\nHuman:'")
    msgs = []
    for role, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if role == "Human" else "assistant", "content": content})
    return msgs


def split_hh_pair(chosen: str, rejected: str) -> tuple[list, str, str]:
    """(prompt messages, chosen reply, rejected reply) of an HH-RLHF pair: the prompt is
    the shared transcript up to the last Assistant turn. Raises ValueError for a text that
    is no transcript or does not end with an Assistant turn, and PromptMismatch (a ValueError)
    when the two transcripts differ before their last Assistant turn."""
    c, r = parse_hh(chosen), parse_hh(rejected)
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise ValueError("the transcript must end with an Assistant turn")
    if c[:-1] != r[:-1]:
        raise PromptMismatch("chosen and rejected transcripts differ before the last Assistant turn")
    prompt = [{"role": m["role"], "content": m["content"].strip()} for m in c[:-1]]
    # the reply keeps its leading space: it is the exact continuation of "...Assistant:"
    return prompt, c[-1]["content"].rstrip(), r[-1]["content"].rstrip()


def expand_ranking(responses: list[str], scores: list[float] | None) -> tuple[list[tuple[int, int, int]], int]:
    """All (better, worse, rank distance) index pairs of a K-wise ranking, and the number of ties dropped.

    Without scores the list is ordered best to worst and identical responses tie. With
    scores, higher is better and equal scores tie. K responses give K(K-1)/2 pairs minus ties.
    """
    k = len(responses)
    rank = list(range(k)) if scores is None else [-s for s in scores]  # lower is better; equal ties
    order = sorted(range(k), key=rank.__getitem__)
    pairs, ties = [], 0
    for a in range(k):
        for b in range(a + 1, k):
            i, j = order[a], order[b]
            if rank[i] == rank[j] or responses[i] == responses[j]:
                ties += 1
                continue
            pairs.append((i, j, b - a))
    return pairs, ties


def load_preferences(source: str, weighting: str = "per_prompt", *, max_skipped_fraction: float = 0.01,
                     skip_key: str = "max_skipped_fraction") -> PreferenceData:
    """Pairs from any preference format; see reward_data/README.md.

    weighting="per_prompt": the pairs of one row share a total weight equal to the mean
    number of pairs per row, so every prompt counts the same however many responses it
    ranked, and the mean weight stays 1 (InstructGPT trains on each prompt's pairs as one
    unit for the same reason). weighting="uniform": every pair weighs 1.

    Malformed rows raise DataError. Well-formed rows that give no pair (empty response,
    chosen == rejected, an all-tied ranking, HH/conversation histories that differ, no
    prompt) are skipped and counted in `skipped`; when more than max_skipped_fraction of
    the rows are skipped, DataError names skip_key (the config key that raises the limit).
    """
    with _gc_paused():
        if weighting not in ("per_prompt", "uniform"):
            raise ValueError(f"weighting must be 'per_prompt' or 'uniform', got {weighting!r}")
        # one entry per row that gave pairs: (group, prompt, [(chosen, rejected, margin, rank_distance), ...])
        groups: list[tuple[int, Prompt, list[tuple[str, str, float, int]]]] = []
        skipped: dict[str, int] = {}
        ties = 0
        rows = 0
        n_pairs = 0
        for row, rec in iter_rows(source):
            rec = _object(source, row, rec)
            g = rows
            rows += 1
            try:
                prompt, items, t = _preference_row(source, row, rec)
            except _Skip as s:
                skipped[s.reason] = skipped.get(s.reason, 0) + 1
                if s.reason in ("identical", "tie"):
                    ties += 1
                continue
            ties += t
            groups.append((g, prompt, items))
            n_pairs += len(items)
        if rows == 0:
            raise DataError(source, None, None, NO_ROWS)
        _check_skipped(source, rows, n_pairs, skipped, max_skipped_fraction, skip_key,
                       "preference pairs (all rows empty, tied or otherwise unusable)")
        mean_pairs = n_pairs / len(groups)
        pairs = []
        append = pairs.append
        for g, prompt, items in groups:
            w = mean_pairs / len(items) if weighting == "per_prompt" else 1.0
            for c, r, m, d in items:
                append(PreferencePair(prompt, c, r, m, w, g, d))
        return PreferenceData(pairs=pairs, ties_dropped=ties, rows=rows, skipped=skipped)


def _preference_row(source: str, row: int, rec: dict) -> tuple[Prompt, list[tuple[str, str, float, int]], int]:
    """(prompt, [(chosen, rejected, margin, rank distance)], tied pairs dropped) of one row, or _Skip."""
    if rec.get("responses") is not None:
        resp = rec["responses"]
        if not isinstance(resp, list) or len(resp) < 2:
            raise DataError(source, row, "responses", "a ranking needs a list of at least 2 responses")
        for j, r in enumerate(resp):
            if not isinstance(r, str):
                raise DataError(source, row, f"responses[{j}]", f"must be a string, got {type(r).__name__}")
        prompt = _prompt_field(source, row, rec)
        scores = rec.get("scores")
        if scores is not None:
            if not isinstance(scores, list) or len(scores) != len(resp):
                raise DataError(source, row, "scores", f"must be a list of {len(resp)} numbers, one per response")
            scores = [_finite(source, row, f"scores[{j}]", s) for j, s in enumerate(scores)]
        if _empty_prompt(prompt):
            raise _Skip("empty_prompt")
        if any(not r.strip() for r in resp):
            raise _Skip("empty_response")
        idx, t = expand_ranking(resp, scores)
        if not idx:
            raise _Skip("tie")
        return prompt, [(resp[i], resp[j], 0.0, d) for i, j, d in idx], t
    if "chosen" in rec or "rejected" in rec:
        margin = rec.get("margin")
        margin = 0.0 if margin is None else _finite(source, row, "margin", margin)
        c, r = rec.get("chosen"), rec.get("rejected")
        if isinstance(c, list) or isinstance(r, list):
            prompt, chosen, rejected = _conversational_pair(source, row, rec)
        else:
            chosen = _text(source, row, rec, "chosen", allow_empty=True)
            rejected = _text(source, row, rec, "rejected", allow_empty=True)
            if chosen == rejected:
                raise _Skip("identical")
            if rec.get("prompt") is not None:
                prompt = _prompt_field(source, row, rec)
            elif chosen.startswith("\n\nHuman:"):
                try:
                    prompt, chosen, rejected = split_hh_pair(chosen, rejected)
                except PromptMismatch:
                    raise _Skip("prompt_mismatch") from None
                except ValueError as e:
                    raise DataError(source, row, "chosen", str(e)) from None
            else:
                prompt, chosen, rejected = _split_shared_prefix(chosen, rejected)
        if _empty_prompt(prompt):
            raise _Skip("empty_prompt")
        if not chosen.strip() or not rejected.strip():
            raise _Skip("empty_response")
        if chosen == rejected:
            raise _Skip("identical")
        return prompt, [(chosen, rejected, margin, 1)], 0
    raise DataError(source, row, None,
                    "expected {'prompt','chosen','rejected'}, {'chosen','rejected'} or {'prompt','responses'} (see reward_data/README.md)")


def _conversational_pair(source: str, row: int, rec: dict) -> tuple[Prompt, str, str]:
    """TRL's conversational layouts: chosen/rejected are message lists that end with the response
    (one assistant message). The messages they share before it are the prompt when they are
    whole conversations (UltraFeedback-binarized, implicit prompt); when they start with an
    assistant message they continue the row's `prompt` (explicit prompt)."""
    for key in ("chosen", "rejected"):
        v = rec.get(key)
        if v is None:
            raise DataError(source, row, key, f"missing (row has {sorted(rec)})")
        if not isinstance(v, list):
            raise DataError(source, row, key, f"must be a message list like the other of chosen/rejected, got {type(v).__name__}")
    c = _messages(source, row, rec["chosen"], "chosen")
    r = _messages(source, row, rec["rejected"], "rejected")
    for key, msgs in (("chosen", c), ("rejected", r)):
        if msgs[-1]["role"] != "assistant":
            raise DataError(source, row, key, "must end with the response: one assistant message")
    n, limit = 0, min(len(c), len(r)) - 1
    while n < limit and c[n] == r[n]:
        n += 1
    if len(c) - n != 1 or len(r) - n != 1:
        if len(c) == len(r):  # same turns, but the histories differ
            raise _Skip("prompt_mismatch")
        key, msgs = ("chosen", c) if len(c) - n != 1 else ("rejected", r)
        raise DataError(source, row, key,
                        f"the response must be exactly one final assistant message after the messages shared "
                        f"by chosen and rejected; {key} has {len(msgs) - n} after them")
    shared = c[:n]
    has_prompt = rec.get("prompt") is not None
    if has_prompt and (not shared or shared[0]["role"] == "assistant"):
        prompt = _prompt_field(source, row, rec)  # explicit prompt; chosen/rejected continue it
        if shared:
            prompt = (prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]) + shared
    else:
        prompt = shared  # whole conversations: the prompt field, if any, is ignored
    return prompt, c[-1]["content"], r[-1]["content"]


def _prompt_field(source: str, row: int, rec: dict) -> Prompt:
    if isinstance(rec.get("prompt"), list):
        return _messages(source, row, rec["prompt"], "prompt")
    return _text(source, row, rec, "prompt", allow_empty=True)


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix, compared in C-speed slices rather than char by char."""
    m = min(len(a), len(b))
    if a[:m] == b[:m]:
        return m
    lo, hi = 0, m  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _split_shared_prefix(a: str, b: str) -> tuple[str, str, str]:
    n = _common_prefix_len(a, b)
    # do not cut inside a word: back off to the last whitespace of the shared prefix
    cut = n if n == len(a) or n == len(b) or a[n - 1:n].isspace() else max(a.rfind(" ", 0, n), 0)
    return a[:cut], a[cut:], b[cut:]


# ---------------------------------------------------------------- prompts

def load_prompts_counted(source: str) -> tuple[list[Prompt], dict[str, int]]:
    """(prompts, skipped) where skipped counts empty prompts by reason ("empty_prompt")."""
    with _gc_paused():
        out: list[Prompt] = []
        skipped: dict[str, int] = {}
        for row, rec in iter_rows(source):
            rec = _object(source, row, rec)
            if rec.get("prompt") is None and rec.get("messages") is not None:
                msgs = _messages(source, row, rec["messages"], "messages")
                prompt: Prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
            else:
                prompt = _prompt_field(source, row, rec)
            if _empty_prompt(prompt):
                skipped["empty_prompt"] = skipped.get("empty_prompt", 0) + 1
                continue
            out.append(prompt)
        if not out:
            raise DataError(source, None, None, f"no prompts ({skipped['empty_prompt']} empty prompts skipped)" if skipped
                            else NO_ROWS)
        return out, skipped


def load_prompts(source: str) -> list[Prompt]:
    """{"prompt": str or messages} per row (SFT rows are accepted: their completion is ignored,
    and a messages row drops its final assistant turn). Empty prompts are skipped."""
    return load_prompts_counted(source)[0]


# ---------------------------------------------------------------- rendering

def render_prompt(tokenizer: Any, prompt: Prompt, use_chat_template: bool) -> str:
    """The text a model sees before its response; identical in every stage."""
    templated = use_chat_template and getattr(tokenizer, "chat_template", None)
    if isinstance(prompt, str):
        if not templated:
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    # earlier replies are written as render_response writes a reply (its leading spaces are the
    # rendering's business), so a conversation renders its turns the same way wherever it is cut
    prompt = [{**m, "content": m["content"].lstrip(" ")} if m["role"] == "assistant" else m for m in prompt]
    if templated:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    # no chat template: a plain Human/Assistant transcript (the HH-RLHF convention)
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in prompt) + "\n\nAssistant:"


def render_response(tokenizer: Any, prompt: Prompt, response: str, use_chat_template: bool) -> str:
    """The text of a response as it follows render_prompt(prompt), in every stage: joined the way
    the rendering joins an earlier assistant turn to its header — " reply" after a transcript's
    "Assistant:" (raw HH-RLHF replies already start so), "reply" after ChatML's or Llama-3's
    assistant header, " reply" after the scratch template's "<|assistant|>". A string prompt
    without a chat template is the user's own format: its response is used as written."""
    templated = use_chat_template and getattr(tokenizer, "chat_template", None)
    if isinstance(prompt, str) and not templated:
        return response
    return response_separator(tokenizer, bool(templated)) + response.lstrip(" ")


def response_separator(tokenizer: Any, templated: bool) -> str:
    """What a rendering puts between the assistant header and the reply ("" or " ")."""
    if not templated:
        return " "
    cached = getattr(tokenizer, "_rlhf_response_sep", None)
    if cached is not None:
        return cached
    mark = "\u2063RESPONSE\u2063"
    user = [{"role": "user", "content": "x"}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": mark}], tokenize=False)
    sep = ""
    if full.startswith(head) and mark in full[len(head):]:
        sep = full[len(head):full.index(mark, len(head))]
    try:
        tokenizer._rlhf_response_sep = sep
    except AttributeError:
        pass
    return sep


def prompt_text(prompt: Prompt) -> str:
    """A readable one-string form of a prompt (for samples, reports and the gold scorer)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)

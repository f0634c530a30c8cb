"""Loaders and validators for the data formats of reward_data/README.md.

Every loader reads rows from a local .jsonl/.json/.parquet/.csv file or a `datasets`
hub id (`name` or `name:split`), checks each row, and returns plain Python records.
A bad row raises DataError naming the file, the 1-based row number and the field.

Prompts are kept as either a string (used as written, or wrapped as one user turn
when a chat template is in use) or a list of chat messages; `render_prompt` turns
them into the exact text every stage feeds the model.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Union

Prompt = Union[str, list]  # str or [{"role", "content"}, ...]


class DataError(ValueError):
    """A data problem, located: file, row, field."""

    def __init__(self, source: str, row: int | None, field: str | None, msg: str):
        where = f"{source}" + (f", row {row}" if row is not None else "") + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {msg}")
        self.source, self.row, self.field = source, row, field


# ---------------------------------------------------------------- reading rows

def iter_rows(source: str) -> Iterator[tuple[int, Any]]:
    """(1-based row number, row) for every row of a local file or hub dataset."""
    p = Path(source)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            with p.open() as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield i, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(source, i, None, f"not valid JSON ({e.msg}); each line must be one JSON object") from None
        elif suffix == ".json":
            try:
                data = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise DataError(source, None, None, f"not valid JSON ({e})") from None
            if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} style
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise DataError(source, None, None, "expected a JSON list of rows (or an object holding one list)")
                data = lists[0]
            if not isinstance(data, list):
                raise DataError(source, None, None, "expected a JSON list of rows")
            yield from enumerate(data, 1)
        elif suffix in (".parquet", ".csv"):
            import datasets

            ds = datasets.load_dataset(suffix[1:], data_files=str(p), split="train")
            yield from enumerate(ds, 1)
        else:
            raise DataError(source, None, None, "unsupported file type; use .jsonl, .json, .parquet or .csv")
        return
    if p.suffix.lower() in (".jsonl", ".json", ".parquet", ".csv") or source.startswith((".", "/")):
        raise DataError(source, None, None, "file not found")
    import datasets  # a hub id; needs a network

    name, _, split = source.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001 - report any hub failure the same way
        raise DataError(source, None, None, f"not a local file, and loading it as a datasets hub id failed: {e}") from None
    yield from enumerate(ds, 1)


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


# ---------------------------------------------------------------- SFT

@dataclass(frozen=True)
class SFTExample:
    prompt: Prompt
    completion: str


def load_sft(source: str) -> list[SFTExample]:
    """{"prompt", "completion"} (prompt a string or messages) or {"messages": [..., assistant]}."""
    out = []
    for row, rec in iter_rows(source):
        rec = _object(source, row, rec)
        if "messages" in rec:
            msgs = _messages(source, row, rec["messages"], "messages")
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                raise DataError(source, row, "messages", "must end with an assistant message that follows at least one other turn")
            if not msgs[-1]["content"].strip():
                raise DataError(source, row, "messages", "the final assistant message is empty")
            out.append(SFTExample(prompt=msgs[:-1], completion=msgs[-1]["content"]))
        elif "prompt" in rec:
            prompt = rec["prompt"] if isinstance(rec["prompt"], list) else _text(source, row, rec, "prompt")
            if isinstance(prompt, list):
                prompt = _messages(source, row, prompt, "prompt")
            completion = rec.get("completion")
            if isinstance(completion, list):  # conversational completion: one assistant message
                completion = _messages(source, row, completion, "completion")[-1]["content"]
                rec = {**rec, "completion": completion}
            out.append(SFTExample(prompt=prompt, completion=_text(source, row, rec, "completion")))
        else:
            raise DataError(source, row, None, "expected {'prompt', 'completion'} or {'messages'} (see reward_data/README.md)")
    if not out:
        raise DataError(source, None, None, "no rows")
    return out


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
    ties_dropped: int
    rows: int


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


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
    the shared transcript up to the last Assistant turn."""
    c, r = parse_hh(chosen), parse_hh(rejected)
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise ValueError("the transcript must end with an Assistant turn")
    if c[:-1] != r[:-1]:
        raise ValueError("chosen and rejected transcripts differ before the last Assistant turn")
    prompt = [{"role": m["role"], "content": m["content"].strip()} for m in c[:-1]]
    # the reply keeps its leading space: it is the exact continuation of "...Assistant:"
    return prompt, c[-1]["content"].rstrip(), r[-1]["content"].rstrip()


def expand_ranking(responses: list[str], scores: list[float] | None) -> tuple[list[tuple[int, int, int]], int]:
    """All (better, worse, rank distance) index pairs of a K-wise ranking, and the number of ties dropped.

    Without scores the list is ordered best to worst and identical responses tie. With
    scores, higher is better and equal scores tie. K responses give K(K-1)/2 pairs minus ties.
    """
    k = len(responses)
    if scores is None:
        order = list(range(k))
        key = lambda i: i  # noqa: E731 - rank position
    else:
        order = sorted(range(k), key=lambda i: -scores[i])
        key = lambda i: -scores[i]  # noqa: E731
    pairs, ties = [], 0
    for a in range(k):
        for b in range(a + 1, k):
            i, j = order[a], order[b]
            if key(i) == key(j) or responses[i] == responses[j]:
                ties += 1
                continue
            pairs.append((i, j, b - a))
    return pairs, ties


def load_preferences(source: str, weighting: str = "per_prompt") -> PreferenceData:
    """Pairs from any preference format; see reward_data/README.md.

    weighting="per_prompt": the pairs of one row share a total weight equal to the mean
    number of pairs per row, so every prompt counts the same however many responses it
    ranked, and the mean weight stays 1 (InstructGPT trains on each prompt's pairs as one
    unit for the same reason). weighting="uniform": every pair weighs 1.
    """
    groups: list[list[PreferencePair]] = []
    ties = 0
    rows = 0
    for row, rec in iter_rows(source):
        rec = _object(source, row, rec)
        rows += 1
        g = len(groups)
        pairs: list[PreferencePair] = []
        if "responses" in rec:
            prompt = _prompt_field(source, row, rec)
            resp = rec["responses"]
            if not isinstance(resp, list) or len(resp) < 2:
                raise DataError(source, row, "responses", "a ranking needs a list of at least 2 responses")
            for j, r in enumerate(resp):
                if not isinstance(r, str) or not r.strip():
                    raise DataError(source, row, f"responses[{j}]", "must be a non-empty string")
            scores = rec.get("scores")
            if scores is not None:
                if not isinstance(scores, list) or len(scores) != len(resp) or not all(
                        isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
                    raise DataError(source, row, "scores", f"must be a list of {len(resp)} numbers, one per response")
            idx, t = expand_ranking(resp, scores)
            ties += t
            pairs = [PreferencePair(prompt, resp[i], resp[j], group=g, rank_distance=d) for i, j, d in idx]
        elif "chosen" in rec or "rejected" in rec:
            chosen = _text(source, row, rec, "chosen")
            rejected = _text(source, row, rec, "rejected")
            margin = rec.get("margin", 0.0)
            if margin is None:
                margin = 0.0
            if not isinstance(margin, (int, float)) or isinstance(margin, bool):
                raise DataError(source, row, "margin", "must be a number")
            if "prompt" in rec:
                prompt = _prompt_field(source, row, rec)
            elif chosen.startswith("\n\nHuman:"):
                try:
                    prompt, chosen, rejected = split_hh_pair(chosen, rejected)
                except ValueError as e:
                    raise DataError(source, row, "chosen", str(e)) from None
            else:
                prompt, chosen, rejected = _split_shared_prefix(chosen, rejected)
                if not prompt.strip():
                    raise DataError(source, row, "chosen", "no 'prompt' field and chosen/rejected share no prefix to use as one")
            for name, text in (("chosen", chosen), ("rejected", rejected)):
                if not text.strip():
                    raise DataError(source, row, name, "the response (after removing the prompt) is empty")
            if chosen == rejected:
                ties += 1
            else:
                pairs = [PreferencePair(prompt, chosen, rejected, margin=float(margin), group=g)]
        else:
            raise DataError(source, row, None,
                            "expected {'prompt','chosen','rejected'}, {'chosen','rejected'} or {'prompt','responses'} (see reward_data/README.md)")
        groups.append(pairs)
    n_pairs = sum(len(p) for p in groups)
    if n_pairs == 0:
        raise DataError(source, None, None, "no usable preference pairs (all rows empty or tied)")
    if weighting == "per_prompt":
        nonempty = sum(1 for p in groups if p)
        mean_pairs = n_pairs / nonempty
        groups = [[_replace_weight(x, mean_pairs / len(p)) for x in p] for p in groups]
    return PreferenceData(pairs=[x for p in groups for x in p], ties_dropped=ties, rows=rows)


def _replace_weight(p: PreferencePair, w: float) -> PreferencePair:
    from dataclasses import replace

    return replace(p, weight=w)


def _prompt_field(source: str, row: int, rec: dict) -> Prompt:
    if isinstance(rec.get("prompt"), list):
        return _messages(source, row, rec["prompt"], "prompt")
    return _text(source, row, rec, "prompt")


def _split_shared_prefix(a: str, b: str) -> tuple[str, str, str]:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    # do not cut inside a word: back off to the last whitespace of the shared prefix
    cut = n if n == len(a) or n == len(b) or a[n - 1:n].isspace() else max(a.rfind(" ", 0, n), 0)
    return a[:cut], a[cut:], b[cut:]


# ---------------------------------------------------------------- prompts

def load_prompts(source: str) -> list[Prompt]:
    """{"prompt": str or messages} per row (SFT rows are accepted: their completion is ignored)."""
    out = []
    for row, rec in iter_rows(source):
        rec = _object(source, row, rec)
        if "prompt" not in rec and "messages" in rec:
            msgs = _messages(source, row, rec["messages"], "messages")
            out.append(msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs)
            continue
        out.append(_prompt_field(source, row, rec))
    if not out:
        raise DataError(source, None, None, "no prompts")
    return out


# ---------------------------------------------------------------- rendering

def render_prompt(tokenizer: Any, prompt: Prompt, use_chat_template: bool) -> str:
    """The text a model sees before its response; identical in every stage."""
    templated = use_chat_template and getattr(tokenizer, "chat_template", None)
    if isinstance(prompt, str):
        if not templated:
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    if templated:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    # no chat template: a plain Human/Assistant transcript (the HH-RLHF convention)
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in prompt) + "\n\nAssistant:"


def prompt_text(prompt: Prompt) -> str:
    """A readable one-string form of a prompt (for samples, reports and the gold scorer)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)

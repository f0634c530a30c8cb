"""Packed forward passes over PPO's [left-padded query | right-padded response] rows.

A rollout's responses end at very different lengths (EOS at token 3, or none by
max_new_tokens), so a dense (B, Q+R) batch is mostly padding. Here the real tokens of each row
are laid back to back in rows of at most Q+R tokens (first-fit decreasing), positions restart at
0 for every sequence, and the attention mask is left out: transformers then derives a
block-diagonal causal mask from the position ids (flash-attention runs them as variable-length
sequences), so no token sees another sequence. The language-model (or value) head then runs
only on the positions that predict a response token.

The result equals the dense forward up to float rounding. Whether a model honours packed
position ids is checked once per model on its first batch (both ways, compared); a model that
does not (custom code, a head with extra scaling) keeps the dense path, with a warning.
"""
from __future__ import annotations

import inspect
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.distributed import all_agree
from rlhf.models import body_and_head, unwrap
from rlhf.scoring import position_ids_from_mask

MIN_SAVING = 0.1  # pack only when it removes at least this fraction of the dense batch's tokens
# packed rows hold up to this many padded rows' worth of tokens: longer rows pack tighter, but
# (without flash-attention) attention cost grows with row length; 2 was fastest on the CPU bench
ROW_FACTOR = 2
_VERIFIED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()  # model body -> packing verified


@dataclass
class Packing:
    ids: torch.Tensor           # (P, L) sequences back to back; the tail of a row is filler
    position_ids: torch.Tensor  # (P, L) 0, 1, ... restarting at each sequence
    row: torch.Tensor           # (B,) packed row of each sequence
    shift: torch.Tensor         # (B,) packed column = dense column + shift

    def locate(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed (row, column) of dense positions (rows, cols), both (K,)."""
        return self.row[rows], cols + self.shift[rows]


def pack(ids: torch.Tensor, mask: torch.Tensor, force: bool = False) -> Packing | None:
    """The real tokens of (B, T) rows whose kept tokens are contiguous, packed into rows of at most
    ROW_FACTOR * T tokens; None when that saves less than MIN_SAVING of the tokens (unless `force`)
    or a row is empty."""
    b = ids.shape[0]
    t = ids.shape[1] * ROW_FACTOR
    lengths = mask.sum(1)
    lens = lengths.tolist()
    if min(lens) == 0:
        return None
    free: list[int] = []
    row, start = [0] * b, [0] * b
    for i in sorted(range(b), key=lambda i: -lens[i]):
        p = next((j for j, f in enumerate(free) if f >= lens[i]), None)
        if p is None:
            free.append(t)
            p = len(free) - 1
        start[i], row[i] = t - free[p], p
        free[p] -= lens[i]
    width = t - min(free)
    if not force and len(free) * width > (1 - MIN_SAVING) * ids.numel():
        return None
    dev = ids.device
    first = mask.long().argmax(1)                                   # (B,) first real column
    row_t, start_t = torch.tensor(row, device=dev), torch.tensor(start, device=dev)
    seq_start = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    within = torch.arange(int(lengths.sum()), device=dev) - seq_start  # offset of each real token in its sequence
    dest = torch.repeat_interleave(row_t * width + start_t, lengths) + within
    src = torch.repeat_interleave(torch.arange(b, device=dev) * ids.shape[1] + first, lengths) + within
    packed = torch.zeros(len(free) * width, dtype=ids.dtype, device=dev)
    packed[dest] = ids.reshape(-1)[src]
    # filler at position 0: a packed row may be longer than the model's maximum positions (a learned
    # position table, GPT-2/OPT, would be indexed past its end), and each filler token is a sequence of its own
    pos = torch.zeros(len(free) * width, dtype=torch.long, device=dev)
    pos[dest] = within
    return Packing(packed.view(len(free), width), pos.view(len(free), width), row_t, start_t - first)


def _packed_head(body: Any, head: Any, pk: Packing, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    hidden = body(input_ids=pk.ids, position_ids=pk.position_ids, use_cache=False).last_hidden_state  # (P, L, H)
    pr, pc = pk.locate(rows, cols)
    return head(hidden[pr, pc])                                                                      # (K, V or 1)


def _dense_head(model: Any, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                body_head: tuple[Any, Any] | None) -> torch.Tensor:
    pos = position_ids_from_mask(mask)
    if body_head is not None and getattr(unwrap(model), "score", None) is body_head[1]:  # a value / reward head
        hidden = body_head[0](input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        return body_head[1](hidden[rows, cols])
    # the LM head only on the last positions, from the first that predicts a response token
    kw = {"logits_to_keep": ids.shape[1] - int(cols.min())} if len(cols) and _takes_logits_to_keep(model) else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kw).logits
    return logits[rows, cols - (ids.shape[1] - logits.shape[1])]


def _takes_logits_to_keep(model: Any) -> bool:
    return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters


def response_positions(mask: torch.Tensor, q_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sel (B, R) bool, rows (K,), cols (K,)): the real response tokens of [query | response] rows
    and, for each, the position that predicts it (q_len - 1 + j), in sel's row-major order."""
    sel = mask[:, q_len:].bool()
    rows, j = sel.nonzero(as_tuple=True)
    return sel, rows, q_len - 1 + j


def head_at(model: Any, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The model's head output at dense positions (rows, cols) of a batch whose rows hold one
    contiguous run of real tokens each: (K, V) logits of a causal LM or (K, 1) values of a
    sequence-classification model ((K, M) for a reward ensemble's M heads). Runs packed when the model is verified to allow it."""
    parts = body_and_head(model)
    if parts is None:
        return _dense_head(model, ids, mask, rows, cols, parts)
    key = parts[0]
    # every decision below is taken by all ranks together: under ZeRO-3 the forwards are collective
    usable = all_agree(bool(mask[rows, cols].all()))
    if usable and key not in _VERIFIED:
        _VERIFIED[key] = all_agree(_verify(model, parts, ids, mask, rows, cols))
        if not _VERIFIED[key]:
            warnings.warn(f"{type(parts[0]).__name__}: packed sequences did not reproduce the padded forward; "
                          "PPO uses padded batches for this model (slower, same results)")
    if usable and _VERIFIED[key]:
        pk = pack(ids, mask)
        if all_agree(pk is not None):
            return _packed_head(*parts, pk, rows, cols)
    return _dense_head(model, ids, mask, rows, cols, parts)


@torch.no_grad()
def _verify(model: Any, parts: tuple[Any, Any], ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
            cols: torch.Tensor) -> bool:
    """Packed and dense forwards agree at the positions of this batch's first rows."""
    n = min(4, ids.shape[0])
    keep = rows < n
    ids, mask, rows, cols = ids[:n], mask[:n], rows[keep], cols[keep]
    pk = pack(ids, mask, force=True)
    try:
        packed = _packed_head(*parts, pk, rows, cols).float()
    except (TypeError, ValueError, RuntimeError):
        return False
    dense = _dense_head(model, ids, mask, rows, cols, parts).float()
    if packed.shape != dense.shape:
        return False
    if packed.shape[-1] > 1:  # compare as log-probabilities: heads may differ by a constant per row
        packed, dense = packed.log_softmax(-1), dense.log_softmax(-1)
    tol = 1e-3 if next(iter(parts[1].parameters())).dtype == torch.float32 else 5e-2
    return bool(torch.allclose(packed, dense, atol=tol, rtol=tol))

"""Rollouts: sample responses, then score them with one chunked forward pass per model.

The actor, reference, critic and reward model each see the whole rollout once (in chunks
of `forward_batch_size` rows); nothing is computed twice. Sequences are
[left-padded query | right-padded response]; positions count from each row's first token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from rlhf.generation import Sampling
from rlhf.ppo.core import entropy_from_logits, logprobs_from_logits
from rlhf.ppo.packing import head_at, response_positions
from rlhf.tokenization import last_index


@dataclass
class Rollout:
    query_ids: torch.Tensor      # (B, Q) left-padded prompt ids
    query_mask: torch.Tensor     # (B, Q)
    response_ids: torch.Tensor   # (B, R) right-padded, nothing after the first EOS
    response_mask: torch.Tensor  # (B, R) 1 on response tokens incl. EOS
    ended: torch.Tensor          # (B,) bool: response ends with EOS
    logprobs: torch.Tensor       # (B, R) log pi_old(a_t | s_t) under the sampling distribution (temperature, top-k/p)
    ref_logprobs: torch.Tensor   # (B, R) log pi_ref(a_t | s_t): the SFT policy at the same temperature, untruncated
    raw_scores: torch.Tensor     # (B,) reward model output; (B, K) for an ensemble's K members
    values: torch.Tensor | None = None  # (B, R) V_old(s_t), the critic's value before emitting a_t; None without a critic
    engine_logprobs: torch.Tensor | None = None  # (B, R) the rollout engine's own log-probs (vllm), compared with logprobs

    @property
    def full_ids(self) -> torch.Tensor:  # (B, Q+R)
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def full_mask(self) -> torch.Tensor:  # (B, Q+R)
        return torch.cat([self.query_mask, self.response_mask], dim=1)


def _scatter(sel: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B, R) tensor with `values` (K,) at the True positions of `sel` (B, R), 0 elsewhere (differentiable)."""
    return torch.zeros(sel.shape, dtype=values.dtype, device=values.device).masked_scatter(sel, values)


def policy_forward(model: Any, full_ids: torch.Tensor, full_mask: torch.Tensor, q_len: int,
                   sampling: Sampling, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, R) log-probs of the response tokens (and entropies, without autograd) from one forward
    pass, under the distribution `sampling` describes (the one generate() drew them from); 0 on
    padding. The sequences run packed and the LM head only where a response token is predicted
    (rlhf.ppo.packing): (K, V) logits for the K real response tokens, never (B, Q+R, V)."""
    sel, rows, cols = response_positions(full_mask, q_len)   # (B, R), (K,), (K,)
    logits = head_at(model, full_ids, full_mask, rows, cols)  # (K, V)
    tokens = full_ids[:, q_len:][sel]                         # (K,)
    t, k, p = sampling.temperature, sampling.top_k, sampling.top_p
    logp = _scatter(sel, logprobs_from_logits(logits, tokens, t, k, p))
    ent = None
    if with_entropy:
        ent = _scatter(sel, entropy_from_logits(logits, t, k, p, chunk=max(1, (1 << 22) // logits.shape[-1])))
    return logp, ent


def value_forward(critic: Any, full_ids: torch.Tensor, full_mask: torch.Tensor, q_len: int,
                  scale: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """(B, R) V(s_t): the value head at the position that precedes each response token (0 on padding).

    `scale` = (mean, std) of reward_stats: the head's output is read as (v - mean) / std, the
    units of the normalised score PPO rewards with. A critic copied from the reward model thus
    starts predicting the normalised score rather than raw reward-model units (as the N+
    implementation subtracts the reward bias); value clipping would otherwise let the offset
    shrink only by cliprange_value per rollout."""
    sel, rows, cols = response_positions(full_mask, q_len)
    out = head_at(critic, full_ids, full_mask, rows, cols)  # (K, 1)
    return _scatter(sel, (out.squeeze(-1).float() - scale[0]) / scale[1])


def packed_scores(model: Any, full_ids: torch.Tensor, full_mask: torch.Tensor) -> torch.Tensor:
    """(B,) reward-model scores ((B, K) for an ensemble's K heads) at each row's last real token (rlhf.scoring.reward_scores), with the
    rows packed and the head applied to those B positions only."""
    rows = torch.arange(full_ids.shape[0], device=full_ids.device)
    return head_at(model, full_ids, full_mask, rows, last_index(full_mask)).squeeze(-1).float()


def in_chunks(fn: Callable[[slice], Any], n: int, chunk: int) -> list:
    return [fn(slice(s, s + chunk)) for s in range(0, n, chunk)]


@torch.no_grad()
def score_rollout(*, actor: Any, reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], critic: Any | None,
                  reward: Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor], query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                  response_mask: torch.Tensor, ended: torch.Tensor, sampling: Sampling, chunk: int,
                  value_scale: tuple[float, float] = (0.0, 1.0), logprobs: torch.Tensor | None = None) -> Rollout:
    """Run each model once over the rollout. `reference(full_ids, full_mask)` returns the
    reference log-probs (a frozen copy, or the actor with its LoRA adapter disabled) and
    `reward(full_ids, full_mask, rows)` the reward model's scores of the rows `rows` (a frozen copy,
    or the LoRA critic with its adapter disabled). `critic=None`: no values (an estimator without a critic).
    `logprobs` (B, R): the policy's log-probs already taken from the generation pass; without them
    the actor runs once more to compute them."""
    q = query_ids.shape[1]
    full_ids = torch.cat([query_ids, response_ids], dim=1)
    full_mask = torch.cat([query_mask, response_mask], dim=1)
    n = full_ids.shape[0]
    if logprobs is None:
        logprobs = torch.cat(in_chunks(lambda s: policy_forward(actor, full_ids[s], full_mask[s], q, sampling)[0], n, chunk))
    ref = in_chunks(lambda s: reference(full_ids[s], full_mask[s]), n, chunk)
    values = None
    if critic is not None:
        values = torch.cat(in_chunks(lambda s: value_forward(critic, full_ids[s], full_mask[s], q, value_scale), n, chunk))
    rm = in_chunks(lambda s: reward(full_ids[s], full_mask[s], s), n, chunk)
    return Rollout(query_ids, query_mask, response_ids, response_mask, ended, logprobs=logprobs,
                   ref_logprobs=torch.cat(ref), raw_scores=torch.cat(rm), values=values)

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
from rlhf.models import token_values
from rlhf.ppo.core import entropy_from_logits, logprobs_from_logits
from rlhf.scoring import position_ids_from_mask


@dataclass
class Rollout:
    query_ids: torch.Tensor      # (B, Q) left-padded prompt ids
    query_mask: torch.Tensor     # (B, Q)
    response_ids: torch.Tensor   # (B, R) right-padded, nothing after the first EOS
    response_mask: torch.Tensor  # (B, R) 1 on response tokens incl. EOS
    ended: torch.Tensor          # (B,) bool: response ends with EOS
    logprobs: torch.Tensor       # (B, R) log pi_old(a_t | s_t) under the sampling distribution (temperature, top-k/p)
    ref_logprobs: torch.Tensor   # (B, R) log pi_ref(a_t | s_t): the SFT policy at the same temperature, untruncated
    values: torch.Tensor         # (B, R) V_old(s_t), the critic's value before emitting a_t
    raw_scores: torch.Tensor     # (B,) reward model output
    entropy: torch.Tensor        # (B, R) policy entropy at each position

    @property
    def full_ids(self) -> torch.Tensor:  # (B, Q+R)
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def full_mask(self) -> torch.Tensor:  # (B, Q+R)
        return torch.cat([self.query_mask, self.response_mask], dim=1)


def policy_forward(model: Any, full_ids: torch.Tensor, full_mask: torch.Tensor, q_len: int,
                   sampling: Sampling, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, R) log-probs of the response tokens (and entropies) from one forward pass, under the
    distribution `sampling` describes (the one generate() drew them from)."""
    out = model(input_ids=full_ids, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask),
                use_cache=False)
    logits = out.logits[:, q_len - 1:-1]  # (B, R, V): the logits that predicted each response token
    response = full_ids[:, q_len:]
    t, k, p = sampling.temperature, sampling.top_k, sampling.top_p
    logp = logprobs_from_logits(logits, response, t, k, p)
    ent = entropy_from_logits(logits, t, k, p) if with_entropy else None
    return logp, ent


def value_forward(critic: Any, full_ids: torch.Tensor, full_mask: torch.Tensor, q_len: int,
                  scale: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """(B, R) V(s_t): the value head at the position that precedes each response token.

    `scale` = (mean, std) of reward_stats: the head's output is read as (v - mean) / std, the
    units of the normalised score PPO rewards with. A critic copied from the reward model thus
    starts predicting the normalised score rather than raw reward-model units (as the N+
    implementation subtracts the reward bias); value clipping would otherwise let the offset
    shrink only by cliprange_value per rollout."""
    v = token_values(critic, full_ids, full_mask, position_ids_from_mask(full_mask))
    return (v[:, q_len - 1:-1] - scale[0]) / scale[1]


def in_chunks(fn: Callable[[slice], Any], n: int, chunk: int) -> list:
    return [fn(slice(s, s + chunk)) for s in range(0, n, chunk)]


@torch.no_grad()
def score_rollout(*, actor: Any, reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], critic: Any,
                  reward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                  response_mask: torch.Tensor, ended: torch.Tensor, sampling: Sampling, chunk: int,
                  value_scale: tuple[float, float] = (0.0, 1.0)) -> Rollout:
    """Run each model once over the rollout. `reference(full_ids, full_mask)` returns the
    reference log-probs (a frozen copy, or the actor with its LoRA adapter disabled) and
    `reward(full_ids, full_mask)` the reward model's scores (a frozen copy, or the LoRA critic
    with its adapter disabled)."""
    q = query_ids.shape[1]
    full_ids = torch.cat([query_ids, response_ids], dim=1)
    full_mask = torch.cat([query_mask, response_mask], dim=1)
    n = full_ids.shape[0]
    pol = in_chunks(lambda s: policy_forward(actor, full_ids[s], full_mask[s], q, sampling, with_entropy=True), n, chunk)
    ref = in_chunks(lambda s: reference(full_ids[s], full_mask[s]), n, chunk)
    val = in_chunks(lambda s: value_forward(critic, full_ids[s], full_mask[s], q, value_scale), n, chunk)
    rm = in_chunks(lambda s: reward(full_ids[s], full_mask[s]), n, chunk)
    return Rollout(query_ids, query_mask, response_ids, response_mask, ended,
                   logprobs=torch.cat([p[0] for p in pol]), ref_logprobs=torch.cat(ref), values=torch.cat(val),
                   raw_scores=torch.cat(rm), entropy=torch.cat([p[1] for p in pol]))

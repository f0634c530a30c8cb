"""The maths of PPO for language models, as pure functions of tensors.

Shapes: B rollouts, R response positions (right-padded), V vocabulary. `mask` (B, R) is 1
on real response tokens (up to and including EOS) and 0 on padding. Every function here
is tested against hand-computed values in tests/unit/test_ppo_core.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from rlhf.tokenization import last_index


def sampling_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
    """(..., V) float32 logits of the distribution generate() samples from: temperature, then
    top-k, then top-p (transformers' own warpers, in generate()'s order); filtered tokens get -inf.

    `keep` (...,) token ids that are never filtered: the sampled tokens. A recomputed forward can
    differ from the generation pass in the last bits and move a sampled token just past a top-k/
    top-p boundary; its log-prob must stay finite.
    """
    x = logits.float() if temperature == 1.0 else logits.float() / temperature
    if top_k <= 0 and top_p >= 1.0:
        return x
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    flat = x.reshape(-1, x.shape[-1])
    warped = flat
    if top_k > 0:
        warped = TopKLogitsWarper(top_k=top_k)(None, warped)
    if top_p < 1.0:
        warped = TopPLogitsWarper(top_p=top_p)(None, warped)
    if keep is not None:
        rows = torch.arange(flat.shape[0], device=flat.device)
        idx = keep.reshape(-1)
        warped = warped.clone()
        warped[rows, idx] = flat[rows, idx]
    return warped.reshape(x.shape)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0) -> torch.Tensor:
    """(B, R) log pi(token_t | s_t) under the sampling distribution.  logits (B, R, V), tokens (B, R).

    Computed as x[token] - logsumexp(x): no (B, R, V) log-softmax is materialised, and backward
    keeps one float32 copy of the logits instead of two."""
    x = sampling_logits(logits, temperature, top_k, top_p, keep=tokens)
    return x.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        chunk: int = 8) -> torch.Tensor:
    """(...) entropy of the sampling distribution at each position of logits (..., V) (filtered
    tokens count 0). A statistic only (PPO here has no entropy bonus): computed without autograd,
    `chunk` entries of the first dimension at a time, so the float32 temporaries stay small."""
    out = []
    with torch.no_grad():
        for s in range(0, logits.shape[0], chunk):
            logp = F.log_softmax(sampling_logits(logits[s:s + chunk].detach(), temperature, top_k, top_p), dim=-1)
            p = logp.exp()
            out.append(-torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1))
    return torch.cat(out)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """(B, R) per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating KL").

    k1 = log r,  k2 = (log r)^2 / 2,  k3 = (1/r - 1) + log r,   with log r = log pi - log pi_ref.
    k1 is unbiased but can be negative; k3 is unbiased and never negative; k2 is biased, low variance.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


def kl_penalty_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * KL_t everywhere, plus the sequence score on the last real token.

    scores (B,), kl (B, R) -> rewards (B, R), non_score_rewards (B, R); both 0 on padding.
    """
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_index(mask)] += scores
    return rewards, non_score


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (mean kept when shift_mean=False); 0 on padding."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016).

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},
    with V and A zero after the last real token. Returns advantages and returns = A + V, (B, R).
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        next_adv = adv * m
        next_value = values[:, t] * m
    return advantages, (advantages + values) * mask



# ----------------------------------------------------------------- advantage estimators
# One pure function per estimator, chosen by ppo.advantage_estimator. Each maps the rollout's
# per-token rewards (and the critic's values, when it needs a critic) to the advantages the
# policy loss weights tokens by, and to the returns the critic regresses on (None without one).

@dataclass(frozen=True)
class AdvantageInputs:
    rewards: torch.Tensor          # (B, R) per-token rewards: -beta * KL_t, plus the score at the last token
    mask: torch.Tensor             # (B, R) 1 on response tokens
    values: torch.Tensor | None    # (B, R) V_old(s_t) of the critic; None when the estimator needs none
    gamma: float                   # discount
    lam: float                     # GAE lambda


@dataclass(frozen=True)
class AdvantageEstimator:
    compute: Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor | None]]  # -> advantages, returns
    needs_critic: bool  # False: no critic is built, stepped, checkpointed or published


def gae_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the critic's values, the advantages whitened over the batch's response tokens
    (returns = A + V, not whitened: the critic's target)."""
    if x.values is None:
        raise ValueError("the gae estimator needs the critic's values")
    advantages, returns = gae(x.rewards, x.values, x.mask, x.gamma, x.lam)
    return masked_whiten(advantages, x.mask), returns


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": AdvantageEstimator(gae_advantages, needs_critic=True),
}


def advantage_estimator(name: str) -> AdvantageEstimator:
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"ppo.advantage_estimator={name!r} is not one of {sorted(ADVANTAGE_ESTIMATORS)}") from None

def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective (as a loss) and its diagnostics: clipfrac, approxkl, ratio.
    `weights` (B, R), constants: each token's loss scaled (truncated importance sampling)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approxkl": 0.5 * masked_mean(log_ratio ** 2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def truncated_importance_weights(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """(B, R) min(pi_old / pi_engine, cap) per sampled token, 0 on padding: the responses were drawn by
    an inference engine whose distribution differs slightly from the actor's (pi_old), so the
    policy-gradient term of each token is reweighted towards pi_old, truncated at `cap` to bound
    the variance (truncated importance sampling; Yao et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training", as in veRL and TRL)."""
    return torch.exp(old_logprobs - engine_logprobs).clamp(max=cap) * mask


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict]:
    """Clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2) and its clip fraction."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_err > unclipped_err).float(), mask)}
    return loss, stats


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: beta <- beta * (1 + K_beta * e * n / horizon), e = clip(KL/target - 1, -0.2, 0.2),
    with K_beta = 1 and n the episodes since the last update."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

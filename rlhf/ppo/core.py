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
    rewards: torch.Tensor          # (B, R) per-token rewards: the penalties, plus the score at the last token
    mask: torch.Tensor             # (B, R) 1 on response tokens
    values: torch.Tensor | None    # (B, R) V_old(s_t) of the critic; None when the estimator needs none
    gamma: float                   # discount
    lam: float                     # GAE lambda
    scores: torch.Tensor | None = None     # (B,) the sequence scores alone (normalised, EOS penalty, clip)
    penalties: torch.Tensor | None = None  # (B, R) the per-token part of the rewards: -beta * KL_t (0 with the KL in the loss)
    group: torch.Tensor | None = None      # (B,) which prompt each response answers: the k samples of a prompt share it


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


def group_stats(scores: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each response (B,): the size n, the sum and the unbiased variance of the scores of its
    group (the responses to the same prompt, itself included). A group of one has variance 0."""
    _, idx = torch.unique(group, return_inverse=True)
    scores = scores.float()
    zeros = torch.zeros(int(idx.max()) + 1, dtype=scores.dtype, device=scores.device)
    n = zeros.index_add(0, idx, torch.ones_like(scores))
    total = zeros.index_add(0, idx, scores)
    dev2 = zeros.index_add(0, idx, (scores - (total / n)[idx]) ** 2)
    var = torch.where(n > 1, dev2 / (n - 1).clamp_min(1), torch.zeros_like(dev2))
    return n[idx], total[idx], var[idx]


def leave_one_out_baseline(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """(B,) the mean score of the *other* responses to the same prompt (Ahmadian et al. 2024);
    a response alone in its group is its own baseline (advantage 0: nothing to compare it with)."""
    n, total, _ = group_stats(scores, group)
    return torch.where(n > 1, (total - scores.float()) / (n - 1).clamp_min(1), scores.float())


def _sequence_advantages(x: AdvantageInputs, score_advantage: torch.Tensor) -> torch.Tensor:
    """(B, R): each token's advantage = its response's score advantage (B,) plus the per-token
    penalties from that token to the end (the KL part of the return, undiscounted); 0 on padding."""
    penalties = torch.zeros_like(x.mask) if x.penalties is None else x.penalties * x.mask
    to_go = penalties.flip(1).cumsum(1).flip(1)
    return (score_advantage[:, None].to(to_go.dtype) + to_go) * x.mask


def _scores_and_group(x: AdvantageInputs, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.scores is None:
        raise ValueError(f"the {name} estimator needs the sequence scores")
    group = x.group if x.group is not None else torch.arange(x.scores.shape[0], device=x.scores.device)
    return x.scores.float(), group


GRPO_EPS = 1e-4  # added to the group's std (as TRL's GRPO trainer): an all-equal group gets advantage 0


def rloo_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """RLOO (Ahmadian et al. 2024, "Back to Basics"): score minus the leave-one-out mean of the
    other k-1 samples of the same prompt; not normalised."""
    s, g = _scores_and_group(x, "rloo")
    return _sequence_advantages(x, s - leave_one_out_baseline(s, g)), None


def grpo_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """GRPO's outcome supervision (Shao et al. 2024, DeepSeekMath): (score - group mean) / (group std + eps),
    the std unbiased and over the prompt's own k samples."""
    s, g = _scores_and_group(x, "grpo")
    n, total, var = group_stats(s, g)
    return _sequence_advantages(x, (s - total / n) / (var.sqrt() + GRPO_EPS)), None


def dr_grpo_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): score - group mean, with no
    division by the std (which up-weights prompts that are too easy or too hard)."""
    s, g = _scores_and_group(x, "dr_grpo")
    n, total, _ = group_stats(s, g)
    return _sequence_advantages(x, s - total / n), None


def reinforce_pp_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """REINFORCE++ (Hu 2025): each token's return (score plus the KL penalties to go), whitened over
    the batch's response tokens. With several samples per prompt the group mean is subtracted first
    (the paper's REINFORCE++-baseline); a prompt sampled once keeps its score."""
    s, g = _scores_and_group(x, "reinforce_pp")
    n, total, _ = group_stats(s, g)
    return masked_whiten(_sequence_advantages(x, s - total / n * (n > 1)), x.mask), None


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": AdvantageEstimator(gae_advantages, needs_critic=True),
    "rloo": AdvantageEstimator(rloo_advantages, needs_critic=False),
    "grpo": AdvantageEstimator(grpo_advantages, needs_critic=False),
    "dr_grpo": AdvantageEstimator(dr_grpo_advantages, needs_critic=False),
    "reinforce_pp": AdvantageEstimator(reinforce_pp_advantages, needs_critic=False),
}


def advantage_estimator(name: str) -> AdvantageEstimator:
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"ppo.advantage_estimator={name!r} is not one of {sorted(ADVANTAGE_ESTIMATORS)}") from None


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, max_len: int | None = None) -> torch.Tensor:
    """A scalar from per-token losses (b, R) (ppo.loss_aggregation):
    token_mean  sum over all real tokens / their number (long responses weigh more);
    seq_mean    each response's token mean, then the mean over responses (GRPO);
    seq_sum     each response's token sum / max_len, then the mean over responses: Dr. GRPO's constant
                normaliser (no length bias); max_len is the *configured* longest response, never the
                batch's padded width, which changes from batch to batch."""
    if how == "token_mean":
        return masked_mean(per_token, mask)
    if how == "seq_mean":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()
    if how == "seq_sum":
        if not max_len:
            raise ValueError("seq_sum aggregation needs max_len (ppo.max_new_tokens)")
        return (per_token * mask).sum(1).mean() / max_len
    raise ValueError(f"unknown loss aggregation {how!r}; use token_mean, seq_mean or seq_sum")


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float, weights: torch.Tensor | None = None, aggregation: str = "token_mean",
                max_len: int | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective (as a loss, aggregated as `aggregate` says) and its diagnostics
    (token means): clipfrac, approxkl, ratio.
    `weights` (B, R), constants: each token's loss scaled (truncated importance sampling)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights
    loss = aggregate(per_token, mask, aggregation, max_len)
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

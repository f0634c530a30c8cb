"""What PPO's result is judged by: the policy against the frozen SFT reference on held-out
prompts (reward-model score, gold score, KL, win rates, length, EOS rate), and the sample
rows logged while training. Built on the `Policies` surface below, which PPOTrainer provides."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rlhf.data import prompt_text
from rlhf.generation import Generated, Sampling, decode_responses
from rlhf.metric_names import Eval
from rlhf.metric_names import Summary as S
from rlhf.ppo import drift

EVAL_SEED = 12345  # both policies sample with the same seed: differences come from the policies


class Policies(Protocol):
    """What evaluation needs of the trained policy and its frozen SFT reference
    (rlhf.ppo.trainer.PPOTrainer is one; the tests use small fakes)."""

    tokenizer: Any
    update: int                   # the update whose weights the policy has
    sampling: Sampling            # the policy's sampling distribution
    reference_sampling: Sampling  # the reference's (same temperature, untruncated)

    def sample(self, prompt_texts: list[str], *, reference: bool = False, max_new_tokens: int,
               sampling: Sampling | None = None) -> tuple[list[Generated], torch.Tensor]:
        """Responses (one Generated per chunk) and their raw reward-model scores (B,)."""
        ...

    def kl_to_reference(self, g: Generated) -> torch.Tensor:
        """(B,) summed log pi - log pi_ref over each response of `g`."""
        ...


@dataclass
class Drawn:
    """Responses sampled on the held-out prompts with the evaluation seed (held_out_point), and their
    raw reward-model scores: what the final evaluation would draw again for the same policy."""

    update: int
    gens: list
    rm: torch.Tensor
    tokens: list | None = None  # each response's token ids (response_tokens), for the drift signals


@torch.no_grad()
def evaluate(trainer: Policies, prompts: list, texts: list[str], gold: Any, max_new_tokens: int,
             policy: Drawn | None = None, sft: Drawn | None = None) -> tuple[dict, list[dict]]:
    """SFT vs PPO on held-out prompts: RM score, gold score, KL(PPO||SFT), win rates, length, EOS rate.
    `policy` / `sft`: the same prompts already sampled, with the same seed, from the policy being
    published / from the SFT policy under the reference's sampling (held_out_point at that update,
    and at update 0): used as they are instead of sampling and scoring them again. `texts`: the
    prompts rendered as the policy sees them."""
    tokenizer = trainer.tokenizer
    if policy is None:
        torch.manual_seed(EVAL_SEED)
        policy = Drawn(trainer.update, *trainer.sample(texts, max_new_tokens=max_new_tokens))
    if sft is None:
        torch.manual_seed(EVAL_SEED)
        sft = Drawn(0, *trainer.sample(texts, reference=True, max_new_tokens=max_new_tokens,
                                       sampling=trainer.reference_sampling))
    (ppo_g, ppo_rm), (sft_g, sft_rm) = (policy.gens, policy.rm), (sft.gens, sft.rm)
    kl = torch.cat([trainer.kl_to_reference(g) for g in ppo_g])
    ppo_txt = [t for g in ppo_g for t in decode_responses(tokenizer, g)]
    sft_txt = [t for g in sft_g for t in decode_responses(tokenizer, g)]

    def length(gs):
        return float(torch.cat([g.response_mask.sum(1) for g in gs]).float().mean())

    def eos_rate(gs):
        return float(torch.cat([g.ended for g in gs]).float().mean())

    out = {S.EVAL_PROMPTS: len(prompts), S.RM_SCORE_SFT: float(sft_rm.mean()), S.RM_SCORE_PPO: float(ppo_rm.mean()),
           S.WIN_RATE_RM: float((ppo_rm > sft_rm).float().mean() + 0.5 * (ppo_rm == sft_rm).float().mean()),
           S.KL_PPO_VS_SFT: float(kl.mean()), S.RESPONSE_LENGTH_SFT: length(sft_g), S.RESPONSE_LENGTH_PPO: length(ppo_g),
           S.EOS_RATE_SFT: eos_rate(sft_g), S.EOS_RATE_PPO: eos_rate(ppo_g)}
    samples = [{"prompt": prompt_text(p), "response": r, "sft_response": s, "rm_score": float(a), "rm_score_sft": float(b)}
               for p, r, s, a, b in zip(prompts, ppo_txt, sft_txt, ppo_rm, sft_rm)]
    if gold is not None:
        g_ppo = [gold(prompt_text(p), r) for p, r in zip(prompts, ppo_txt)]
        g_sft = [gold(prompt_text(p), r) for p, r in zip(prompts, sft_txt)]
        sd = statistics.pstdev(g_sft) or 1.0
        out.update({S.GOLD_SCORE_SFT: statistics.fmean(g_sft), S.GOLD_SCORE_PPO: statistics.fmean(g_ppo),
                    S.GOLD_SCORE_SFT_STD: sd, S.GOLD_GAIN_IN_SFT_STD: (statistics.fmean(g_ppo) - statistics.fmean(g_sft)) / sd,
                    S.WIN_RATE_GOLD: sum((a > b) + 0.5 * (a == b) for a, b in zip(g_ppo, g_sft)) / len(g_ppo)})
        for row, a, b in zip(samples, g_ppo, g_sft):
            row.update(gold_score=a, gold_score_sft=b)
    return out, samples


def sample_rows(trainer: Policies, prompts: list, texts: list[str], max_new_tokens: int) -> list[list]:
    """[update, prompt, response, RM score] rows of the current policy on `prompts` (rendered:
    `texts`), for the W&B sample table."""
    gs, scores = trainer.sample(texts, max_new_tokens=max_new_tokens)
    responses = [t for g in gs for t in decode_responses(trainer.tokenizer, g)]
    return [[trainer.update, prompt_text(p), r, float(s)] for p, r, s in zip(prompts, responses, scores)]


# ----------------------------------------------------------------- during training

def _seeded(seed: int):
    """Sampling with a fixed seed that leaves the training's random streams where they were."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    ctx = torch.random.fork_rng(devices=devices)
    ctx.__enter__()
    torch.manual_seed(seed)
    return ctx


@torch.no_grad()
def held_out_point(trainer: Policies, prompts: list, texts: list[str], gold: Any, max_new_tokens: int) -> tuple[dict, Drawn]:
    """The current policy on the fixed held-out prompts with a fixed sampling seed: mean RM score,
    gold score (with a gold scorer), KL(policy || SFT) per response, response length, EOS rate,
    distinct-2 and repetition, and with a reward ensemble its signals (rlhf.ensemble.Ensemble.signals);
    and the samples themselves (evaluate's, should this policy be published).
    Every rank calls it (sampling is collective under ZeRO-3); every rank gets the same figures."""
    ensemble = getattr(trainer, "ensemble", None)
    ctx = _seeded(EVAL_SEED)
    try:
        if ensemble is not None:
            gens, members = trainer.sample(texts, max_new_tokens=max_new_tokens, members=True)
            rm = members.mean(1)
        else:
            gens, rm = trainer.sample(texts, max_new_tokens=max_new_tokens)
    finally:
        ctx.__exit__(None, None, None)
    kl = torch.cat([trainer.kl_to_reference(g) for g in gens])
    out = {Eval.RM_SCORE: float(rm.float().mean()), Eval.KL_TO_SFT: float(kl.mean()),
           Eval.RESPONSE_LENGTH: float(torch.cat([g.response_mask.sum(1) for g in gens]).float().mean()),
           Eval.EOS_RATE: float(torch.cat([g.ended for g in gens]).float().mean())}
    seqs = response_tokens(gens, trainer.tokenizer)
    for key, value in ((Eval.DISTINCT_2, drift.distinct_n(seqs, 2)), (Eval.REPETITION, drift.repetition(seqs))):
        if value is not None:
            out[key] = value
    if ensemble is not None:
        sig = ensemble.signals(members)
        out.update({Eval.ENSEMBLE_MEAN: sig["mean"], Eval.ENSEMBLE_SPREAD: sig["spread"],
                    Eval.CONSERVATIVE_SCORE: sig["conservative"]})
        if sig["held_out"] is not None:
            out[Eval.HELD_OUT_MEMBER] = sig["held_out"]
    if gold is not None:
        responses = [t for g in gens for t in decode_responses(trainer.tokenizer, g)]
        out[Eval.GOLD_SCORE] = statistics.fmean(gold(prompt_text(p), r) for p, r in zip(prompts, responses))
    return out, Drawn(trainer.update, gens, rm, seqs)


def response_tokens(gens: list[Generated], tokenizer: Any) -> list[list[int]]:
    """Each response's token ids, without padding and special tokens (EOS)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [[t for t, m in zip(ids, mask) if m and t not in special]
            for g in gens for ids, mask in zip(g.response_ids.tolist(), g.response_mask.tolist())]


@torch.no_grad()
def best_of_n(trainer: Policies, prompts: list, texts: list[str], gold: Any, ns: list[int], max_new_tokens: int) -> list[dict]:
    """The best-of-n baseline: n SFT responses per held-out prompt, the reward model's favourite
    kept. [{n, kl, rm_score, gold_score}], kl the analytic KL of best-of-n sampling to the SFT
    policy, log n - (n-1)/n (Stiennon et al. 2020, appendix G.3; an upper bound, Beirami et al.
    2024). One pass draws max(n) samples; each n uses the first n of them."""
    if not ns:
        return []
    top = max(ns)
    ctx = _seeded(EVAL_SEED + 1)
    rm, golds = [], []
    try:
        for _ in range(top):
            gens, scores = trainer.sample(texts, reference=True, max_new_tokens=max_new_tokens,
                                          sampling=trainer.reference_sampling)
            rm.append(scores.float().cpu())
            if gold is not None:
                responses = [t for g in gens for t in decode_responses(trainer.tokenizer, g)]
                golds.append(torch.tensor([gold(prompt_text(p), r) for p, r in zip(prompts, responses)]))
    finally:
        ctx.__exit__(None, None, None)
    rm_t = torch.stack(rm)                                    # (max n, P)
    gold_t = torch.stack(golds).float() if golds else None    # (max n, P)
    out = []
    for n in sorted(set(ns)):
        pick = rm_t[:n].argmax(0, keepdim=True)               # (1, P) the RM's favourite of the first n
        row = {"n": n, "kl": math.log(n) - (n - 1) / n, "rm_score": float(rm_t[:n].gather(0, pick).mean()),
               "gold_score": float(gold_t[:n].gather(0, pick).mean()) if gold_t is not None else None}
        out.append(row)
    return out


class Selector:
    """The over-optimisation guard: which evaluated update to publish, and when to stop.

    `metric` (an eval/* key; None: keep the last update) is maximised over the evaluations whose
    KL to the SFT policy is within `kl_budget`. With `gate` (the guard without a gold scorer), no
    update from the first evaluation whose drift signals flag exploitation on is eligible
    (rlhf.ppo.drift.flags). With `patience`, training stops once the metric has not improved for
    that many evaluations, as soon as an evaluation exceeds the KL budget, or (with `gate`) as
    soon as one is flagged. Its state is plain data, saved with the PPO checkpoint."""

    def __init__(self, metric: str | None, kl_budget: float, patience: int | None, gate: bool = False):
        self.metric, self.kl_budget, self.patience, self.gate = metric, kl_budget, patience, gate
        self.best_update: int | None = None
        self.best_value: float | None = None
        self.since_best = 0
        self.curve: list[dict] = []
        self.flags: list[dict] = []        # [{update, signal, detail, ...}] of every flagged evaluation
        self.flagged_at: int | None = None  # the first flagged evaluation's update
        self.reference: dict | None = None  # update 0's view the drift signals compare against (PPORun)

    def observe(self, update: int, point: dict, flags: list[dict] | tuple = ()) -> tuple[bool, str | None]:
        """Record an evaluation and its exploitation flags; (is it the new best?, stop reason or None)."""
        self.curve.append({"update": update, **point, "flags": [f["signal"] for f in flags]})
        self.flags.extend({"update": update, **f} for f in flags)
        if flags and self.flagged_at is None:
            self.flagged_at = update
        within = point[Eval.KL_TO_SFT] <= self.kl_budget
        eligible = within and not (self.gate and self.flagged_at is not None)
        value = point.get(self.metric) if self.metric else None
        if self.metric is None:
            better = eligible
        else:
            better = eligible and value is not None and (self.best_value is None or value > self.best_value)
        if better:
            self.best_update, self.best_value, self.since_best = update, value, 0
        else:
            self.since_best += 1
        if self.patience:
            if not within:
                return better, "kl_budget"
            if self.gate and self.flagged_at is not None:
                return better, "exploitation"
            if self.metric is not None and self.since_best >= self.patience:
                return better, "no_improvement"
        return better, None

    def reason(self, published: int) -> str:
        """Why `published` is the update published, in words (manifest guard_reason, closing line)."""
        if self.metric is None:
            return f"ppo.keep_best=last: the last update within the KL budget ({self.kl_budget:g})"
        text = (f"the highest {self.metric} ({self.best_value:.4g}) among the held-out evaluations within the KL budget "
                f"({self.kl_budget:g})" if self.best_update == published else f"the last update ({published}): no "
                f"evaluation was eligible")
        if self.gate and self.flagged_at is not None:
            first = [f["signal"] for f in self.flags if f["update"] == self.flagged_at]
            text += (f", before update {self.flagged_at}, the first whose drift signals flagged exploitation "
                     f"({', '.join(first)})")
        return text

    def state_dict(self) -> dict:
        return {"best_update": self.best_update, "best_value": self.best_value, "since_best": self.since_best,
                "curve": self.curve, "flags": self.flags, "flagged_at": self.flagged_at, "reference": self.reference}

    def load_state_dict(self, state: dict) -> None:
        self.best_update, self.best_value = state["best_update"], state["best_value"]
        self.since_best, self.curve = state["since_best"], list(state["curve"])
        self.flags, self.flagged_at = list(state.get("flags", [])), state.get("flagged_at")
        self.reference = state.get("reference")

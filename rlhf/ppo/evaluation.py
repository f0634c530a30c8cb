"""What PPO's result is judged by: the policy against the frozen SFT reference on held-out
prompts (reward-model score, gold score, KL, win rates, length, EOS rate), and the sample
rows logged while training. Built on PPOTrainer's public surface (sample, kl_to_reference)."""
from __future__ import annotations

import statistics
from typing import Any

import torch

from rlhf.data import prompt_text, render_prompt
from rlhf.generation import decode_responses

EVAL_SEED = 12345  # both policies sample with the same seed: differences come from the policies


@torch.no_grad()
def evaluate(trainer: Any, prompts: list, use_template: bool, gold: Any, max_new_tokens: int) -> tuple[dict, list[dict]]:
    """SFT vs PPO on held-out prompts: RM score, gold score, KL(PPO||SFT), win rates, length, EOS rate."""
    tokenizer = trainer.tokenizer
    texts = [render_prompt(tokenizer, p, use_template) for p in prompts]
    torch.manual_seed(EVAL_SEED)
    ppo_g, ppo_rm = trainer.sample(texts, max_new_tokens=max_new_tokens)
    torch.manual_seed(EVAL_SEED)
    sft_g, sft_rm = trainer.sample(texts, reference=True, max_new_tokens=max_new_tokens, sampling=trainer.reference_sampling)
    kl = torch.cat([trainer.kl_to_reference(g) for g in ppo_g])
    ppo_txt = [t for g in ppo_g for t in decode_responses(tokenizer, g)]
    sft_txt = [t for g in sft_g for t in decode_responses(tokenizer, g)]

    def length(gs):
        return float(torch.cat([g.response_mask.sum(1) for g in gs]).float().mean())

    def eos_rate(gs):
        return float(torch.cat([g.ended for g in gs]).float().mean())

    out = {"eval_prompts": len(prompts), "rm_score_sft": float(sft_rm.mean()), "rm_score_ppo": float(ppo_rm.mean()),
           "win_rate_rm": float((ppo_rm > sft_rm).float().mean() + 0.5 * (ppo_rm == sft_rm).float().mean()),
           "kl_ppo_vs_sft": float(kl.mean()), "response_length_sft": length(sft_g), "response_length_ppo": length(ppo_g),
           "eos_rate_sft": eos_rate(sft_g), "eos_rate_ppo": eos_rate(ppo_g)}
    samples = [{"prompt": prompt_text(p), "response": r, "sft_response": s, "rm_score": float(a), "rm_score_sft": float(b)}
               for p, r, s, a, b in zip(prompts, ppo_txt, sft_txt, ppo_rm, sft_rm)]
    if gold is not None:
        g_ppo = [gold(prompt_text(p), r) for p, r in zip(prompts, ppo_txt)]
        g_sft = [gold(prompt_text(p), r) for p, r in zip(prompts, sft_txt)]
        sd = statistics.pstdev(g_sft) or 1.0
        out.update(gold_score_sft=statistics.fmean(g_sft), gold_score_ppo=statistics.fmean(g_ppo), gold_score_sft_std=sd,
                   gold_gain_in_sft_std=(statistics.fmean(g_ppo) - statistics.fmean(g_sft)) / sd,
                   win_rate_gold=sum((a > b) + 0.5 * (a == b) for a, b in zip(g_ppo, g_sft)) / len(g_ppo))
        for row, a, b in zip(samples, g_ppo, g_sft):
            row.update(gold_score=a, gold_score_sft=b)
    return out, samples


def sample_rows(trainer: Any, prompts: list, use_template: bool) -> list[list]:
    """[update, prompt, response, RM score] rows of the current policy, for the W&B sample table."""
    texts = [render_prompt(trainer.tokenizer, p, use_template) for p in prompts]
    gs, scores = trainer.sample(texts)
    responses = [t for g in gs for t in decode_responses(trainer.tokenizer, g)]
    return [[trainer.update, prompt_text(p), r, float(s)] for p, r, s in zip(prompts, responses, scores)]

"""reward_stats (the mean/std PPO normalises scores with) are measured on exactly what PPO scores."""
from __future__ import annotations

import pytest
import torch

from rlhf import engines, models
from rlhf.artifacts import ArtifactError
from rlhf.config import PPOStageConfig
from rlhf.generation import Sampling, generate
from rlhf.scoring import policy_reward_stats, reward_scores, score_texts


def test_stats_score_the_sampled_ids_as_ppo_does(family_checkpoints):
    path = str(family_checkpoints["gpt2"])
    tok = models.load_tokenizer(path)
    models.ensure_pad_token(tok)
    policy = models.load_causal_lm(path, "float32")
    models.resize_for_tokenizer(policy, tok)
    rm = models.load_reward_model(path, "float32", tok.pad_token_id)
    models.resize_for_tokenizer(rm, tok)
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    policy.eval(), rm.eval()
    texts = ["give me birds", "name a few cities", "list some colors", "give me fruits"] * 2
    sampling = Sampling(temperature=0.9, top_k=7)
    torch.manual_seed(0)
    engine = engines.build("hf", policy, tok, max_prompt_length=32)
    stats, responses, scores = policy_reward_stats(engine, rm, tok, texts, sampling=sampling, max_new_tokens=3,
                                                   batch_size=4)
    torch.manual_seed(0)
    ppo = [generate(policy, tok, texts[s:s + 4], max_new_tokens=3, sampling=sampling, max_prompt_length=32)
           for s in range(0, len(texts), 4)]
    with torch.no_grad():
        want = torch.cat([reward_scores(rm, torch.cat([g.query_ids, g.response_ids], 1),
                                        torch.cat([g.query_mask, g.response_mask], 1)) for g in ppo])
    assert torch.allclose(torch.tensor(scores), want, atol=1e-5)
    assert stats["mean"] == pytest.approx(float(want.mean()), abs=1e-5)
    assert stats["sampling"] == {"temperature": 0.9, "top_k": 7, "top_p": 1.0, "max_new_tokens": 3,
                                 "max_prompt_length": 32}
    # re-tokenising the text and appending EOS (what was done before) scores something PPO never sees
    truncated = ~torch.cat([g.ended for g in ppo])
    assert truncated.any()
    retok = torch.tensor(score_texts(rm, tok, texts, responses, max_length=64))
    assert not torch.allclose(retok[truncated], want[truncated], atol=1e-3)


def test_ppo_refuses_reward_stats_sampled_differently(tmp_path):
    from stages.ppo import _check_reward_stats

    c = PPOStageConfig()
    same = {"temperature": c.temperature, "top_k": c.top_k, "top_p": c.top_p, "max_new_tokens": c.max_new_tokens,
            "max_prompt_length": c.max_prompt_length}
    _check_reward_stats({"mean": 0, "std": 1, "sampling": same}, c, tmp_path)
    with pytest.raises(ArtifactError, match=r"ppo.temperature=1.0 \(reward_stats: 0.7\).*re-run the reward stage"):
        _check_reward_stats({"mean": 0, "std": 1, "sampling": {**same, "temperature": 0.7}}, c, tmp_path)

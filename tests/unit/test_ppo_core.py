"""PPO maths against values computed by hand."""
import math

import pytest
import torch

from rlhf.ppo import core


def test_logprobs_use_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])  # (1, 1, 2)
    tok = torch.tensor([[0]])
    # at T=2 the logits are [1, 0]: log(e / (e + 1))
    assert core.logprobs_from_logits(logits, tok, 2.0).item() == pytest.approx(math.log(math.e / (math.e + 1)))
    assert core.logprobs_from_logits(logits, tok, 1.0).item() == pytest.approx(math.log(math.e**2 / (math.e**2 + 1)))


def test_entropy_uniform():
    assert core.entropy_from_logits(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4))


def test_kl_estimators():
    lp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])  # log r = 0.5
    assert core.kl_estimate(lp, ref, "k1").item() == pytest.approx(0.5)
    assert core.kl_estimate(lp, ref, "k2").item() == pytest.approx(0.125)
    assert core.kl_estimate(lp, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    assert core.kl_estimate(ref, lp, "k3").item() >= 0
    with pytest.raises(ValueError):
        core.kl_estimate(lp, ref, "k4")


def test_kl_penalty_rewards_score_on_last_token():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # lengths 2 and 1 (length-1 response)
    rewards, non_score = core.kl_penalty_rewards(scores, kl, 0.5, mask)
    assert torch.allclose(non_score, torch.tensor([[-0.05, -0.1, 0.0], [-0.2, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.9, 0.0], [1.8, 0.0, 0.0]]))


def test_kl_penalty_rewards_full_length_no_eos():
    rewards, _ = core.kl_penalty_rewards(torch.tensor([3.0]), torch.zeros(1, 3), 0.1, torch.ones(1, 3))
    assert rewards.tolist() == [[0.0, 0.0, 3.0]]


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 9.0]])  # the last position is padding: its value is ignored
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = core.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d1 = 1.0 + 0.0 - 0.2           # last real token: no next value
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    a1 = d1
    a0 = d0 + 0.9 * 0.5 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.2, 0.0]]))


def test_masked_whiten_ignores_padding():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w = core.masked_whiten(x, mask)
    # mean 2, unbiased var 2 -> (x - 2) / sqrt(2)
    assert torch.allclose(w, torch.tensor([[-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]]), atol=1e-6)


def test_policy_loss_clipping():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, stats = core.policy_loss(new, old, adv, mask, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert stats["clipfrac"].item() == pytest.approx(1.0)
    assert stats["ratio"].item() == pytest.approx(1.0)


def test_truncated_importance_weights_scale_each_token_of_the_policy_loss():
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))     # pi_old (the actor) of the sampled tokens
    eng = torch.log(torch.tensor([[0.25, 0.4, 0.1]]))    # pi_engine (vLLM) of the same tokens
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w = core.truncated_importance_weights(old, eng, mask, cap=1.5)
    # 0.5 / 0.25 = 2 -> capped at 1.5; 0.2 / 0.4 = 0.5; padding -> 0
    assert torch.allclose(w, torch.tensor([[1.5, 0.5, 0.0]]))
    new = torch.log(torch.tensor([[1.5, 0.5, 1.0]])) + old  # ratios 1.5, 0.5 against pi_old
    adv = torch.tensor([[1.0, -1.0, 3.0]])
    loss, stats = core.policy_loss(new, old, adv, mask, cliprange=0.2, weights=w)
    # per token (clipped as in test_policy_loss_clipping): -1.2 * 1.5, 0.8 * 0.5; mean over the 2 tokens
    assert loss.item() == pytest.approx((-1.2 * 1.5 + 0.8 * 0.5) / 2)
    unweighted, _ = core.policy_loss(new, old, adv, mask, cliprange=0.2)
    assert unweighted.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert stats["ratio"].item() == pytest.approx(1.0)  # diagnostics are of the ratio, not the weights


def test_value_loss_clipping():
    values, old, ret = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]])
    loss, stats = core.value_loss(values, old, ret, torch.ones(1, 1), cliprange_value=0.2)
    # unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 0.5 * 3.24
    assert loss.item() == pytest.approx(1.62)
    assert stats["clipfrac"].item() == 1.0


def test_adaptive_kl_controller():
    ctl = core.AdaptiveKLController(0.1, target=1.0, horizon=100)
    ctl.update(current_kl=2.0, n_steps=10)  # error clipped to 0.2 -> x(1 + 0.02)
    assert ctl.value == pytest.approx(0.102)
    ctl.update(current_kl=0.9, n_steps=10)  # error -0.1 -> x(1 - 0.01)
    assert ctl.value == pytest.approx(0.102 * 0.99)
    fixed = core.FixedKLController(0.3)
    fixed.update(5.0, 100)
    assert fixed.value == 0.3


def test_lora_reference_equals_base_model():
    """With the adapter disabled, the LoRA actor's log-probs are the SFT model's own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.config import LoraConfig
    from rlhf.models import add_lora
    from rlhf.generation import Sampling
    from rlhf.ppo.rollout import policy_forward

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones_like(ids)
    want, _ = policy_forward(base, ids, mask, 3, Sampling())
    actor = add_lora(base, LoraConfig(r=4), "CAUSAL_LM")
    for n, p in actor.named_parameters():  # make the adapter change the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        changed, _ = policy_forward(actor, ids, mask, 3, Sampling())
        with actor.disable_adapter():
            ref, _ = policy_forward(actor, ids, mask, 3, Sampling())
    assert torch.allclose(ref, want, atol=1e-6)
    assert not torch.allclose(changed, want, atol=1e-3)


def test_lora_critic_base_is_the_reward_model():
    """A LoRA critic started from the RM scores like the RM once its adapter (and head copy) is off."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhf.config import LoraConfig
    from rlhf.models import add_lora
    from rlhf.scoring import reward_scores

    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_labels=1,
                                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                                    pad_token_id=0))
    ids = torch.randint(1, 50, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    with torch.no_grad():
        want = reward_scores(rm, ids, mask)
    critic = add_lora(rm, LoraConfig(r=4), "SEQ_CLS")
    trainable = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in critic.named_parameters():  # train the adapter and the critic's own head copy
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
        changed = reward_scores(critic, ids, mask)
        with critic.disable_adapter():
            base = reward_scores(critic, ids, mask)
    assert torch.allclose(base, want, atol=1e-5)
    assert not torch.allclose(changed, want, atol=1e-3)

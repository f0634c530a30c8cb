"""The critic-free advantage estimators and the loss aggregations against hand-computed values.

One batch covers the cases that break them: a group of three, a group of one, a group whose
samples tie (all equal), a group of two; then padding and per-token KL penalties.
"""
from __future__ import annotations

import math

import pytest
import torch

from rlhf.config import ConfigError, load_config, loss_aggregation
from rlhf.ppo import core

# one token per response (R = 1), no penalties: each advantage is the response's score advantage
SCORES = torch.tensor([1.0, 2.0, 3.0, 10.0, 4.0, 4.0, 5.0, 1.0])
GROUP = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3])  # sizes 3, 1 (alone), 2 (a tie), 2


def advantages(name: str, scores=SCORES, group=GROUP, penalties=None, mask=None) -> torch.Tensor:
    mask = torch.ones(scores.shape[0], 1) if mask is None else mask
    rewards = torch.zeros_like(mask)
    adv, returns = core.advantage_estimator(name).compute(core.AdvantageInputs(
        rewards, mask, None, 1.0, 0.95, scores=scores, penalties=penalties, group=group))
    assert returns is None, "a critic-free estimator has no critic target"
    return adv


def test_rloo_leave_one_out_baseline_by_hand():
    # group 0: baselines (2+3)/2, (1+3)/2, (1+2)/2 -> 1 - 2.5, 2 - 2, 3 - 1.5
    # (a mean that includes the sample itself would give -1, 0, 1); alone: 0; tie: 0; pair: +-4
    want = [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0, 4.0, -4.0]
    assert advantages("rloo").squeeze(1).tolist() == pytest.approx(want)


def test_grpo_group_mean_and_unbiased_group_std_by_hand():
    # group 0: mean 2, std sqrt(((-1)^2 + 0 + 1^2) / 2) = 1; pair (5, 1): mean 3, std sqrt((4 + 4) / 1) = 2 sqrt 2
    # alone and tie: (s - mean) = 0, divided by 0 + eps -> 0. A std over the whole batch, or a biased
    # std (sqrt(2/3) for group 0), gives other numbers.
    eps = core.GRPO_EPS
    r2 = 2 * math.sqrt(2)
    want = [-1 / (1 + eps), 0.0, 1 / (1 + eps), 0.0, 0.0, 0.0, 2 / (r2 + eps), -2 / (r2 + eps)]
    assert advantages("grpo").squeeze(1).tolist() == pytest.approx(want, abs=1e-6)


def test_dr_grpo_subtracts_the_group_mean_only():
    want = [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 2.0, -2.0]
    assert advantages("dr_grpo").squeeze(1).tolist() == pytest.approx(want)


def test_reinforce_pp_group_baseline_then_batch_whitening_by_hand():
    # group mean subtracted where a prompt has several samples (the one alone keeps its 10), then
    # whitened over every response token of the batch (unbiased variance)
    centred = [-1.0, 0.0, 1.0, 10.0, 0.0, 0.0, 2.0, -2.0]
    mean = sum(centred) / 8
    std = math.sqrt(sum((c - mean) ** 2 for c in centred) / 7)
    want = [(c - mean) / math.sqrt(std ** 2 + 1e-8) for c in centred]
    assert advantages("reinforce_pp").squeeze(1).tolist() == pytest.approx(want, abs=1e-6)


def test_group_ids_need_not_be_contiguous_or_sorted():
    s, g = torch.tensor([1.0, 5.0, 3.0, 7.0]), torch.tensor([9, 2, 9, 2])
    assert advantages("rloo", s, g).squeeze(1).tolist() == pytest.approx([-2.0, -2.0, 2.0, 2.0])
    n, total, var = core.group_stats(s, g)
    assert n.tolist() == [2, 2, 2, 2] and total.tolist() == [4, 12, 4, 12] and var.tolist() == [2, 2, 2, 2]


def test_penalties_to_go_are_added_and_padding_stays_zero():
    # two samples of one prompt, the second one token shorter; the padded penalty (-9) must not count
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    penalties = torch.tensor([[-0.1, -0.2, -0.3], [-0.5, -0.5, -9.0]])
    s, g = torch.tensor([2.0, 0.0]), torch.tensor([0, 0])
    adv = advantages("rloo", s, g, penalties, mask)
    # score advantages +2 / -2; penalties summed from each token to the end
    want = [[2 - 0.6, 2 - 0.5, 2 - 0.3], [-2 - 1.0, -2 - 0.5, 0.0]]
    assert adv.tolist() == [pytest.approx(r) for r in want]
    assert advantages("dr_grpo", s, g, penalties, mask).tolist() == [pytest.approx(r) for r in
                                                                    [[1 - 0.6, 1 - 0.5, 1 - 0.3], [-1 - 1.0, -1 - 0.5, 0.0]]]


def test_every_estimator_without_scores_says_so():
    for name in ("rloo", "grpo", "dr_grpo", "reinforce_pp"):
        with pytest.raises(ValueError, match=f"the {name} estimator needs the sequence scores"):
            core.advantage_estimator(name).compute(core.AdvantageInputs(torch.zeros(2, 1), torch.ones(2, 1), None, 1, 1))
        assert not core.advantage_estimator(name).needs_critic


# ---------------------------------------------------------------- loss aggregation

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_aggregations_by_hand():
    assert core.aggregate(PER_TOKEN, MASK, "token_mean").item() == pytest.approx(10 / 4)  # (1+2+3+4) / 4 tokens
    assert core.aggregate(PER_TOKEN, MASK, "seq_mean").item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert core.aggregate(PER_TOKEN, MASK, "seq_sum", max_len=8).item() == pytest.approx((6 + 4) / 2 / 8)


def test_seq_sum_normaliser_is_the_configured_length_not_the_padded_width():
    wider = torch.cat([PER_TOKEN, torch.full((2, 5), 3.0)], 1)
    wider_mask = torch.cat([MASK, torch.zeros(2, 5)], 1)
    assert core.aggregate(wider, wider_mask, "seq_sum", max_len=8).item() == pytest.approx(
        core.aggregate(PER_TOKEN, MASK, "seq_sum", max_len=8).item())
    with pytest.raises(ValueError, match="needs max_len"):
        core.aggregate(PER_TOKEN, MASK, "seq_sum")


def test_policy_loss_uses_the_aggregation():
    old = torch.zeros(2, 3)
    adv = -PER_TOKEN  # ratio 1 everywhere: per-token loss = -adv * 1 = PER_TOKEN
    for how, want in (("token_mean", 2.5), ("seq_mean", 3.0), ("seq_sum", 0.625)):
        loss, stats = core.policy_loss(old, old, adv, MASK, 0.2, aggregation=how, max_len=8)
        assert loss.item() == pytest.approx(want)
        assert stats["ratio"].item() == pytest.approx(1.0)


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize("overrides, key", [
    (["ppo.advantage_estimator=rloo"], "ppo.samples_per_prompt"),  # k = 1: nothing to compare with
    (["ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=1"], "ppo.samples_per_prompt"),
    (["ppo.samples_per_prompt=0"], "ppo.samples_per_prompt"),
    (["ppo.advantage_estimator=rloo", "ppo.samples_per_prompt=2", "ppo.whiten_rewards=true"], "ppo.whiten_rewards"),
    (["ppo.loss_aggregation=sum"], "ppo.loss_aggregation"),
    (["ppo.kl_penalty=both"], "ppo.kl_penalty"),
])
def test_bad_estimator_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_auto_aggregation_is_each_papers():
    def agg(*ov):
        return loss_aggregation(load_config(None, list(ov)).ppo)
    assert agg() == "token_mean"  # gae
    assert agg("ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4") == "seq_mean"
    assert agg("ppo.advantage_estimator=dr_grpo", "ppo.samples_per_prompt=4") == "seq_sum"
    assert agg("ppo.advantage_estimator=rloo", "ppo.samples_per_prompt=4") == "seq_sum"
    assert agg("ppo.advantage_estimator=reinforce_pp") == "token_mean"
    assert agg("ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4", "ppo.loss_aggregation=token_mean") == "token_mean"


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_kl_as_a_loss_term_pulls_the_policy_towards_the_reference(estimator):
    """ppo.kl_penalty=loss: minimising the aggregated per-token estimate on the policy's own samples
    (as the trainer does, through the sampled tokens' log-probs) brings KL(pi || ref) down."""
    torch.manual_seed(0)
    ref = torch.log_softmax(torch.tensor([2.0, 0.5, 0.0, -1.0, -2.0]), -1)
    theta = torch.tensor([-2.0, -1.0, 0.0, 0.5, 2.0], requires_grad=True)

    def true_kl() -> float:
        logp = torch.log_softmax(theta.detach(), -1)
        return float((logp.exp() * (logp - ref)).sum())

    start = true_kl()
    opt = torch.optim.SGD([theta], lr=0.5)
    for _ in range(60):
        logp = torch.log_softmax(theta, -1)
        tokens = torch.multinomial(logp.detach().exp(), 4 * 64, replacement=True).view(4, 64)  # 4 responses
        kl = core.kl_estimate(logp[tokens], ref[tokens], estimator)
        loss = core.aggregate(kl, torch.ones(4, 64), "seq_mean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert start > 2 and true_kl() < 0.1 * start, (start, true_kl())


def test_k1_in_the_loss_is_refused():
    with pytest.raises(ConfigError, match="ppo.kl_estimator.*k3"):
        load_config(None, ["ppo.kl_penalty=loss"])
    assert load_config(None, ["ppo.kl_penalty=loss", "ppo.kl_estimator=k3"]).ppo.kl_penalty == "loss"

"""The reward-model ensemble (rlhf.ensemble): aggregations by hand, the bootstrap, and the artifact
that loads as one plain model scoring the members' mean."""
from __future__ import annotations

import json

import pytest
import torch

from rlhf import ensemble
from rlhf.ensemble import Ensemble, aggregate, normalise, spread

RAW = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
STATS = [{"mean": 1.0, "std": 1.0}, {"mean": 2.0, "std": 0.5}]  # z = [[0, 2], [1, 0]]


def test_aggregations_by_hand():
    z = normalise(RAW, STATS)
    assert z.tolist() == [[0.0, 2.0], [1.0, 0.0]]
    assert spread(z).tolist() == [1.0, 0.5]  # population standard deviation across members
    assert aggregate(z, "mean").tolist() == [1.0, 0.5]
    assert aggregate(z, "worst").tolist() == [0.0, 0.0]
    assert aggregate(z, "uncertainty", 1.0).tolist() == [0.0, 0.0]
    assert aggregate(z, "uncertainty", 0.5).tolist() == [0.5, 0.25]
    with pytest.raises(ValueError):
        aggregate(z, "median")


def test_the_held_out_member_is_never_optimised():
    stats = STATS + [{"mean": 0.0, "std": 2.0}]
    raw = torch.tensor([[1.0, 3.0, 100.0], [2.0, 2.0, -100.0]])
    e = Ensemble(stats, "mean", 1.0, hold_out=True)
    assert e.held_out == 2 and e.optimised == [0, 1]
    assert e.score(raw).tolist() == [1.0, 0.5]  # member 2's huge scores play no part
    sig = e.signals(raw)
    assert sig["held_out"] == pytest.approx(0.0) and sig["mean"] == pytest.approx(0.75)
    z = torch.tensor([[0.0, 2.0, 50.0], [1.0, 0.0, -50.0]])
    assert sig["spread"] == pytest.approx(float(z.std(1, unbiased=False).mean()))
    assert sig["conservative"] == pytest.approx(float((z.mean(1) - z.std(1, unbiased=False)).mean()))
    assert Ensemble(STATS, "mean", 1.0, hold_out=True).held_out is None  # two members: both optimised
    assert Ensemble(stats, "worst", 1.0, hold_out=False).score(raw).tolist() == [0.0, -50.0]


def test_bootstrap_is_seeded_poisson_per_member():
    w = ensemble.bootstrap_weights(4000, 3, seed=1)
    assert w.shape == (4000, 3) and torch.equal(w, ensemble.bootstrap_weights(4000, 3, seed=1))
    assert not torch.equal(w[:, 0], w[:, 1])  # each member its own resample
    assert w.mean().item() == pytest.approx(1.0, abs=0.05) and (w == 0).float().mean().item() == pytest.approx(0.368, abs=0.02)


def test_member_loss_is_the_mean_of_each_members_weighted_loss():
    from rlhf.scoring import bradley_terry_loss

    rc, rr = torch.tensor([[1.0, 0.0], [0.5, 2.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    weight, boot = torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    want = (bradley_terry_loss(rc[:, 0], rr[:, 0], None, weight * boot[:, 0])
            + bradley_terry_loss(rc[:, 1], rr[:, 1], None, weight * boot[:, 1])) / 2
    assert ensemble.member_loss(rc, rr, None, weight, boot, bradley_terry_loss).item() == pytest.approx(want.item())
    # member 1 never sees pair 0 (weight 0): its loss is pair 1's alone
    assert bradley_terry_loss(rc[:, 1], rr[:, 1], None, weight * boot[:, 1]).item() == pytest.approx(
        torch.nn.functional.softplus(torch.tensor(-2.0)).item())


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_published_ensemble_loads_as_one_model_scoring_the_members_mean(tmp_path, family_checkpoints, family):
    from transformers import AutoModelForSequenceClassification

    from rlhf.models import load_reward_model
    from rlhf.scoring import reward_scores

    torch.manual_seed(0)
    k = 3
    model = load_reward_model(str(family_checkpoints[family]), "float32", 0, num_labels=k).eval()
    with torch.no_grad():  # distinct members
        model.score.weight.normal_()
    ids = torch.randint(5, 60, (4, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    members = reward_scores(model, ids, mask)
    assert members.shape == (4, k)
    out = tmp_path / "rm"
    model.config.num_labels = 1
    model.save_pretrained(str(out))
    assert ensemble.split_published_head(out) == k
    assert json.loads((out / "config.json").read_text())["num_labels"] == 1
    plain = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert plain.score.weight.shape[0] == 1
    torch.testing.assert_close(reward_scores(plain, ids, mask), members.mean(1), atol=1e-5, rtol=1e-5)
    # PPO's view: the K heads back on the plain model give every member's score
    again = load_reward_model(str(out), "float32", 0).eval()
    ensemble.attach_heads(again, ensemble.load_heads(out))
    torch.testing.assert_close(reward_scores(again, ids, mask), members, atol=1e-5, rtol=1e-5)
    assert ensemble.load_heads(tmp_path) is None

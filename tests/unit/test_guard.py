"""The over-optimisation guard (Selector) and the best-of-n KL, by hand."""
from __future__ import annotations

import math

import pytest

from rlhf.ppo.evaluation import Selector


def point(gold, rm, kl):
    return {"eval/gold_score": gold, "eval/rm_score": rm, "eval/kl_to_sft": kl, "eval/response_length": 10.0,
            "eval/eos_rate": 1.0}


# proxy rising with sqrt(KL) while gold turns over (Gao, Schulman & Hilton 2022)
CURVE = [(0, point(0.10, 0.1, 0.0)), (2, point(0.18, 1.6, 1.2)), (4, point(0.13, 2.1, 2.3)),
         (6, point(0.11, 2.4, 3.7)), (8, point(-0.03, 2.42, 5.7)), (10, point(-0.29, 2.58, 8.1))]


def run(selector, curve=CURVE):
    for update, p in curve:
        _, stop = selector.observe(update, p)
        if stop:
            return update, stop
    return curve[-1][0], None


def test_gold_guard_selects_the_peak_and_stops_after_patience():
    s = Selector("eval/gold_score", kl_budget=100.0, patience=3)
    last, stop = run(s)
    assert (s.best_update, s.best_value) == (2, 0.18)
    assert (last, stop) == (8, "no_improvement")  # 4, 6, 8: three evaluations without improvement
    assert [c["update"] for c in s.curve] == [0, 2, 4, 6, 8]


def test_proxy_guard_follows_the_proxy():
    s = Selector("eval/rm_score", kl_budget=100.0, patience=None)
    assert run(s) == (10, None)
    assert s.best_update == 10


def test_kl_budget_excludes_updates_and_stops_with_patience():
    s = Selector("eval/rm_score", kl_budget=3.0, patience=None)
    run(s)
    assert s.best_update == 4  # 6 and later exceed the budget
    s = Selector("eval/rm_score", kl_budget=3.0, patience=5)
    assert run(s) == (6, "kl_budget")


def test_keep_last_picks_the_last_update_within_budget():
    s = Selector(None, kl_budget=5.0, patience=None)
    run(s)
    assert s.best_update == 6


def test_a_new_best_is_reported_and_state_round_trips():
    s = Selector("eval/gold_score", kl_budget=100.0, patience=3)
    assert s.observe(0, CURVE[0][1]) == (True, None)
    assert s.observe(2, CURVE[1][1]) == (True, None)
    assert s.observe(4, CURVE[2][1]) == (False, None)
    t = Selector("eval/gold_score", kl_budget=100.0, patience=3)
    t.load_state_dict(s.state_dict())
    assert t.observe(6, CURVE[3][1]) == (False, None) and t.observe(8, CURVE[4][1]) == (False, "no_improvement")


@pytest.mark.parametrize("n, kl", [(1, 0.0), (2, math.log(2) - 0.5), (16, math.log(16) - 15 / 16)])
def test_best_of_n_kl(n, kl, monkeypatch):
    import torch

    from rlhf.ppo import evaluation

    class FakeTrainer:  # RM scores 0..n-1 in draw order: the favourite is the last drawn
        tokenizer = None
        reference_sampling = None

        def __init__(self):
            self.k = 0

        def sample(self, texts, **kw):
            self.k += 1
            return [], torch.full((len(texts),), float(self.k))

    rows = evaluation.best_of_n(FakeTrainer(), ["p1", "p2"], ["t1", "t2"], None, [n], 4)
    assert rows == [{"n": n, "kl": pytest.approx(kl), "rm_score": float(n), "gold_score": None}]


# ---------------------------------------------------------------- the final evaluation reuses held-out samples

class _Tok:
    eos_token_id = 1

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids)


class _Trainer:
    """sample() returns fixed responses per policy and counts its calls; KL is 0.5 per token."""

    def __init__(self):
        from rlhf.generation import Sampling

        self.tokenizer, self.update, self.calls = _Tok(), 7, []
        self.sampling = self.reference_sampling = Sampling()

    def sample(self, texts, reference=False, max_new_tokens=None, sampling=None):
        import torch

        from rlhf.generation import Generated

        self.calls.append("sft" if reference else "policy")
        resp = torch.tensor([[5, 1, 0], [6, 7, 1]] if reference else [[8, 9, 1], [4, 1, 0]])
        mask = (torch.arange(3) <= (resp == 1).float().argmax(1, keepdim=True)).long()
        g = Generated(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long), resp, mask,
                      torch.tensor([True, True]))
        return [g], torch.tensor([0.1, 0.4] if reference else [0.9, 0.2])

    def kl_to_reference(self, g):
        return 0.5 * g.response_mask.sum(1).float()


def test_final_evaluation_uses_held_out_samples_instead_of_sampling_again():
    from rlhf.ppo.evaluation import Drawn, evaluate

    prompts = ["a", "b"]
    gold = lambda prompt, response: float(len(response))  # noqa: E731 - a scorer is any callable
    fresh_trainer = _Trainer()
    fresh, fresh_rows = evaluate(fresh_trainer, prompts, prompts, gold, 3)
    assert fresh_trainer.calls == ["policy", "sft"]
    assert fresh["rm_score_ppo"] == pytest.approx(0.55) and fresh["rm_score_sft"] == pytest.approx(0.25)
    assert fresh["win_rate_rm"] == 0.5 and fresh["kl_ppo_vs_sft"] == pytest.approx(1.25)  # (3 + 2) tokens x 0.5 / 2
    trainer = _Trainer()
    policy, sft = Drawn(7, *trainer.sample(prompts)), Drawn(0, *trainer.sample(prompts, reference=True))
    trainer.calls.clear()
    reused, rows = evaluate(trainer, prompts, prompts, gold, 3, policy=policy, sft=sft)
    assert trainer.calls == []  # nothing sampled or scored again
    assert reused == fresh and rows == fresh_rows

"""The gold-free signals of reward hacking (rlhf.ppo.drift) and the guard that acts on them, by hand."""
from __future__ import annotations

import math
from collections import Counter

import pytest

from rlhf.ppo import drift
from rlhf.ppo.evaluation import Selector
from rlhf.ppo.run import guard_metric, warnings


def test_token_drift_by_hand():
    # policy {1: 3, 2: 1}, SFT {1: 1, 2: 3}, add-0.5 smoothing: p = (0.7, 0.3), q = (0.3, 0.7)
    d = drift.token_drift(Counter({1: 3, 2: 1}), Counter({1: 1, 2: 3}))
    assert d["kl"] == pytest.approx(0.4 * math.log(7 / 3))
    assert [t["token"] for t in d["tokens"]] == [1]  # only token 1 grew
    t = d["tokens"][0]
    assert (t["policy"], t["sft"], t["ratio"], t["share"]) == pytest.approx((0.7, 0.3, 7 / 3, 1.0))
    assert d["gain"] == pytest.approx(0.4)
    assert drift.junk_tokens(d) == []  # 2.3x is not several-fold


def test_a_junk_token_is_flagged_and_a_spread_out_drift_is_not():
    # token 5: 1 of 10 SFT tokens -> 8 of 10 policy tokens: (8.5/11) / (1.5/11) = 5.67x
    d = drift.token_drift(Counter({5: 8, 6: 2}), Counter({5: 1, 6: 9}))
    assert d["kl"] == pytest.approx(8.5 / 11 * math.log(8.5 / 1.5) + 2.5 / 11 * math.log(2.5 / 9.5))
    junk = drift.junk_tokens(d)
    assert [t["token"] for t in junk] == [5] and junk[0]["ratio"] == pytest.approx(8.5 / 1.5)
    # twenty tokens each growing ~4x from a small base: no few tokens carry the drift
    sft = Counter({t: 1 for t in range(20)}) + Counter({100: 400})
    policy = Counter({t: 6 for t in range(20)}) + Counter({100: 340})
    d = drift.token_drift(policy, sft)
    assert all(t["ratio"] > 3 for t in d["tokens"]) and d["top_share"] < 0.5
    assert drift.junk_tokens(d) == []
    # ... unless one of them surges: 1 -> 18 of ~480 tokens (11x, +3.5 %) while the rest drift as before
    d = drift.token_drift(policy + Counter({7: 12}), sft)
    junk = drift.junk_tokens(d)
    assert d["top_share"] < 0.5 and [t["token"] for t in junk] == [7] and junk[0]["ratio"] == pytest.approx(11.0, abs=0.05)
    assert drift.junk_tokens(drift.token_drift(policy + Counter({7: 8}), sft)) == []  # 8.7x: not yet


def test_distinct_and_repetition_by_hand():
    assert drift.distinct_n([[1, 2, 1, 2], [1, 2]], 2) == pytest.approx(2 / 4)
    assert drift.repetition([[1, 2, 1, 2, 1], [3, 4]], 3) == pytest.approx(1 / 3)  # [3, 4] has no 3-gram
    assert drift.distinct_n([[1]], 2) is None and drift.repetition([[1, 2]], 3) is None


@pytest.mark.parametrize("length,sft,corr,want", [(15, 10, 0.78, "longer"), (15, 10, 0.2, None), (7, 10, -0.6, "shorter"),
                                                  (11.5, 10, 0.9, None), (7, 10, 0.9, None), (15, 10, None, None)])
def test_length_drift_needs_a_reward_model_that_pays_for_it(length, sft, corr, want):
    assert drift.length_drift(length, sft, corr) == want


def test_flags_name_their_evidence():
    d = drift.token_drift(Counter({5: 8, 6: 2}), Counter({5: 1, 6: 9}))
    out = drift.flags({"response_length": 20.0, "drift": d, "spread": 0.9},
                      {"response_length": 10.0, "spread": 0.3}, reward_length_corr=0.8, names={5: "zz"})
    assert [f["signal"] for f in out] == ["tokens", "length", "spread"]
    assert out[0]["tokens"] == ["zz"] and "one token carries 100%" in out[0]["detail"]
    assert "'zz' 13.6% -> 77.3% (5.7x)" in out[0]["detail"]
    assert "10.0 -> 20.0 tokens" in out[1]["detail"] and "longer" in out[1]["detail"]
    assert "3.0x" in out[2]["detail"]


def point(rm, kl, cons=None):
    p = {"eval/rm_score": rm, "eval/kl_to_sft": kl, "eval/response_length": 10.0, "eval/eos_rate": 1.0}
    if cons is not None:
        p["eval/conservative_score"] = cons
    return p


TOKENS = {"signal": "tokens", "detail": "a few tokens ...", "tokens": ["zz"]}


def test_the_gate_publishes_nothing_from_the_first_flag_on_and_stops_there():
    s = Selector("eval/rm_score", kl_budget=100.0, patience=None, gate=True)
    for u, rm, flags in ((0, 0.1, []), (2, 1.0, []), (4, 1.5, []), (6, 3.0, [TOKENS]), (8, 4.0, []), (10, 5.0, [])):
        s.observe(u, point(rm, 1.0), flags)
    assert s.best_update == 4 and s.flagged_at == 6  # 8 and 10 are unflagged, but past the first flag
    assert [c["flags"] for c in s.curve][3] == ["tokens"]
    assert "before update 6" in s.reason(4) and "tokens" in s.reason(4)
    w = warnings(s, 4)
    assert len(w) == 1 and "token drift" in w[0] and "update 6" in w[0] and "published update 4 is before it" in w[0]
    s = Selector("eval/rm_score", kl_budget=100.0, patience=5, gate=True)
    s.observe(0, point(0.1, 0.0))
    assert s.observe(2, point(1.0, 1.0), [TOKENS]) == (False, "exploitation")
    # without the gate (a gold scorer decides) the flag is recorded but does not constrain the choice
    s = Selector("eval/rm_score", kl_budget=100.0, patience=None, gate=False)
    s.observe(0, point(0.1, 0.0))
    s.observe(2, point(1.0, 1.0), [TOKENS])
    assert s.best_update == 2 and s.flags[0]["update"] == 2
    state = s.state_dict()
    t = Selector("eval/rm_score", kl_budget=100.0, patience=None)
    t.load_state_dict(state)
    assert t.state_dict() == state


def test_guard_metric_without_gold_is_conservative():
    assert guard_metric("auto", None) == ("eval/rm_score", True)
    assert guard_metric("auto", None, ensemble=True) == ("eval/conservative_score", True)
    assert guard_metric("auto", lambda p, r: 0.0) == ("eval/gold_score", False)
    assert guard_metric("conservative", lambda p, r: 0.0, ensemble=True) == ("eval/conservative_score", True)
    assert guard_metric("rm_score", None) == ("eval/rm_score", False)
    assert guard_metric("last", None) == (None, False)

"""The reward model's diagnostics (rlhf.reward_training), checked against hand-computed values."""
from __future__ import annotations

import math

import pytest

from rlhf.reward_training import (LENGTH_CORR_WARN, calibration, length_warning, pearson, response_length,
                                  reward_histogram, rm_diagnostics)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_calibration_by_hand():
    # (r_chosen - r_rejected) chosen so that the folded confidence sigmoid(|d|) sits mid-bin
    diffs = [logit(0.775)] * 3 + [-logit(0.775)]   # bin [0.75, 0.8): 4 pairs at 0.775, 3 right -> acc 0.75
    diffs += [logit(0.925)] * 2                     # bin [0.9, 0.95): 2 pairs at 0.925, both right
    diffs += [0.0, -logit(0.525)]                   # bin [0.5, 0.55): a tie (0.5, half right) and a miss at 0.525
    ece, bins = calibration(diffs, [0.0] * len(diffs))
    assert len(bins) == 10 and bins[0]["lo"] == 0.5 and bins[-1]["hi"] == 1.0
    assert [b["count"] for b in bins] == [2, 0, 0, 0, 0, 4, 0, 0, 2, 0]
    assert bins[5]["confidence"] == pytest.approx(0.775) and bins[5]["accuracy"] == pytest.approx(0.75)
    assert bins[8]["confidence"] == pytest.approx(0.925) and bins[8]["accuracy"] == 1.0
    assert bins[0]["confidence"] == pytest.approx(0.5125) and bins[0]["accuracy"] == pytest.approx(0.25)
    assert bins[1]["confidence"] is None and bins[1]["accuracy"] is None
    # 4/8 * |0.75 - 0.775| + 2/8 * |1 - 0.925| + 2/8 * |0.25 - 0.5125|
    assert ece == pytest.approx(0.5 * 0.025 + 0.25 * 0.075 + 0.25 * 0.2625)  # 0.096875


def test_calibration_is_about_differences_only_and_perfect_when_accuracy_matches():
    # 10 pairs at confidence 0.925, 9 right: |0.9 - 0.925|; shifting both rewards changes nothing
    diffs = [logit(0.925)] * 9 + [-logit(0.925)]
    ece, _ = calibration([d + 3.0 for d in diffs], [3.0] * 10)
    assert ece == pytest.approx(0.025)
    # ... at confidence 0.9 with 9 right: perfectly calibrated
    ece, bins = calibration([logit(0.9)] * 9 + [-logit(0.9)], [0.0] * 10)
    assert ece == pytest.approx(0.0, abs=1e-12)
    assert sum(b["count"] for b in bins) == 10
    assert calibration([], [])[0] == 0.0
    with pytest.raises(ValueError):
        calibration([1.0], [])


def test_pearson_by_hand():
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [8, 6, 4, 2]) == pytest.approx(-1.0)
    # dx = dy-ish: sxy = 2.25 - .25 - .25 + 2.25 = 4, sxx = syy = 5
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    assert pearson([1.0], [2.0]) is None


def test_length_warning_threshold():
    assert LENGTH_CORR_WARN == 0.7
    assert length_warning(None, "x") is None
    assert length_warning(0.69, "x") is None and length_warning(-0.69, "x") is None
    w = length_warning(0.7, "held-out pairs")
    assert w and "held-out pairs" in w and "r^2 = 0.49" in w and "longer" in w and "PPO" in w
    assert "shorter" in length_warning(-0.9, "x")


def test_reward_histogram():
    h = reward_histogram([0.0, 1.0, 2.0], [0.5, 3.0], bins=3)
    assert h["edges"] == [0.0, 1.0, 2.0, 3.0]
    assert h["chosen"] == [1, 1, 1] and h["rejected"] == [1, 0, 1]  # the top edge falls in the last bin
    h = reward_histogram([1.0], [1.0], bins=2)
    assert sum(h["chosen"]) == 1 and len(h["edges"]) == 3


def test_response_length():
    assert response_length([5, 6, 7, 8, 2], 2, eos_id=2) == 2   # prompt [5, 6], response [7, 8] + EOS
    assert response_length([5, 6, 7, 8], 2, eos_id=2) == 2      # truncated: no EOS
    assert response_length([5, 6], 2, eos_id=2) == 0


def test_rm_diagnostics_warns_when_length_drives_the_reward():
    # rewards grow with length: the chosen (longer) responses win
    len_c, len_r = [5, 6, 7, 8], [1, 2, 3, 4]
    out = rm_diagnostics(([float(v) for v in len_c], [float(v) for v in len_r], len_c, len_r),
                         ([0.1, 0.2, 0.3], [1, 2, 3]))
    assert out["length_reward_corr"] == pytest.approx(1.0) and out["length_reward_corr_sft"] == pytest.approx(1.0)
    assert len(out["warnings"]) == 2
    assert sum(out["reward_histogram"]["chosen"]) == 4 and sum(out["reward_histogram"]["rejected"]) == 4
    assert out["length_reward_points"]["held_out"]["length"] == len_c + len_r
    assert set(out) >= {"calibration_ece", "calibration_bins", "reward_histogram", "length_reward_corr",
                        "length_reward_corr_sft", "length_reward_points", "warnings"}
    # no held-out pairs: only the SFT figure; no length effect: no warning
    out = rm_diagnostics(None, ([1.0, -1.0, 1.0, -1.0], [1, 2, 3, 4]))
    assert "calibration_ece" not in out and out["warnings"] == []
    assert out["length_reward_corr_sft"] == pytest.approx(-0.4472135955)

import math

import pytest

from mmchat.calibration import expected_calibration_error, reliability, sweep
from mmchat.evaluation import EvalResult, TurnResult


def test_a_calibrated_model_has_no_calibration_error():
    # 0.25: one of four right; 0.75: three of four right
    conf = [0.25] * 4 + [0.75] * 4
    correct = [True, False, False, False, True, True, True, False]
    bins = reliability(conf, correct, n_bins=4)
    assert [b.turns for b in bins] == [0, 4, 0, 4]
    assert bins[1].accuracy == 0.25 and bins[3].accuracy == 0.75
    assert expected_calibration_error(bins) == pytest.approx(0.0)


def test_overconfidence_is_the_weighted_gap():
    conf = [0.95] * 8 + [1.0] * 2  # 1.0 lands in the last bin
    correct = [True] * 4 + [False] * 4 + [True] * 2
    bins = reliability(conf, correct)
    assert bins[-1].turns == 10 and math.isnan(bins[0].accuracy)
    assert bins[-1].accuracy == pytest.approx(0.6)
    assert expected_calibration_error(bins) == pytest.approx(0.96 - 0.6)


def test_the_sweep_and_the_fallback_rate_count_loops_and_unsure_replies():
    turns = [TurnResult("d", "colour", "red", "red", "red", {}, 0.9, "stop"),
             TurnResult("d", "colour", "red", "blue", "red", {}, 0.2, "stop"),
             TurnResult("d", "ood", "x", "as as as", None, {}, 0.95, "loop"),
             TurnResult("d", "ood", "x", "y", None, {}, 0.1, "length")]
    result = EvalResult(turns, fallback_threshold=0.5)
    assert result.fallback_rate("colour") == 0.5 and result.fallback_rate("ood") == 1.0
    assert result.fallback_rate() == 0.75
    none, half = sweep([t.confidence for t in turns], [t.exact for t in turns],
                       [t.finish_reason for t in turns], [0.0, 0.5])
    assert none.fallback_rate == 0.25 and none.kept_accuracy == pytest.approx(1 / 3)
    assert half.fallback_rate == 0.75 and half.kept_accuracy == 1.0


def test_the_user_sees_the_fallback_when_the_engine_or_the_model_says_it():
    text = "sorry, i can't help with that."
    turns = [TurnResult("d", "ood", text, "Sorry, I can't help with that.", None, {}, 0.9),
             TurnResult("d", "ood", text, "paris is sunny", None, {}, 0.1),
             TurnResult("d", "ood", text, "paris is sunny", None, {}, 0.9)]
    result = EvalResult(turns, fallback_threshold=0.5, fallback_text=text)
    assert [result.sees_fallback(t) for t in turns] == [True, True, False]
    assert [result.fell_back(t) for t in turns] == [False, True, False]

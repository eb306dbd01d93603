"""The early-stop rule, the best iteration and scorer loading, on constructed evaluation histories."""

import pytest

from spin_core.errors import SpinError
from spin_core.stopping import StopRule, best_iteration, call_scorer, load_scorer, stop_reason


def h(*scores, margins=None):
    return {
        t: {"score": s, "rewards/margins": (margins or [1.0] * len(scores))[t - 1]} for t, s in enumerate(scores, 1)
    }


def test_no_rule_never_stops():
    assert stop_reason(h(0.5, 0.4, 0.3), StopRule()) is None


def test_patience_counts_iterations_since_the_best():
    rule = StopRule(patience=2)
    assert stop_reason(h(0.5, 0.6), rule) is None
    assert stop_reason(h(0.5, 0.6, 0.55), rule) is None
    reason = stop_reason(h(0.5, 0.6, 0.55, 0.58), rule)
    assert reason and "best 0.6000 at iteration 2" in reason


def test_min_delta_ignores_small_gains():
    rule = StopRule(patience=1, min_delta=0.05)
    assert stop_reason(h(0.50, 0.52), rule) is not None
    assert stop_reason(h(0.50, 0.56), rule) is None


def test_baseline_counts_as_iteration_zero():
    rule = StopRule(patience=1)
    assert "iteration 0" in stop_reason(h(0.3), rule, baseline=0.4)
    assert stop_reason(h(0.5), rule, baseline=0.4) is None


def test_margin_threshold():
    rule = StopRule(margin_below=0.1)
    assert stop_reason(h(0.5, 0.6, margins=[1.0, 0.5]), rule) is None
    assert "fell below 0.1" in stop_reason(h(0.5, 0.6, margins=[1.0, 0.05]), rule)


def test_best_iteration_prefers_the_earliest_on_ties_and_skips_missing():
    assert best_iteration(h(0.5, 0.7, 0.7), "score") == (2, 0.7)
    assert best_iteration({1: {"score": None}, 2: {"score": 0.1}}, "score") == (2, 0.1)
    assert best_iteration({}, "score") is None


def test_scorer_references():
    scorer = load_scorer("spin_core.demo:score")
    assert call_scorer(scorer, "x", "What is 1+1?", "2", " 2 ") == 1.0
    with pytest.raises(SpinError, match="cannot import module 'nosuchmodule'"):
        load_scorer("nosuchmodule:f")
    with pytest.raises(SpinError, match="has no 'nope'"):
        load_scorer("spin_core.demo:nope")
    with pytest.raises(SpinError, match="must look like 'module:function'"):
        load_scorer("spin_core.demo")


def test_scorer_that_raises_or_returns_a_non_number():
    def boom(p, r, g):
        raise KeyError("x")

    with pytest.raises(SpinError, match="raised KeyError"):
        call_scorer(boom, "m:boom", "p", "r", "g")
    with pytest.raises(SpinError, match="must return a number"):
        call_scorer(lambda p, r, g: "1", "m:f", "p", "r", "g")
    with pytest.raises(SpinError, match="must return a number"):
        call_scorer(lambda p, r, g: float("nan"), "m:f", "p", "r", "g")

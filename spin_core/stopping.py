"""Knowing when to stop: the task scorer reference, the early-stop rule and the best iteration.

Pure functions over evaluation results, shared by the planner (both executors) and the reports.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from spin_core.errors import SpinError, StepFailed

Scorer = Callable[[str, str, str], float]


def load_scorer(reference: str) -> Scorer:
    """Import `module:function`; a clear error when it cannot be imported or is not callable."""
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise SpinError(f"evaluation.scorer {reference!r} must look like 'module:function' (e.g. spin_core.demo:score)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SpinError(f"evaluation.scorer {reference!r}: cannot import module {module_name!r}: {e}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise SpinError(f"evaluation.scorer {reference!r}: module {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise SpinError(f"evaluation.scorer {reference!r} is not callable")
    return fn  # type: ignore[return-value]


def call_scorer(
    scorer: Scorer, reference: str, prompt: str, real: str, generated: str, row: str | None = None
) -> float:
    """Call the scorer; an exception or a non-number is a failed step (StepFailed) naming the row (`row`: its id)."""
    on = f" on row {row!r} (prompt {_short(prompt)})" if row is not None else ""
    try:
        value = scorer(prompt, real, generated)
    except Exception as e:
        raise StepFailed(f"evaluation.scorer {reference!r} raised {type(e).__name__}{on}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise StepFailed(f"evaluation.scorer {reference!r} returned {value!r}{on}; it must return a number")
    return float(value)


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


@dataclass(frozen=True)
class StopRule:
    """Stop when the metric has not improved by min_delta for `patience` iterations, or the margin fell below."""

    metric: str = "score"
    patience: int = 0  # 0: never stop for lack of improvement
    min_delta: float = 0.0
    margin_below: float | None = None


def metric_of(result: Mapping[str, Any], metric: str) -> float | None:
    value = result.get(metric)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def best_iteration(history: Mapping[int, Mapping[str, Any]], metric: str) -> tuple[int, float] | None:
    """(iteration, value) with the highest metric; the earliest wins a tie."""
    scored = [(t, v) for t, r in sorted(history.items()) if (v := metric_of(r, metric)) is not None]
    if not scored:
        return None
    return max(scored, key=lambda tv: (tv[1], -tv[0]))


def stop_reason(history: Mapping[int, Mapping[str, Any]], rule: StopRule, baseline: float | None = None) -> str | None:
    """Why the run should stop after the last evaluated iteration, or None to go on.

    `history` maps iteration -> evaluation result; `baseline` is the metric of the starting model (iteration 0).
    """
    if not history:
        return None
    last = max(history)
    if rule.margin_below is not None:
        margin = metric_of(history[last], "rewards/margins")
        if margin is not None and margin < rule.margin_below:
            return (
                f"held-out reward margin {margin:.4f} of iteration {last} fell below {rule.margin_below}: "
                "the model can barely tell its own answers from the data"
            )
    if rule.patience > 0:
        values = {t: v for t, r in history.items() if (v := metric_of(r, rule.metric)) is not None}
        if baseline is not None:
            values[0] = baseline
        best_t = None
        for t in sorted(values):
            if best_t is None or values[t] > values[best_t] + rule.min_delta:
                best_t = t
        if best_t is not None and last - best_t >= rule.patience:
            return (
                f"{rule.metric} has not improved by more than {rule.min_delta} for {last - best_t} iteration(s) "
                f"(best {values[best_t]:.4f} at iteration {best_t})"
            )
    return None

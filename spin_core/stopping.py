"""Knowing when to stop: the task scorer reference, the held-out score's uncertainty, the held-out collapse check, the
early-stop rule and the best iteration.

Pure functions over evaluation results, shared by the evaluation step, the planner (both executors) and the reports.
"""

from __future__ import annotations

import importlib
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
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


Z95 = 1.959963984540054  # two-sided 95 % normal quantile
COLLAPSE_Z = 2.0  # a held-out score drop counts when it exceeds this many standard errors of the paired change


@dataclass(frozen=True)
class Estimate:
    """A held-out mean score with its standard error and a 95 % interval."""

    mean: float
    stderr: float
    low: float
    high: float
    n: int


def estimate(values: Sequence[float]) -> Estimate:
    """Mean of per-prompt scores, its standard error and a 95 % interval. When every score is 0 or 1 (exact match)
    the standard error is the binomial sqrt(p(1-p)/n) and the interval Wilson's (sound near 0 % and 100 %);
    otherwise the sample standard error and mean ± 1.96 SE."""
    n = len(values)
    if n == 0:
        raise ValueError("no scores")
    mean = statistics.fmean(values)
    if all(v in (0.0, 1.0) for v in values):
        stderr = math.sqrt(mean * (1 - mean) / n)
        z2 = Z95 * Z95
        centre = (mean + z2 / (2 * n)) / (1 + z2 / n)
        half = Z95 * math.sqrt(mean * (1 - mean) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        # Mathematically low <= mean <= high, with low 0 at p = 0 and high 1 at p = 1; rounding must not break that.
        return Estimate(mean, stderr, min(mean, max(0.0, centre - half)), max(mean, min(1.0, centre + half)), n)
    stderr = statistics.stdev(values) / math.sqrt(n) if n > 1 else 0.0
    return Estimate(mean, stderr, mean - Z95 * stderr, mean + Z95 * stderr, n)


def estimate_fields(prefix: str, values: Sequence[float]) -> dict[str, float]:
    """{prefix, prefix_stderr, prefix_ci95_low, prefix_ci95_high} of `estimate(values)` (eval.json's names)."""
    e = estimate(values)
    return {prefix: e.mean, f"{prefix}_stderr": e.stderr, f"{prefix}_ci95_low": e.low, f"{prefix}_ci95_high": e.high}


def paired_change(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """(mean of after - before, its standard error) over the same prompts: the paired comparison of two models,
    much tighter than the two scores' own intervals since most prompts are answered alike by both."""
    if len(before) != len(after) or not before:
        raise ValueError(f"need two equally long, non-empty score lists, got {len(before)} and {len(after)}")
    diffs = [a - b for b, a in zip(before, after, strict=True)]
    stderr = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return statistics.fmean(diffs), stderr


def heldout_collapse(result: Mapping[str, Any], nats: float, z: float = COLLAPSE_Z) -> list[str]:
    """Warnings when an evaluation shows the new model M_t worse than M_{t-1} on the held-out prompts, as a user
    sees it: its score fell by more than `z` standard errors of the paired change (`score_change`,
    `score_change_stderr`), or its held-out log p(real answer) fell by more than `nats` (training.collapseWarnNats;
    `logps/real_change`). Empty when neither holds or the numbers are missing."""
    t = result.get("iteration", "?")
    warnings = []
    change, stderr = metric_of(result, "score_change"), metric_of(result, "score_change_stderr")
    if change is not None and stderr is not None and change < 0 and -change > z * stderr:
        before, after = metric_of(result, "score_previous"), metric_of(result, "score")
        warnings.append(
            f"iteration {t}: the held-out score fell from {before:.4f} (M_{_previous(t)}) to {after:.4f} "
            f"({change:+.4f} ± {stderr:.4f} paired standard error, more than {z:g} standard errors)"
        )
    logp_change = metric_of(result, "logps/real_change")
    if logp_change is not None and logp_change < -nats:
        before, after = metric_of(result, "logps/real_previous"), metric_of(result, "logps/real")
        warnings.append(
            f"iteration {t}: the held-out log p(real answer) fell by {-logp_change:.2f} nats ({before:.2f} under "
            f"M_{_previous(t)} -> {after:.2f}), more than collapseWarnNats {nats:g}: SPIN may be collapsing; consider "
            "training.sftWeight, klToBase, a larger beta or fewer epochs"
        )
    return warnings


def _previous(t: Any) -> str:
    return str(t - 1) if isinstance(t, int) else "{t-1}"


@dataclass(frozen=True)
class StopRule:
    """Stop when the metric has not improved by min_delta for `patience` iterations, when the margin fell below
    `margin_below`, or (`collapse`) when the last evaluation warned of a held-out collapse."""

    metric: str = "score"
    patience: int = 0  # 0: never stop for lack of improvement
    min_delta: float = 0.0
    margin_below: float | None = None
    collapse: bool = False


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
    if rule.collapse and (metric_of(history[last], "collapse") or 0.0) > 0:
        return f"the evaluation of iteration {last} warned of a collapse ({_collapse_numbers(history[last])})"
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


def _collapse_numbers(result: Mapping[str, Any]) -> str:
    """The held-out numbers behind a collapse flag (the operator's status keeps the numbers, not the warning text)."""
    parts = []
    before, after, change = (metric_of(result, k) for k in ("score_previous", "score", "score_change"))
    stderr = metric_of(result, "score_change_stderr")
    if before is not None and after is not None and change is not None and stderr is not None:
        parts.append(f"score {before:.4f} -> {after:.4f}, change {change:+.4f} ± {stderr:.4f}")
    before, after = metric_of(result, "logps/real_previous"), metric_of(result, "logps/real")
    if before is not None and after is not None:
        parts.append(f"held-out log p(real) {before:.2f} -> {after:.2f}")
    return "; ".join(parts) or "see its eval.json"


@dataclass(frozen=True)
class HeldoutPoint:
    """One model's held-out numbers: iteration 0 is the starting model (measured by iteration 1's evaluation)."""

    iteration: int
    score: float | None
    low: float | None
    high: float | None
    logp_real: float | None


def heldout_points(evaluations: Mapping[int, Mapping[str, Any]]) -> list[HeldoutPoint]:
    """The held-out score (with its 95 % interval) and log p(real answer) per model, the starting model first as
    iteration 0 (from iteration 1's `score_previous` / `baseline_score` and `logps/real_previous`)."""
    points = []
    first = evaluations.get(1)
    if first is not None:
        start = metric_of(first, "score_previous")
        points.append(
            HeldoutPoint(
                0,
                start if start is not None else metric_of(first, "baseline_score"),
                metric_of(first, "score_previous_ci95_low"),
                metric_of(first, "score_previous_ci95_high"),
                metric_of(first, "logps/real_previous"),
            )
        )
    for t, result in sorted(evaluations.items()):
        points.append(
            HeldoutPoint(
                t,
                metric_of(result, "score"),
                metric_of(result, "score_ci95_low"),
                metric_of(result, "score_ci95_high"),
                metric_of(result, "logps/real"),
            )
        )
    return points


def format_score(point: HeldoutPoint) -> str:
    """'0.3047 [0.2660, 0.3464]' (the 95 % interval when known), or '-'."""
    if point.score is None:
        return "-"
    if point.low is None or point.high is None:
        return f"{point.score:.4f}"
    return f"{point.score:.4f} [{point.low:.4f}, {point.high:.4f}]"

"""The planner: a pure function from (spec, what is done) to the next step of a SpinRun.

Both executors call it: the local runner (`spin run`, which learns what is done from the store) and the
operator (which learns it from its children's states). So they can never disagree about what an
iteration is or in which order its steps run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from spin_core import layout
from spin_core.spec import SpinRunSpec
from spin_core.stopping import StopRule, best_iteration, stop_reason

StepKind = Literal["generate", "train", "evaluate", "done"]


@dataclass(frozen=True)
class Progress:
    """What is finished: published shards per iteration, iterations whose model is published, and the
    evaluation results of evaluated iterations (`iter-<t>/eval.json`)."""

    generated: dict[int, frozenset[int]] = field(default_factory=dict)
    trained: frozenset[int] = frozenset()
    evaluated: dict[int, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_published(cls, keys: Iterable[str], shards: int) -> Progress:
        """Read progress from the keys of published artefacts (`Store.published("")`).

        Only shards of the spec's shard count count: a run whose shard count changed regenerates.
        """
        generated: dict[int, set[int]] = {}
        trained: set[int] = set()
        shard_key = re.compile(rf"^iter-(\d+)/generated/shard-(\d+)-of-{shards}$")
        checkpoint_key = re.compile(r"^iter-(\d+)/checkpoint$")
        for key in keys:
            if m := shard_key.match(key):
                generated.setdefault(int(m[1]), set()).add(int(m[2]))
            elif m := checkpoint_key.match(key):
                trained.add(int(m[1]))
        return cls({t: frozenset(s) for t, s in generated.items()}, frozenset(trained))


@dataclass(frozen=True)
class Step:
    """The next thing to do. `shards` lists the shards still to generate (kind == "generate"); `reason` says
    why a run is done early (kind == "done" before spec.iterations)."""

    kind: StepKind
    iteration: int
    shards: tuple[int, ...] = ()
    reason: str | None = None

    def describe(self, iterations: int) -> str:
        if self.kind == "generate":
            return f"iteration {self.iteration}/{iterations}: generate shards {list(self.shards)}"
        if self.kind == "train":
            return f"iteration {self.iteration}/{iterations}: train"
        if self.kind == "evaluate":
            return f"iteration {self.iteration}/{iterations}: evaluate"
        return f"done after iteration {self.iteration}" + (f": {self.reason}" if self.reason else "")


def stop_rule(spec: SpinRunSpec) -> StopRule:
    ev = spec.evaluation
    if ev is None:
        return StopRule()
    w = ev.stop_when
    return StopRule(
        metric=ev.metric,
        patience=w.patience,
        min_delta=w.min_delta,
        margin_below=w.margin_below,
        collapse=w.collapse,
    )


def baseline(progress: Progress, metric: str) -> float | None:
    """The starting model's value of the metric (iteration 1's evaluation scores M_0 too)."""
    first = progress.evaluated.get(1, {})
    return first.get("baseline_score") if metric == "score" else None


def plan(spec: SpinRunSpec, progress: Progress) -> Step:
    """The next step: the first iteration without a model needs shards or training; with evaluation on, each
    trained iteration is evaluated before the next starts, and the stop rule may end the run early."""
    evaluating = spec.evaluation is not None
    for t in range(1, spec.iterations + 1):
        if t in progress.trained:
            if not evaluating:
                continue
            if t not in progress.evaluated:
                return Step("evaluate", t)
            history = {i: r for i, r in progress.evaluated.items() if i <= t}
            rule = stop_rule(spec)
            if t < spec.iterations and (reason := stop_reason(history, rule, baseline(progress, rule.metric))):
                return Step("done", t, reason=reason)
            continue
        missing = tuple(i for i in range(spec.generation.shards) if i not in progress.generated.get(t, ()))
        if missing:
            return Step("generate", t, missing)
        return Step("train", t)
    return Step("done", spec.iterations)


def training_iterations(spec: SpinRunSpec, t: int) -> list[int]:
    """Iterations whose generated pairs iteration t trains on: t and the `mixPreviousIterations` before it."""
    return list(range(max(1, t - spec.mix_previous_iterations), t + 1))


def best(spec: SpinRunSpec, progress: Progress) -> tuple[int, float] | None:
    """(iteration, metric value) of the best evaluated model, if evaluation is on."""
    if spec.evaluation is None:
        return None
    return best_iteration(progress.evaluated, spec.evaluation.metric)


def latest_checkpoint(progress: Progress) -> str | None:
    """Store key of the newest published model, if any."""
    return layout.checkpoint(max(progress.trained)) if progress.trained else None

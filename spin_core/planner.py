"""The planner: a pure function from (spec, what is done) to the next step of a SpinRun.

Both executors call it: the local runner (`spin run`, which learns what is done from the store) and the
operator (which learns it from its children's states). So they can never disagree about what an
iteration is or in which order its steps run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from spin_core import layout
from spin_core.spec import SpinRunSpec

StepKind = Literal["generate", "train", "done"]


@dataclass(frozen=True)
class Progress:
    """What is finished: published shards per iteration, and iterations whose model is published."""

    generated: dict[int, frozenset[int]] = field(default_factory=dict)
    trained: frozenset[int] = frozenset()

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
    """The next thing to do. `shards` lists the shards still to generate (kind == "generate")."""

    kind: StepKind
    iteration: int
    shards: tuple[int, ...] = ()

    def describe(self, iterations: int) -> str:
        if self.kind == "generate":
            return f"iteration {self.iteration}/{iterations}: generate shards {list(self.shards)}"
        if self.kind == "train":
            return f"iteration {self.iteration}/{iterations}: train"
        return f"done: {self.iteration} iterations trained"


def plan(spec: SpinRunSpec, progress: Progress) -> Step:
    """The next step: the first iteration without a model either still needs shards or needs training."""
    for t in range(1, spec.iterations + 1):
        if t in progress.trained:
            continue
        missing = tuple(i for i in range(spec.generation.shards) if i not in progress.generated.get(t, ()))
        if missing:
            return Step("generate", t, missing)
        return Step("train", t)
    return Step("done", spec.iterations)


def training_iterations(spec: SpinRunSpec, t: int) -> list[int]:
    """Iterations whose generated pairs iteration t trains on: t and the `mixPreviousIterations` before it."""
    return list(range(max(1, t - spec.mix_previous_iterations), t + 1))


def latest_checkpoint(progress: Progress) -> str | None:
    """Store key of the newest published model, if any."""
    return layout.checkpoint(max(progress.trained)) if progress.trained else None

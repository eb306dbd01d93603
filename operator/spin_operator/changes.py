"""Which edits of a running SpinRun's spec can be applied.

Once a run has started, its artefacts (shards, checkpoints) depend on nearly every field, so only these may
change: `iterations` (not below the iteration in progress), `suspend`, and the `schedule` entries of iterations
that have not started yet. Anything else is rejected with a condition naming the fields; the run carries on with
the last accepted spec.
"""

from __future__ import annotations

import json
from typing import Any

from spin_core.spec import SpinRunSpec


def _diff(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if a == b else [path]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _get(doc: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        doc = doc.get(part) if isinstance(doc, dict) else None
    return doc


def changed_fields(old: SpinRunSpec, new: SpinRunSpec) -> list[str]:
    return _diff(old.model_dump(mode="json"), new.model_dump(mode="json"), "")


def unsafe_changes(old: SpinRunSpec, new: SpinRunSpec, started: int) -> list[str]:
    """One line per change that cannot be applied to a run whose iteration `started` has begun (0: none has)."""
    if started == 0:
        return []
    a, b = old.model_dump(mode="json", by_alias=True), new.model_dump(mode="json", by_alias=True)
    problems = []
    for path in _diff(a, b, ""):
        top = path.split(".")[0]
        if top in ("suspend", "schedule"):
            continue
        if top == "iterations":
            if new.iterations < started:
                problems.append(
                    f"spec.iterations cannot drop below the iteration already started ({started}): "
                    f"{old.iterations} -> {new.iterations}"
                )
            continue
        problems.append(
            f"spec.{path} cannot change after the run started: {_short(_get(a, path))} -> {_short(_get(b, path))}"
        )
    before = {e.iteration: e.model_dump(mode="json") for e in old.schedule}
    after = {e.iteration: e.model_dump(mode="json") for e in new.schedule}
    for t in sorted(set(before) | set(after)):
        if t <= started and before.get(t) != after.get(t):
            problems.append(f"spec.schedule entry of iteration {t} cannot change: iteration {t} has already started")
    return problems

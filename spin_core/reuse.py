"""Which SpinRun fields may change when a run is continued in its existing storage folder.

A storage folder belongs to one run (`run.json`, written by its first `spin run`). Running again continues it, so
the artefacts already published must stay what the spec says they are. Fields that only say where the folder is,
where or how the steps run, how long the run goes on or when it stops may change (`MAY_DIFFER`); so may the
`schedule` entries of iterations that have not started training. Everything else (the name, the model, the data,
every generation and training setting that shapes an artefact, the evaluation) must match. A folder that holds
nothing but the claim accepts any spec: the run is claimed anew (see `spin_core.local.LocalRunner.claim_storage`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

PLACEMENT = ("image", "resources", "nodeSelector", "tolerations")

MAY_DIFFER: tuple[str, ...] = (
    "metadata.namespace",
    "metadata.labels",
    "metadata.annotations",
    "spec.iterations",
    "spec.suspend",
    "spec.storage.uri",  # the folder may be moved or copied: what it holds is the run
    "spec.storage.endpoint",
    "spec.storage.region",
    "spec.storage.credentialsSecret",
    *(f"spec.generation.{k}" for k in PLACEMENT),
    "spec.generation.batchSize",
    "spec.generation.gpusPerShard",
    "spec.generation.backoffLimitPerIndex",
    "spec.generation.opponentLogprobs",
    *(f"spec.training.{k}" for k in PLACEMENT),
    "spec.training.nodes",
    "spec.training.processesPerNode",
    "spec.training.gpusPerNode",
    "spec.training.backoffLimit",
    "spec.training.checkpointEverySteps",
    "spec.training.gradientCheckpointing",
    "spec.training.referenceLogprobs",
    "spec.training.sharedPrompt",
    "spec.training.collapseWarnNats",
    "spec.evaluation.stopWhen",
)
"""Dotted paths (and everything below them) that may differ from the run's `run.json`."""


def _flatten(value: Any, path: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{path}.{key}" if path else str(key), out)
    else:
        out[path] = value
    return out


def _allowed(path: str) -> bool:
    return any(path == p or path.startswith(p + ".") for p in MAY_DIFFER)


def _schedule(document: dict[str, Any]) -> dict[int, dict[str, Any]]:
    entries = document.get("spec", {}).get("schedule") or []
    return {int(e["iteration"]): {k: v for k, v in e.items() if k != "iteration"} for e in entries if "iteration" in e}


def conflicts(old: dict[str, Any], new: dict[str, Any], started: Iterable[int] = ()) -> list[str]:
    """`path: old -> new` for every field that differs and may not; `started`: the iterations whose training has
    begun (a train state or a model is published), whose schedule entries are frozen too."""
    a = _flatten({k: old.get(k) for k in ("metadata", "spec")}, "", {})
    b = _flatten({k: new.get(k) for k in ("metadata", "spec")}, "", {})
    found = []
    for path in sorted(set(a) | set(b)):
        if path == "spec.schedule" or path.startswith("spec.schedule.") or _allowed(path):
            continue
        if a.get(path) != b.get(path):
            found.append(f"{path}: {_show(a.get(path))} -> {_show(b.get(path))}")
    old_schedule, new_schedule = _schedule(old), _schedule(new)
    for t in sorted(set(started)):
        if old_schedule.get(t) != new_schedule.get(t):
            found.append(
                f"spec.schedule (iteration {t}, already training or trained): "
                f"{_show(old_schedule.get(t))} -> {_show(new_schedule.get(t))}"
            )
    return found


def _show(value: Any) -> str:
    return "(unset)" if value is None else repr(value)

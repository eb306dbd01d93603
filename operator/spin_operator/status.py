"""The SpinRun status: conditions, iteration records, and the merge patch that writes them.

The status is the run's durable state: which iterations are generated and trained, retry counters, the
trainer's summaries. A restarted operator reads it back (with the children) and carries on.
"""

from __future__ import annotations

import copy
import math
from datetime import UTC, datetime
from typing import Any

CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "Failed", "SpecAccepted")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def seconds_since(text: str | None) -> float | None:
    when = parse_time(text)
    return None if when is None else (datetime.now(UTC) - when).total_seconds()


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool | str,
    reason: str,
    message: str = "",
    generation: int | None = None,
) -> None:
    """Upsert a condition; lastTransitionTime moves only when the status flips."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    for cond in conditions:
        if cond.get("type") == type_:
            if cond.get("status") != value:
                cond["lastTransitionTime"] = now()
            cond.update(status=value, reason=reason, message=message)
            if generation is not None:
                cond["observedGeneration"] = generation
            return
    cond = {"type": type_, "status": value, "reason": reason, "message": message, "lastTransitionTime": now()}
    if generation is not None:
        cond["observedGeneration"] = generation
    conditions.append(cond)
    conditions.sort(key=lambda c: CONDITION_TYPES.index(c["type"]) if c["type"] in CONDITION_TYPES else 99)


def condition(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def record(status: dict[str, Any], iteration: int) -> dict[str, Any]:
    """The record of one iteration in status.iterations (created in order when missing)."""
    records = status.setdefault("iterations", [])
    for rec in records:
        if rec.get("iteration") == iteration:
            return rec
    rec = {"iteration": iteration, "phase": "Pending", "shards": 0, "shardsDone": 0, "retries": 0}
    records.append(rec)
    records.sort(key=lambda r: r.get("iteration", 0))
    return rec


def find_record(status: dict[str, Any], iteration: int) -> dict[str, Any] | None:
    return next((r for r in status.get("iterations") or [] if r.get("iteration") == iteration), None)


_SCALARS = (str, int, float, bool, type(None))


def clone(value: Any) -> Any:
    """A deep copy of JSON-like data (what the status is): copy.deepcopy's result for it, several times faster
    (no memo, no per-type dispatch). Anything that is not a dict, a list or a JSON scalar goes to copy.deepcopy."""
    if type(value) is dict:
        return {k: clone(v) for k, v in value.items()}
    if type(value) is list:
        return [clone(v) for v in value]
    if isinstance(value, _SCALARS):
        return value
    return copy.deepcopy(value)


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge patch turning `old` into `new` (lists are replaced whole)."""
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif value != before or key not in old:
            patch[key] = clone(value)
    return patch


def drop_non_finite(value: Any) -> None:
    """Remove every NaN and infinity from JSON-like data, in place: the API server rejects a patch holding one (and
    every later patch with it: the status would never be written again). A metric that became NaN disappears from
    the status; the trainer's summary line keeps its text."""
    items = value.items() if type(value) is dict else enumerate(value) if type(value) is list else ()
    bad = [k for k, v in items if type(v) is float and not math.isfinite(v)]
    for k in reversed(bad):
        if type(value) is dict:
            del value[k]
        else:
            value[k] = None
    for v in value.values() if type(value) is dict else value if type(value) is list else ():
        drop_non_finite(v)

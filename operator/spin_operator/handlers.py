"""kopf registrations: indexes of SpinRuns and their children, event handlers that wake the reconciler,
login, start-up/clean-up, and a liveness probe. Importing this module registers them in kopf's default registry.

Children are found by the label selfplay.dev/run; their events wake the owning run directly (no annotation
round-trip through the API server). The indexes are kopf's in-memory view of the watches: kopf fills them
completely before it calls any handler, so a restarted operator sees every existing child before it acts.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from spin_core import spec as s
from spin_operator.children import RUN_LABEL
from spin_operator.controller import Controller
from spin_operator.kube import connection_info

logger = logging.getLogger("spin_operator")

SPINRUNS = (s.GROUP, s.VERSION, s.PLURAL)
JOBS = ("batch", "v1", "jobs")
PYTORCHJOBS = ("kubeflow.org", "v1", "pytorchjobs")
TRAINJOBS = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
PODS = ("", "v1", "pods")
OURS = {RUN_LABEL: kopf.PRESENT}


def controller(memo: Any) -> Controller:
    """The operator-wide controller lives in kopf's root memo (created at start-up unless the caller gave one)."""
    ctrl = getattr(memo, "spin", None)
    if ctrl is None:
        ctrl = memo.spin = Controller()
    return ctrl


def _snapshot(body: kopf.Body) -> dict[str, Any]:
    """The object as the index keeps it: its top-level fields, whose values are the watch event's own freshly
    decoded dicts (every event brings a new object; neither kopf nor the controller writes to them), so no copy."""
    return dict(body)


class _NoEssence(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff base, reduced to nothing. On every watch event kopf builds the object's "essence" (three deep
    copies of the body: 7% of the operator's CPU at 50 concurrent runs, sampled) to diff it for
    on.create/update/resume/delete handlers and daemons; with only event and index handlers (this module) nothing
    reads it, nor is it ever stored. Installed at start-up only while the registry has no such handlers."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()


def _only_events_and_indexes(registry: Any) -> bool:
    """No changing handlers (on.create/update/resume/delete/field) and no daemons or timers (kopf 1.45's
    registry attributes: kopf is pinned)."""
    return not registry._changing.get_all_handlers() and not registry._spawning.get_all_handlers()


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    # Events name the run's transitions and failures (kopf.info/warn/exception); INFO and up are posted.
    settings.posting.level = logging.INFO
    if _only_events_and_indexes(kopf.get_default_registry()):
        settings.persistence.diffbase_storage = _NoEssence()
    await controller(memo).start()


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    await controller(memo).stop()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo:
    return connection_info(**kwargs)


@kopf.on.probe(id="runs")
def runs_probe(memo: Any, **_: Any) -> int:
    return len(controller(memo).states)


@kopf.index(*SPINRUNS)
async def spinrun_index(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace, name): _snapshot(body)}


@kopf.index(*JOBS, labels=OURS)
async def job_index(
    namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace, labels[RUN_LABEL]): _snapshot(body)}


@kopf.index(*PYTORCHJOBS, labels=OURS)
async def pytorchjob_index(
    namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace, labels[RUN_LABEL]): _snapshot(body)}


@kopf.index(*TRAINJOBS, labels=OURS)
async def trainjob_index(
    namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace, labels[RUN_LABEL]): _snapshot(body)}


@kopf.index(*PODS, labels=OURS)
async def pod_index(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict]:
    """The children's pods (their templates carry the run label): what a stuck pod waits for."""
    return {(namespace, labels[RUN_LABEL]): _snapshot(body)}


def _bound(memo: Any, kwargs: dict[str, Any]) -> Controller:
    ctrl = controller(memo)
    ctrl.bind(
        kwargs["spinrun_index"],
        kwargs["job_index"],
        kwargs["pytorchjob_index"],
        kwargs["pod_index"],
        kwargs["trainjob_index"],
    )
    return ctrl


@kopf.on.event(*SPINRUNS)
async def spinrun_event(type: str | None, namespace: str, name: str, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    ctrl = _bound(memo, kwargs)
    if type == "DELETED":
        ctrl.forget((namespace, name))
    else:
        ctrl.spinrun_changed((namespace, name), body)


@kopf.on.event(*JOBS, labels=OURS)
async def job_event(namespace: str, labels: kopf.Labels, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    _bound(memo, kwargs).child_changed((namespace, labels[RUN_LABEL]), body)


@kopf.on.event(*PYTORCHJOBS, labels=OURS)
async def pytorchjob_event(namespace: str, labels: kopf.Labels, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    _bound(memo, kwargs).child_changed((namespace, labels[RUN_LABEL]), body)


@kopf.on.event(*TRAINJOBS, labels=OURS)
async def trainjob_event(namespace: str, labels: kopf.Labels, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    _bound(memo, kwargs).child_changed((namespace, labels[RUN_LABEL]), body)


@kopf.on.event(*PODS, labels=OURS)
async def pod_event(namespace: str, labels: kopf.Labels, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    _bound(memo, kwargs).pod_changed((namespace, labels[RUN_LABEL]), body)

"""kopf registrations: indexes of SpinRuns and their children, event handlers that wake the reconciler,
login, start-up/clean-up, and a liveness probe. Importing this module registers them in kopf's default registry.

Children are found by the label selfplay.dev/run; their events wake the owning run directly (no annotation
round-trip through the API server). The indexes are kopf's in-memory view of the watches: kopf fills them
completely before it calls any handler, so a restarted operator sees every existing child before it acts.
"""

from __future__ import annotations

import copy
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
OURS = {RUN_LABEL: kopf.PRESENT}


def controller(memo: Any) -> Controller:
    """The operator-wide controller lives in kopf's root memo (created at start-up unless the caller gave one)."""
    ctrl = getattr(memo, "spin", None)
    if ctrl is None:
        ctrl = memo.spin = Controller()
    return ctrl


def _snapshot(body: Any) -> dict[str, Any]:
    return copy.deepcopy(dict(body))


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    # Events name the run's transitions and failures (kopf.info/warn/exception); INFO and up are posted.
    settings.posting.level = logging.INFO
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
def spinrun_index(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace, name): _snapshot(body)}


@kopf.index(*JOBS, labels=OURS)
def job_index(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace, labels[RUN_LABEL]): _snapshot(body)}


@kopf.index(*PYTORCHJOBS, labels=OURS)
def pytorchjob_index(
    namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace, labels[RUN_LABEL]): _snapshot(body)}


def _bound(memo: Any, kwargs: dict[str, Any]) -> Controller:
    ctrl = controller(memo)
    ctrl.bind(kwargs["spinrun_index"], kwargs["job_index"], kwargs["pytorchjob_index"])
    return ctrl


@kopf.on.event(*SPINRUNS)
async def spinrun_event(type: str | None, namespace: str, name: str, memo: Any, **kwargs: Any) -> None:
    ctrl = _bound(memo, kwargs)
    if type == "DELETED":
        ctrl.forget((namespace, name))
    else:
        ctrl.wake((namespace, name))


@kopf.on.event(*JOBS, labels=OURS)
async def job_event(namespace: str, labels: kopf.Labels, memo: Any, **kwargs: Any) -> None:
    _bound(memo, kwargs).wake((namespace, labels[RUN_LABEL]))


@kopf.on.event(*PYTORCHJOBS, labels=OURS)
async def pytorchjob_event(namespace: str, labels: kopf.Labels, memo: Any, **kwargs: Any) -> None:
    _bound(memo, kwargs).wake((namespace, labels[RUN_LABEL]))

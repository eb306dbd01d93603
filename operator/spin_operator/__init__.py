"""spin_operator: the kopf controller that turns SpinRuns into generation Jobs and training PyTorchJobs.

    config       the operator's settings (default images and resources, retry policy) from the environment
    kube         a small async client for the operator's own API calls (kopf does the watching)
    children     the objects it creates: spec ConfigMap, Indexed generation Job, training PyTorchJob
    observe      reading children: phases, completed shards, the trainer's termination message
    changes      which spec edits can be applied to a started run
    status       conditions, iteration records, the status merge patch
    controller   the reconciler: plan(spec, progress from children) -> act -> status
    handlers     kopf registrations (indexes, event handlers, login, start-up, probes)
    metrics      Prometheus metrics and their endpoint

`spin operator` (spin_core.cli) calls `run`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence


def default_priority() -> int:
    """The start time in milliseconds with three random digits below it: a replica started a millisecond later
    outranks an older one, and two started in the same millisecond (seen on the test cluster: kopf then pauses both
    for good) still differ, with 999 chances in 1000. Below 2**53, so exact in any JSON reader."""
    return time.time_ns() // 1_000_000 * 1_000 + secrets.randbelow(1_000)


def run(
    namespaces: Sequence[str] = (),
    all_namespaces: bool = False,
    liveness: str | None = "http://0.0.0.0:8080/healthz",
    peering: str | None = None,
    metrics_port: int | None = None,
    verbose: bool = False,
    priority: int | None = None,
) -> None:
    """Run the operator until SIGTERM/SIGINT: standalone unless a kopf peering name is given.

    With peering, the replica with the highest priority serves and the others stand by. kopf pauses *every*
    replica while two share a priority, so each takes a distinct one: by default `default_priority()`, which also
    hands over to the newest pod in a rolling update."""
    import kopf

    from spin_operator import handlers  # noqa: F401  (registers the handlers)
    from spin_operator.controller import Controller

    kopf.configure(verbose=verbose)
    memo = kopf.Memo(spin=Controller(metrics_port=metrics_port))
    kopf.run(
        clusterwide=all_namespaces,
        namespaces=list(namespaces),
        liveness_endpoint=liveness or None,
        standalone=peering is None,
        peering_name=peering,
        priority=(priority if priority is not None else default_priority()) if peering else 0,
        memo=memo,
    )

"""Prometheus metrics of the operator, served by an aiohttp endpoint in the operator's own event loop."""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

logger = logging.getLogger(__name__)

PHASES = ("Pending", "Generating", "Training", "Succeeded", "Failed", "Suspended")

RUNS = Gauge("spin_operator_runs", "SpinRuns this operator serves, by phase.", ["phase"])
RECONCILES = Counter("spin_operator_reconciles_total", "Reconciliations of SpinRuns.")
RECONCILE_ERRORS = Counter(
    "spin_operator_reconcile_errors_total", "Reconciliations that raised (API errors, bugs); retried with back-off."
)
RECONCILE_SECONDS = Histogram(
    "spin_operator_reconcile_duration_seconds",
    "Wall time of one reconciliation.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CHILDREN_CREATED = Counter("spin_operator_children_created_total", "Children created, by step.", ["step"])
CHILD_RETRIES = Counter("spin_operator_child_retries_total", "Failed children recreated, by step.", ["step"])
STEP_SECONDS = Histogram(
    "spin_operator_step_duration_seconds",
    "Duration of finished steps (child creation to success), by step.",
    ["step"],
    buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400),
)
REACTION_SECONDS = Histogram(
    "spin_operator_reaction_seconds",
    "From the watch event that woke a run (its previous step's end) to the next child's creation.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)


def set_phases(phases: Iterable[str | None]) -> None:
    counts = Tally(p or "Pending" for p in phases)
    for phase in PHASES:
        RUNS.labels(phase=phase).set(counts.get(phase, 0))


async def _metrics(_: web.Request) -> web.Response:
    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve(port: int, host: str = "0.0.0.0") -> tuple[web.AppRunner, int]:
    """Start the /metrics endpoint; returns the runner (to stop it) and the port bound (port 0: any free one)."""
    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        bound = server.sockets[0].getsockname()[1]
    logger.info("Serving Prometheus metrics on http://%s:%d/metrics", host, bound)
    return runner, bound

"""Helpers of the operator tests on the test control plane (tests/fixtures/cluster.py): the chart installed with
helm, SpinRuns and their children read through the API, the operator pods' logs, and SpinRuns whose children run
the stub image (tests/cluster/stub/spin).
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.controlplane import free_ports
from tests.e2e import CHART
from tests.fixtures.cluster import STUB_IMAGE, Cluster, spinrun_doc, spinruns_path

RUN_LABEL = "selfplay.dev/run"
CHILD_KINDS = {
    "jobs": "/apis/batch/v1",
    "pytorchjobs": "/apis/kubeflow.org/v1",
    "pods": "/api/v1",
    "configmaps": "/api/v1",
}


def spinrun(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    return cluster.api.find(f"{spinruns_path(namespace)}/{name}")


def status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return (spinrun(cluster, namespace, name) or {}).get("status") or {}


def condition(status_: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status_.get("conditions") or [] if c.get("type") == kind), {})


def children(cluster: Cluster, namespace: str, run: str) -> dict[str, list[dict[str, Any]]]:
    """The run's Jobs, PyTorchJobs, pods and ConfigMap, by the operator's run label (pods carry it through their
    templates), as the API lists them."""
    out = {}
    for plural, base in CHILD_KINDS.items():
        listing = cluster.api.get(f"{base}/namespaces/{namespace}/{plural}", labelSelector=f"{RUN_LABEL}={run}")
        out[plural] = listing["items"]
    return out


def names(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(o["metadata"]["name"] for o in objects)


def uids(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {o["metadata"]["name"]: o["metadata"]["uid"] for o in objects}


@dataclass
class Release:
    """A helm release of charts/spin-operator: its operator pods, their logs (every pod it ever had, from the stand-in
    kubelet's log files) and a description of everything for failure messages."""

    cluster: Cluster
    name: str
    namespace: str
    watched: list[str]

    @property
    def fullname(self) -> str:
        """The chart's name of the Deployment (and the prefix of its pods' names)."""
        return self.name if "spin-operator" in self.name else f"{self.name}-spin-operator"

    @property
    def selector(self) -> str:
        return f"app.kubernetes.io/instance={self.name},app.kubernetes.io/name=spin-operator"

    def pods(self) -> list[dict[str, Any]]:
        return self.cluster.api.get(f"/api/v1/namespaces/{self.namespace}/pods", labelSelector=self.selector)["items"]

    def ready_pods(self) -> list[dict[str, Any]]:
        """Operator pods that run, are Ready and are not being deleted."""
        out = []
        for pod in self.pods():
            conditions = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions") or []}
            if not pod["metadata"].get("deletionTimestamp") and conditions.get("Ready") == "True":
                out.append(pod)
        return out

    def wait_ready(self, count: int = 1, timeout: float = 300, exclude: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """Until `count` operator pods (none of `exclude`) are Ready; returns them."""

        def ready() -> list[dict[str, Any]] | None:
            pods = [p for p in self.ready_pods() if p["metadata"]["name"] not in exclude]
            return pods if len(pods) >= count else None

        return self.cluster.api.wait_for(
            f"{count} Ready operator pod(s) of release {self.name}", ready, timeout=timeout, describe=self.describe
        )

    def log(self, pod: str | None = None) -> str:
        """The operator container's log: of one pod, or of every pod the release had, oldest first."""
        logs = self.cluster.kubelet_root / "logs"
        pattern = f"{self.namespace}_{pod or f'{self.fullname}-*'}_operator.log"
        files = sorted(logs.glob(pattern), key=lambda p: p.stat().st_mtime)
        return "".join(f"----- {p.name}\n{p.read_text(errors='replace')}" for p in files)

    def describe(self) -> str:
        parts = [self.cluster.describe(ns) for ns in dict.fromkeys([self.namespace, *self.watched])]
        return "\n".join(parts) + "\n----- operator log (tail)\n" + self.log()[-6000:]


def install(
    cluster: Cluster, name: str, namespace: str, watched: list[str], values: dict[str, Any] | None = None
) -> Release:
    """helm install charts/spin-operator as `name` into `namespace` (which must exist), serving `watched`, with quick
    retries, verbose logs and a free health port (the chart's default would do: each pod listens on its own address;
    a free one keeps clear of anything else on this machine). Waits for nothing."""
    (port,) = free_ports(1)
    base: dict[str, Any] = {
        "watchNamespaces": watched,
        "healthPort": port,
        "extraArgs": ["--verbose"],
        "extraEnv": [{"name": "SPIN_RETRY_BACKOFF_SECONDS", "value": "5"}],
    }
    merged = {**base, **(values or {})}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(merged, f)
    try:
        cluster.helm("install", name, str(CHART), "--namespace", namespace, "-f", f.name)
    finally:
        os.unlink(f.name)
    return Release(cluster, name, namespace, watched)


@contextmanager
def installed(
    cluster: Cluster, name: str, namespace: str, watched: list[str], values: dict[str, Any] | None = None
) -> Iterator[Release]:
    """`install`, uninstalled afterwards (the namespaces are the caller's)."""
    release = install(cluster, name, namespace, watched, values)
    try:
        yield release
    finally:
        cluster.helm("uninstall", name, "--namespace", namespace, "--wait", "--timeout", "2m", check=False)


def open_gate(gates: Path, step: str, iteration: int) -> None:
    (gates / f"{step}-{iteration}").touch()


def stub_spinrun(
    name: str,
    namespace: str,
    gates: Path | None = None,
    generate: str = "ok",
    train: str = "ok",
    evaluate: str | None = None,
    iterations: int = 1,
    shards: int = 1,
    **spec_changes: Any,
) -> dict[str, Any]:
    """A SpinRun whose children run the stub image (tests/cluster/stub/spin), each step as told: `ok`, `wait` (for
    the gate file `<gates>/<step>-<t>`; `gates` a folder the pods can read, e.g. the `marker_dir` fixture's) or
    `exit:N`; an evaluation step when `evaluate` is given. The URIs are never read (the stub reads nothing).
    `spec_changes` update the spec's sections."""
    env = [{"name": f"SPIN_STUB_{step.upper()}", "value": mode} for step, mode in
           (("generate", generate), ("train", train), ("evaluate", evaluate)) if mode]  # fmt: skip
    if gates is not None:
        env.append({"name": "SPIN_STUB_GATES", "value": str(gates)})
    small = {"requests": {"cpu": "10m", "memory": "32Mi"}}
    body = spinrun_doc(name, namespace, storage={"uri": f"s3://stub/runs/{namespace}/{name}"}, iterations=iterations,
                       pods={"env": env})  # fmt: skip
    body["spec"]["generation"].update(image=STUB_IMAGE, shards=shards, resources=small)
    body["spec"]["training"].update(image=STUB_IMAGE, resources=small)
    if evaluate:
        body["spec"]["evaluation"] = {
            "dataset": {"uri": "s3://stub/heldout.jsonl"},
            "scorer": "spin_core.demo:score",
            "backend": "hf",
        }
    for section, change in spec_changes.items():
        if isinstance(body["spec"].get(section), dict) and isinstance(change, dict):
            body["spec"][section].update(change)
        else:
            body["spec"][section] = change
    return body


def create(cluster: Cluster, body: dict[str, Any]) -> dict[str, Any]:
    return cluster.api.create(spinruns_path(body["metadata"]["namespace"]), body)


def wait_status(
    cluster: Cluster,
    namespace: str,
    name: str,
    what: str,
    probe: Callable[[dict[str, Any]], Any],
    describe: Callable[[], str],
    timeout: float = 300,
) -> Any:
    """Until probe(status) is truthy (its value is returned); on timeout the failure shows the status and
    `describe()`."""
    return cluster.api.wait_for(
        f"SpinRun {namespace}/{name}: {what}",
        lambda: probe(status(cluster, namespace, name)),
        timeout=timeout,
        interval=0.5,
        describe=lambda: f"status: {status(cluster, namespace, name)}\n{describe()}",
    )


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


class Stopwatch:
    """Wall times of a test's stages, printed with -s and kept for the report."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()
        self.marks: list[tuple[str, float]] = []

    def mark(self, what: str) -> float:
        now = time.monotonic()
        self.marks.append((what, now - self.last))
        print(f"[{now - self.start:7.1f} s] {what} (+{now - self.last:.1f} s)", flush=True)
        self.last = now
        return now - self.start

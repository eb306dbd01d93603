"""The operator on the test control plane (issue 14): HA, restarts, garbage collection, 50 runs, bad children.

The operator runs in every test as the chart's pod (`helm install`, namespaced mode, its ServiceAccount's token, RBAC
enforced): a release per module serving one namespace per test, and its own release for the HA test.
Real: etcd, kube-apiserver, kube-controller-manager (Deployment, ReplicaSet, Job controllers and the garbage
collector), kube-scheduler, the Kubeflow Training Operator v1.9.4 and its webhook, helm, kopf's peering through
KopfPeering objects, and the operator's code. Stand-in: the kubelet (tests/cluster/kubelet.py), which runs each
container as a local process; most children run the stub image (tests/cluster/stub/: a `spin <step>` that does no
work and succeeds, waits for the test's gate file, or exits with a given code, under a `torchrun` that starts it once
as rank 0), so a test decides when each step ends; the exit-code-2 test runs the real `spin generate` of the
generator image.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests import control_plane as cp
from tests.fixtures.cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SCENARIOS = ("restart", "gc", "many", "bad")
RUNS_AT_ONCE = 50
PAUSING = "Pausing operations in favour of"
PAUSED = re.compile(rf"{PAUSING}|Pausing all operators")
RESUMED = "Resuming operations after the pause"
HANDLED = "Handler 'spinrun_event' succeeded"
# 409/422 answers as the operator's client, kopf's client and the operator's adoption path log them
API_ERRORS = re.compile(
    r"HTTP (409|422)\b|status=(409|422)\b|'code': (409|422)\b|APIConflictError|Unprocessable|Patching failed"
    r"|adopted existing"
)


@pytest.fixture(scope="module")
def release(cluster: Cluster) -> Iterator[cp.Release]:
    """The chart installed once for the module: the operator in its own namespace, serving one namespace per test."""
    suffix = uuid.uuid4().hex[:6]
    home = f"op-{suffix}"
    watched = [f"{s}-{suffix}" for s in SCENARIOS]
    for ns in (home, *watched):
        cluster.api.create("/api/v1/namespaces", {"metadata": {"name": ns}})
    try:
        with cp.installed(cluster, f"scen-{suffix}", home, watched) as rel:
            rel.wait_ready()
            yield rel
    finally:
        for ns in (home, *watched):
            cluster.api.delete(f"/api/v1/namespaces/{ns}")


def scenario_namespace(release: cp.Release, scenario: str) -> str:
    return release.watched[SCENARIOS.index(scenario)]


def wait_phase(cluster: Cluster, release: cp.Release, ns: str, name: str, phase: str, timeout: float = 300) -> None:
    cp.wait_status(cluster, ns, name, f"phase {phase}", lambda s: s.get("phase") == phase, release.describe, timeout)


def stub_started(cluster: Cluster, ns: str, pod: str, container: str, step: str) -> bool:
    return f"spin-stub: {step} iteration" in cluster.container_log(ns, pod, container)


def pods_of(cluster: Cluster, ns: str, run: str, step: str) -> list[dict[str, Any]]:
    return [p for p in cp.children(cluster, ns, run)["pods"] if p["metadata"]["labels"]["selfplay.dev/step"] == step]


# -- (a) HA --------------------------------------------------------------------------------------------------------
def peering_records(cluster: Cluster, ns: str, name: str) -> dict[str, dict[str, Any]]:
    peering = cluster.api.find(f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings/{name}") or {}
    return {k: v for k, v in (peering.get("status") or {}).items() if isinstance(v, dict) and "priority" in v}


def paused_streams(log: str) -> bool:
    """Whether the operator decided to pause for a peer and then paused its SpinRun watch stream."""
    _, decided, after = log.rpartition(PAUSING)
    return bool(decided) and "Pausing the watch-stream for spinruns" in after


def test_ha_one_replica_serves_and_the_other_takes_over(
    cluster: Cluster, cluster_namespace: str, marker_dir: Path
) -> None:
    """Operator: the chart's pods. ha.enabled, replicas 2 (its own release): both pods join the KopfPeering with
    distinct priorities, the older one logs that it pauses and exactly the newer one handles a SpinRun; deleting the
    serving pod makes the standby resume, and the run proceeds to Succeeded with each child created once."""
    ns, api = cluster_namespace, cluster.api
    watch = cp.Stopwatch()
    crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/kopfpeerings.kopf.dev"
    values = {"replicas": 2, "ha": {"enabled": True, "createPeeringCRDs": api.find(crds) is None}}
    with cp.installed(cluster, ns, ns, [ns], values) as rel:
        pods = {p["metadata"]["name"] for p in rel.wait_ready(2)}
        watch.mark("2 operator pods Ready")
        records = api.wait_for(
            "both pods' records in the KopfPeering",
            lambda: (r := peering_records(cluster, ns, rel.fullname)) and set(r) == pods and r,
            timeout=120,
            describe=rel.describe,
        )
        priorities = {pod: record["priority"] for pod, record in records.items()}
        assert len(set(priorities.values())) == 2, f"equal peering priorities pause every replica: {priorities}"
        serving, standby = sorted(pods, key=lambda p: priorities[p], reverse=True)
        # kopf pauses a watch stream when it (re)starts: a LIST still in flight when the standby decides to pause (a
        # retry of the first one, e.g. a 429 while the apiserver's cache of the new CRD initializes) is handled
        # first. So the standby counts as paused once its SpinRun stream is.
        api.wait_for(
            f"the standby {standby} to pause",
            lambda: paused_streams(rel.log(standby)),
            timeout=120,
            describe=rel.describe,
        )
        # (kopf's own start-up pause, "Pausing the watch-stream", ends once the peers are known: not a pause)
        assert not PAUSED.search(rel.log(serving)), rel.log(serving)[-4000:]
        watch.mark(f"{standby} paused, {serving} serves")

        gates = marker_dir
        run = "ha"
        cp.create(cluster, cp.stub_spinrun(run, ns, gates, generate="wait"))
        api.wait_for(
            "the generation pod to start",
            lambda: stub_started(cluster, ns, f"{run}-i1-gen-0-{pod_suffix(cluster, ns, run)}", "generate", "generate"),
            timeout=180,
            describe=rel.describe,
        )
        # kopf logs each handler call (no object named: the run is the namespace's only object of its kind)
        assert HANDLED in rel.log(serving) and HANDLED not in rel.log(standby), rel.log(standby)[-4000:]
        watch.mark("the serving replica created the generation Job")

        resumed = rel.log(standby).count(RESUMED)
        api.delete(f"/api/v1/namespaces/{ns}/pods/{serving}")  # graceful: kopf leaves the peering on SIGTERM
        api.wait_for(
            f"the standby {standby} to resume",
            lambda: rel.log(standby).count(RESUMED) > resumed,
            timeout=180,
            describe=rel.describe,
        )
        watch.mark("the standby resumed")
        cp.open_gate(gates, "generate", 1)
        wait_phase(cluster, rel, ns, run, "Succeeded")
        watch.mark("the run Succeeded")
        kids = cp.children(cluster, ns, run)
        assert cp.names(kids["jobs"]) == [f"{run}-i1-gen"] and cp.names(kids["pytorchjobs"]) == [f"{run}-i1-train"]
        # The ReplicaSet's replacement pod is the newest: it serves from now on, and the old standby pauses again.
        live = {p["metadata"]["name"] for p in rel.wait_ready(2, exclude=(serving,))}
        records = api.wait_for(
            "the peering to list the live pods",
            lambda: (r := peering_records(cluster, ns, rel.fullname)) and set(r) == live and r,
            timeout=120,
            describe=rel.describe,
        )
        assert len({r["priority"] for r in records.values()}) == 2, records


def pod_suffix(cluster: Cluster, ns: str, run: str) -> str:
    """The random suffix of the generation Job's (only) pod: <job>-<index>-<suffix>."""
    pods = pods_of(cluster, ns, run, "generate")
    return pods[0]["metadata"]["name"].rsplit("-", 1)[1] if pods else "(none yet)"


# -- (b) restarts --------------------------------------------------------------------------------------------------
def test_a_restarted_operator_adopts_the_children_of_every_phase(
    cluster: Cluster, release: cp.Release, marker_dir: Path
) -> None:
    """Operator: the chart's pod. At Generating, Training and Evaluating, while the phase's child runs (the stub waits
    for its gate), the operator pod is killed (deleted with grace 0; the ReplicaSet starts another): the new operator
    carries on with the same child (same uid, same pods), creates each next child exactly once, and the run Succeeds
    without a retry."""
    ns, api = scenario_namespace(release, "restart"), cluster.api
    watch = cp.Stopwatch()
    gates, run = marker_dir, "restart"
    cp.create(cluster, cp.stub_spinrun(run, ns, gates, generate="wait", train="wait", evaluate="wait"))
    first_seen: dict[str, str] = {}
    steps = (
        ("generate", "Generating", "jobs", f"{run}-i1-gen", "generate"),
        ("train", "Training", "pytorchjobs", f"{run}-i1-train", "pytorch"),
        ("evaluate", "Evaluating", "jobs", f"{run}-i1-eval", "evaluate"),
    )
    for step, phase, plural, child, container in steps:
        wait_phase(cluster, release, ns, run, phase)

        def running(step: str = step, container: str = container) -> list[dict[str, Any]] | None:
            pods = pods_of(cluster, ns, run, step)
            started = [p for p in pods if stub_started(cluster, ns, p["metadata"]["name"], container, step)]
            return started or None

        (pod,) = api.wait_for(f"the {step} pod to run", running, timeout=180, describe=release.describe)
        kids = cp.children(cluster, ns, run)
        assert child in cp.uids(kids[plural]), (child, cp.names(kids[plural]))
        before = {**cp.uids(kids["jobs"]), **cp.uids(kids["pytorchjobs"]), **cp.uids(kids["configmaps"])}
        first_seen.update({k: v for k, v in before.items() if k not in first_seen})
        old = tuple(p["metadata"]["name"] for p in release.pods())
        for name in old:
            api.delete(f"/api/v1/namespaces/{release.namespace}/pods/{name}", {"gracePeriodSeconds": 0})
        (new,) = release.wait_ready(1, exclude=old)
        # The new operator has seen the run once it logs a SpinRun handler call (the only run of the release).
        api.wait_for(
            f"the new operator {new['metadata']['name']} to handle the run",
            lambda n=new["metadata"]["name"]: HANDLED in release.log(n),
            timeout=180,
            describe=release.describe,
        )
        watch.mark(f"{phase}: operator restarted while {child} ran")
        assert pods_of(cluster, ns, run, step)[0]["metadata"]["uid"] == pod["metadata"]["uid"]
        cp.open_gate(gates, step, 1)
    wait_phase(cluster, release, ns, run, "Succeeded")
    watch.mark("Succeeded")

    kids = cp.children(cluster, ns, run)
    assert cp.names(kids["jobs"]) == [f"{run}-i1-eval", f"{run}-i1-gen"]
    assert cp.names(kids["pytorchjobs"]) == [f"{run}-i1-train"]
    assert cp.names(kids["configmaps"]) == [f"{run}-spec"]
    now = {**cp.uids(kids["jobs"]), **cp.uids(kids["pytorchjobs"]), **cp.uids(kids["configmaps"])}
    assert now == first_seen, f"children were recreated: before {first_seen}, after {now}"
    steps_of_pods = sorted(p["metadata"]["labels"]["selfplay.dev/step"] for p in kids["pods"])
    assert steps_of_pods == ["evaluate", "generate", "train"], cp.names(kids["pods"])
    status = cp.status(cluster, ns, run)
    (record,) = status["iterations"]
    assert not record.get("retries") and record["metrics"] == {"loss": 0.6931, "rewards/accuracy": 0.5}, record
    assert record["evaluation"] == {"score": 0.5, "rewards/margins": 0.0}, record
    operator_logs = (cluster.kubelet_root / "logs").glob(f"{release.namespace}_{release.fullname}-*_operator.log")
    assert len(list(operator_logs)) >= 4, "three restarts make four operator pods"


# -- (c) garbage collection ----------------------------------------------------------------------------------------
def test_deleting_a_spinrun_collects_its_children(cluster: Cluster, release: cp.Release, marker_dir: Path) -> None:
    """Operator: the chart's pod. A run in Training (its generation Job complete, its PyTorchJob's Master pod running):
    deleting the SpinRun makes the garbage collector delete its ConfigMap, Jobs, PyTorchJob, their pods and the Training
    Operator's Service (owner references all the way down); the SpinRun itself is gone too (no finalizer holds it)."""
    ns, api = scenario_namespace(release, "gc"), cluster.api
    gates, run = marker_dir, "gc"
    cp.create(cluster, cp.stub_spinrun(run, ns, gates, train="wait"))
    wait_phase(cluster, release, ns, run, "Training")
    api.wait_for(
        "the Master pod to run",
        lambda: stub_started(cluster, ns, f"{run}-i1-train-master-0", "pytorch", "train"),
        timeout=180,
        describe=release.describe,
    )
    kids = cp.children(cluster, ns, run)
    assert cp.names(kids["configmaps"]) == [f"{run}-spec"] and cp.names(kids["jobs"]) == [f"{run}-i1-gen"]
    assert cp.names(kids["pytorchjobs"]) == [f"{run}-i1-train"] and len(kids["pods"]) == 2, cp.names(kids["pods"])
    services = f"/api/v1/namespaces/{ns}/services"
    selector = f"training.kubeflow.org/job-name={run}-i1-train"
    assert api.get(services, labelSelector=selector)["items"], "the Training Operator made no Service"

    api.delete(f"{cp.spinruns_path(ns)}/{run}")

    def collected() -> bool:
        left = cp.children(cluster, ns, run)
        return (
            cp.spinrun(cluster, ns, run) is None
            and not any(left.values())
            and not api.get(services, labelSelector=selector)["items"]
        )

    api.wait_for(
        "the garbage collector to delete the run's children",
        collected,
        timeout=180,
        describe=lambda: (
            f"left: { {k: cp.names(v) for k, v in cp.children(cluster, ns, run).items()} }\n" + release.describe()
        ),
    )


# -- (d) 50 runs at once -------------------------------------------------------------------------------------------
def test_fifty_spinruns_at_once(cluster: Cluster, release: cp.Release, marker_dir: Path) -> None:
    """Operator: the chart's pod. 50 SpinRuns created at once (their generation pods run the stub, waiting): each gets
    exactly one ConfigMap and one generation Job, no other child; once the pods run, every status is consistent
    (Generating 1/1, the Job's name, SpecAccepted, Progressing, not Degraded, not Failed), and the operator's log has no
    409/422 answers."""
    ns, api = scenario_namespace(release, "many"), cluster.api
    watch = cp.Stopwatch()
    gates = marker_dir
    logged_before = {p["metadata"]["name"]: len(release.log(p["metadata"]["name"])) for p in release.pods()}
    runs = [f"many-{i:02d}" for i in range(RUNS_AT_ONCE)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda r: cp.create(cluster, cp.stub_spinrun(r, ns, gates, generate="wait")), runs))
    watch.mark(f"{RUNS_AT_ONCE} SpinRuns created")

    def statuses() -> dict[str, dict[str, Any]]:
        items = api.get(cp.spinruns_path(ns))["items"]
        return {o["metadata"]["name"]: o.get("status") or {} for o in items}

    def first_children() -> bool:
        jobs = {j["metadata"]["name"] for j in api.get(f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]}
        found = statuses()
        return all(
            found.get(r, {}).get("phase") == "Generating" and f"{r}-i1-gen" in jobs
            for r in runs
        )  # fmt: skip

    api.wait_for(f"{RUNS_AT_ONCE} runs to reach their generation Job", first_children, timeout=600,
                 interval=2, describe=release.describe)  # fmt: skip
    watch.mark("every run has its generation Job")

    def all_running() -> bool:
        pods = api.get(f"/api/v1/namespaces/{ns}/pods")["items"]
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        return len(running) == RUNS_AT_ONCE and all(
            cp.condition(s, "Degraded").get("status") == "False" for s in statuses().values()
        )

    api.wait_for("every generation pod to run and no run Degraded", all_running, timeout=600, interval=2,
                 describe=release.describe)  # fmt: skip
    watch.mark("every pod Running, no run Degraded")

    jobs = cp.names(api.get(f"/apis/batch/v1/namespaces/{ns}/jobs")["items"])
    assert jobs == sorted(f"{r}-i1-gen" for r in runs)
    assert api.get(f"/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs")["items"] == []
    configmaps = api.get(f"/api/v1/namespaces/{ns}/configmaps", labelSelector=cp.RUN_LABEL)["items"]
    assert cp.names(configmaps) == sorted(f"{r}-spec" for r in runs)
    for run, status in sorted(statuses().items()):
        (record,) = status["iterations"]
        assert status["phase"] == "Generating" and status["progress"] == "1/1", (run, status)
        assert record["generationJob"] == f"{run}-i1-gen" and not record.get("retries"), (run, record)
        assert f"Job {run}-i1-gen" in status["message"], (run, status["message"])
        expected = {"SpecAccepted": "True", "Progressing": "True", "Ready": "False", "Failed": "False",
                    "Degraded": "False"}  # fmt: skip
        assert {k: cp.condition(status, k).get("status") for k in expected} == expected, (run, status)
    log = "".join(
        release.log(pod["metadata"]["name"])[logged_before.get(pod["metadata"]["name"], 0) :] for pod in release.pods()
    )
    errors = [line for line in log.splitlines() if API_ERRORS.search(line)]
    assert not errors, f"{len(errors)} 409/422 answers in the operator's log:\n" + "\n".join(errors[:20])


# -- (e) bad children ----------------------------------------------------------------------------------------------
def test_a_stuck_or_bad_child_shows_in_the_spinrun_within_seconds(cluster: Cluster, release: cp.Release) -> None:
    """Operator: the chart's pod. Three runs at once, each with one bad generation pod: an image no node can pull
    (Degraded, reason ImagePullBackOff, the kubelet's message), a nodeSelector no node matches (Degraded, Unschedulable,
    the scheduler's message), and the real `spin generate` on a model that does not exist (exit code 2: the run Failed
    with reason InvalidInput at once, no retry Job). Prints the seconds from the SpinRun's creation to each."""
    ns = scenario_namespace(release, "bad")
    pull = cp.stub_spinrun("pull", ns, generation={"image": "ghcr.io/spin-selfplay/spin-generatr:0.1.0"})
    unschedulable = cp.stub_spinrun("nowhere", ns, generation={"nodeSelector": {"spin-test/pool": "nowhere"}})
    bad_input = cp.stub_spinrun(
        "input", ns, model={"uri": "file:///nonexistent/spin-sft-model"}, storage={"uri": f"file:///tmp/{ns}-input"}
    )
    del bad_input["spec"]["generation"]["image"]  # the chart's generator image: the real `spin generate`
    created = {}
    for body in (pull, unschedulable, bad_input):
        cp.create(cluster, body)
        created[body["metadata"]["name"]] = time.monotonic()

    def degraded(reason: str) -> Any:
        return lambda s: (c := cp.condition(s, "Degraded")).get("reason") == reason and c.get("status") == "True" and c

    cond = cp.wait_status(cluster, ns, "pull", "Degraded ImagePullBackOff", degraded("ImagePullBackOff"),
                          release.describe, timeout=180)  # fmt: skip
    print(f"ImagePullBackOff after {time.monotonic() - created['pull']:.1f} s: {cond['message']}")
    assert cond["message"].startswith("pod pull-i1-gen-0-") and "container generate" in cond["message"], cond
    assert 'Back-off pulling image "ghcr.io/spin-selfplay/spin-generatr:0.1.0"' in cond["message"], cond
    assert cp.status(cluster, ns, "pull")["phase"] == "Generating"

    cond = cp.wait_status(cluster, ns, "nowhere", "Degraded Unschedulable", degraded("Unschedulable"),
                          release.describe, timeout=180)  # fmt: skip
    print(f"Unschedulable after {time.monotonic() - created['nowhere']:.1f} s: {cond['message']}")
    assert (
        "cannot be scheduled" in cond["message"]
        and "node(s) didn't match Pod's node affinity/selector" in (cond["message"])
    ), cond

    status = cp.wait_status(cluster, ns, "input", "phase Failed", lambda s: s.get("phase") == "Failed" and s,
                            release.describe, timeout=300)  # fmt: skip
    print(f"InvalidInput after {time.monotonic() - created['input']:.1f} s: {status['message']}")
    failed = cp.condition(status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "InvalidInput", failed
    assert "spec.model.uri: file:///nonexistent/spin-sft-model does not exist" in status["message"], status
    (record,) = status["iterations"]
    assert not record.get("retries") and not record.get("generateRetries"), record
    (pod,) = pods_of(cluster, ns, "input", "generate")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 2
    assert cp.names(cp.children(cluster, ns, "input")["jobs"]) == ["input-i1-gen"]

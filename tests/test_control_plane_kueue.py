"""The operator under Kueue itself (issue 17, item 1): queued children are admitted, held, suspended and resumed by
the real Kueue, and the operator never fights it.

Real: etcd, kube-apiserver v1.37.2, kube-controller-manager (the Job controller, the garbage collector),
kube-scheduler, the Kubeflow Training Operator v1.9.4, **Kueue v0.17.0's controller-manager** (its webhooks, its
Workload, queue and scheduler controllers, its batch/job and kubeflow.org/pytorchjob integrations; installed from its
module's manifests with its upstream ClusterRole: tests/cluster/kueue_manager.py), kopf and spin_operator (in this
process, as the chart's ServiceAccount, bound by the chart's RBAC). Stand-ins: the kubelet (tests/cluster/kubelet.py);
and the children's work: their pods use an image that no registry serves (`registry.invalid/...`), so a pod stays in
ErrImagePull and its Job stays active, holding its quota, for as long as a test needs. What Kueue sees and decides
(the child's labels, pod sets and requests, its Workload, the quota, admission, eviction) is what the operator built.

Every test records each change of its children's `suspend` with the field manager that wrote it (a watch, from
managedFields): a fight between the operator and Kueue shows as more changes than the story allows.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import yaml
from spin_operator import children
from spin_operator.config import Config

from spin_core.resource import parse
from tests.cluster.api import Api, ApiError
from tests.cluster.kueue_manager import KueueManager, kueue_path
from tests.fixtures.cluster import ROOT, Cluster, spinrun_doc, spinruns_path

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

OPERATOR = "spin-operator"  # the field manager of the operator's writes (its user agent)
KUEUE = "kueue"  # Kueue's
TESTS = "spin-tests"  # this test's own writes (tests/cluster/api.py)
HELD_IMAGE = "registry.invalid/held:1"
FLAVOR = "spin-tests"
PRIORITY_CLASS, PRIORITY = "spin-tests-high", 1000
TIMEOUT = 120.0  # for anything that takes a few controller passes on a loaded machine
QUIET = 6.0  # how long "nothing changes" is watched for


# -- objects ----------------------------------------------------------------------------------------------------------
def jobs(namespace: str) -> str:
    return f"/apis/batch/v1/namespaces/{namespace}/jobs"


def pytorchjobs(namespace: str) -> str:
    return f"/apis/kubeflow.org/v1/namespaces/{namespace}/pytorchjobs"


def queued_run(name: str, namespace: str, queue: str, cpu: str = "1", **spec: Any) -> dict[str, Any]:
    """A small SpinRun on `queue` whose pods ask for `cpu` (and 1Gi) and never start (see the docstring)."""
    doc = spinrun_doc(name, namespace, queueName=queue, **spec)
    held = {"image": HELD_IMAGE, "resources": {"requests": {"cpu": cpu, "memory": "1Gi"}}}
    doc["spec"]["generation"] |= held
    doc["spec"]["training"] |= held
    return doc


def status_of(api: Api, namespace: str, name: str) -> dict[str, Any]:
    return api.get(f"{spinruns_path(namespace)}/{name}").get("status") or {}


def waiting(api: Api, namespace: str, name: str) -> bool:
    return "waiting for admission" in status_of(api, namespace, name).get("message", "")


def generating(api: Api, namespace: str, name: str) -> bool:
    status = status_of(api, namespace, name)
    return status.get("phase") == "Generating" and "waiting for admission" not in status.get("message", "")


def workload_of(api: Api, namespace: str, child: dict[str, Any]) -> dict[str, Any] | None:
    """The Workload Kueue made for a child (labelled with the child's uid)."""
    uid = child["metadata"]["uid"]
    items = api.get(kueue_path("workloads", namespace=namespace), labelSelector=f"kueue.x-k8s.io/job-uid={uid}")
    return items["items"][0] if items["items"] else None


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def admitted(workload: dict[str, Any] | None) -> bool:
    return condition(workload, "Admitted").get("status") == "True"


# -- who wrote `suspend` ----------------------------------------------------------------------------------------------
@dataclass
class SuspendHistory:
    """Every change of the `suspend` field of a namespace's Jobs or PyTorchJobs, in order, as (value, field manager
    owning the field after the change), read from a watch."""

    api: Api
    path: str
    field_path: tuple[str, ...]
    changes: dict[str, list[tuple[bool, str]]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        listing = self.api.get(self.path)
        for obj in listing["items"]:
            self._record(obj)
        self._version = listing["metadata"]["resourceVersion"]
        self._thread = threading.Thread(target=self._watch, name=f"watch {self.path}", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        api = self.api
        while not self._stop.is_set():
            params = {"watch": "1", "resourceVersion": self._version, "timeoutSeconds": "30"}
            try:
                with api.session.get(
                    api.credentials.server + self.path, params=params, stream=True, timeout=(10, 60)
                ) as response:
                    for line in response.iter_lines():
                        if self._stop.is_set():
                            return
                        if line:
                            event = json.loads(line)
                            obj = event["object"]
                            self._version = obj["metadata"].get("resourceVersion", self._version)
                            if event["type"] in ("ADDED", "MODIFIED"):
                                self._record(obj)
            except requests.RequestException:
                self._stop.wait(0.5)

    def _record(self, obj: dict[str, Any]) -> None:
        value: Any = obj["spec"]
        for key in self.field_path:
            value = (value or {}).get(key)
        seen = self.changes.setdefault(obj["metadata"]["name"], [])
        if not seen or seen[-1][0] != bool(value):
            seen.append((bool(value), self._writer(obj)))

    def _writer(self, obj: dict[str, Any]) -> str:
        for entry in obj["metadata"].get("managedFields") or []:
            node: Any = entry.get("fieldsV1") or {}
            for key in ("spec", *self.field_path):
                node = node.get(f"f:{key}") if isinstance(node, dict) else None
            if node is not None:
                return str(entry.get("manager"))
        return "?"

    def of(self, name: str) -> list[tuple[bool, str]]:
        return list(self.changes.get(name, []))

    def stop(self) -> None:
        self._stop.set()


@pytest.fixture()
def job_history(cluster: Cluster, cluster_namespace: str) -> Iterator[SuspendHistory]:
    history = SuspendHistory(cluster.api, jobs(cluster_namespace), ("suspend",))
    yield history
    history.stop()


# -- queues -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kueue_classes(cluster: Cluster, kueue: KueueManager) -> Iterator[None]:
    """The ResourceFlavor every test's ClusterQueue uses, and a WorkloadPriorityClass."""
    api = cluster.api
    flavor = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}}
    priority = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass",
                "metadata": {"name": PRIORITY_CLASS}, "value": PRIORITY, "description": "spin tests"}  # fmt: skip
    api.create(kueue_path("resourceflavors"), flavor)
    api.create(kueue_path("workloadpriorityclasses"), priority)
    yield
    api.delete(kueue_path("workloadpriorityclasses", PRIORITY_CLASS))
    api.delete(kueue_path("resourceflavors", FLAVOR))


@dataclass
class Queue:
    api: Api
    namespace: str
    cluster_queue: str
    local_queue: str = "team-a"

    def hold(self, on: bool) -> None:
        """ClusterQueue stopPolicy Hold: Kueue admits nothing new from it (None: admission goes on)."""
        self.api.patch(
            kueue_path("clusterqueues", self.cluster_queue), {"spec": {"stopPolicy": "Hold" if on else "None"}}
        )

    def usage(self) -> dict[str, str]:
        cq = self.api.get(kueue_path("clusterqueues", self.cluster_queue))
        return {r["name"]: r["total"] for f in cq.get("status", {}).get("flavorsUsage", []) for r in f["resources"]}

    def active(self) -> bool:
        cq = self.api.get(kueue_path("clusterqueues", self.cluster_queue))
        lq = self.api.get(kueue_path("localqueues", self.local_queue, self.namespace))
        return condition(cq, "Active").get("status") == "True" and condition(lq, "Active").get("status") == "True"


@pytest.fixture()
def make_queue(
    cluster: Cluster, kueue: KueueManager, kueue_classes: None, cluster_namespace: str
) -> Iterator[Callable[..., Queue]]:
    """A ClusterQueue of the test's own (cpu/memory quota on the shared flavor; optionally on Hold, or preempting
    lower priorities) and a LocalQueue `team-a` in the test's namespace pointing at it."""
    made: list[Queue] = []

    def make(cpu: str, memory: str = "8Gi", hold: bool = False, preempt: bool = False) -> Queue:
        queue = Queue(cluster.api, cluster_namespace, f"cq-{cluster_namespace}")
        cq = {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": queue.cluster_queue},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": cluster_namespace}},
                "resourceGroups": [{"coveredResources": ["cpu", "memory"], "flavors": [{"name": FLAVOR, "resources": [
                    {"name": "cpu", "nominalQuota": cpu}, {"name": "memory", "nominalQuota": memory}]}]}],
                **({"stopPolicy": "Hold"} if hold else {}),
                **({"preemption": {"withinClusterQueue": "LowerPriority"}} if preempt else {}),
            },
        }  # fmt: skip
        lq = {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": queue.local_queue, "namespace": cluster_namespace},
            "spec": {"clusterQueue": queue.cluster_queue},
        }
        cluster.api.create(kueue_path("clusterqueues"), cq)
        cluster.api.create(kueue_path("localqueues", namespace=cluster_namespace), lq)
        made.append(queue)
        if not hold:
            cluster.api.wait_for("the queues to be Active", queue.active, TIMEOUT, describe=kueue.log_tail)
        return queue

    yield make
    for queue in made:  # Kueue lets it go once its Workloads are gone with the namespace
        cluster.api.delete(kueue_path("clusterqueues", queue.cluster_queue))


def describe(cluster: Cluster, namespace: str) -> Callable[[], str]:
    """For failure messages: the runs' status, the Workloads, the children's pods and events."""

    def text() -> str:
        lines = []
        for run in cluster.api.get(spinruns_path(namespace))["items"]:
            st = run.get("status") or {}
            lines.append(f"SpinRun {run['metadata']['name']}: {st.get('phase')}: {st.get('message')}")
        for wl in cluster.api.get(kueue_path("workloads", namespace=namespace))["items"]:
            conds = "; ".join(
                f"{c['type']}={c['status']} ({c.get('message')})" for c in wl.get("status", {}).get("conditions", [])
            )
            lines.append(f"Workload {wl['metadata']['name']} active={wl['spec'].get('active')}: {conds}")
        return "\n".join(lines) + "\n" + cluster.describe(namespace)

    return text


def quiet(seconds: float = QUIET) -> None:
    """Let the operator and Kueue take a few more passes (watch events, back-offs) before checking nothing moved."""
    time.sleep(seconds)


# -- (a) admission ----------------------------------------------------------------------------------------------------
async def test_a_kueue_admits_the_generation_job_and_resumes_it_the_operator_waits(
    cluster: Cluster, spinrun_crd_applied: None, cluster_namespace: str, make_queue: Callable[..., Queue],
    job_history: SuspendHistory, cluster_operator: Any,
) -> None:  # fmt: skip
    """A queued run's generation Job is created suspended with the queue and priority labels; Kueue (its
    ClusterQueue on Hold) makes a Workload with the run's priority and keeps it pending: the run shows "waiting for
    admission" (phase Generating) and the Job stays suspended. Released, Kueue admits the Workload and resumes the
    Job itself (its pod is created); the run goes on Generating. `suspend` changed once after creation, by Kueue."""
    ns, api = cluster_namespace, cluster.api
    queue = make_queue(cpu="2", hold=True)
    api.create(spinruns_path(ns), queued_run("first", ns, queue.local_queue, workloadPriorityClass=PRIORITY_CLASS))
    info = describe(cluster, ns)

    job = api.wait_for("the generation Job", lambda: api.find(f"{jobs(ns)}/first-i1-gen"), TIMEOUT, describe=info)
    assert job["spec"]["suspend"] is True
    labels = job["metadata"]["labels"]
    assert (labels.get("kueue.x-k8s.io/queue-name"), labels.get("kueue.x-k8s.io/priority-class")) == (
        queue.local_queue, PRIORITY_CLASS), labels  # fmt: skip
    wl = api.wait_for("Kueue's Workload for the Job", lambda: workload_of(api, ns, job), TIMEOUT, describe=info)
    assert wl["spec"]["queueName"] == queue.local_queue
    assert (wl["spec"].get("priorityClassRef") or {}).get("name") == PRIORITY_CLASS, wl["spec"]
    assert wl["spec"].get("priority") == PRIORITY, wl["spec"]
    requests_ = wl["spec"]["podSets"][0]["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert requests_ == {"cpu": "1", "memory": "1Gi"}, requests_

    api.wait_for("the run to show it waits for admission", lambda: waiting(api, ns, "first"), TIMEOUT, describe=info)
    quiet()
    assert not admitted(workload_of(api, ns, job)), info()
    assert job_history.of("first-i1-gen") == [(True, OPERATOR)], info()
    assert waiting(api, ns, "first") and status_of(api, ns, "first")["phase"] == "Generating", info()

    queue.hold(False)
    api.wait_for("Kueue to admit the Workload", lambda: admitted(workload_of(api, ns, job)), TIMEOUT, describe=info)
    api.wait_for("the Job resumed", lambda: api.get(f"{jobs(ns)}/first-i1-gen")["spec"]["suspend"] is False,
                 TIMEOUT, describe=info)  # fmt: skip
    api.wait_for("the run Generating", lambda: generating(api, ns, "first"), TIMEOUT, describe=info)
    pods = f"/api/v1/namespaces/{ns}/pods"
    selector = "batch.kubernetes.io/job-name=first-i1-gen"
    api.wait_for("the Job's pod", lambda: api.get(pods, labelSelector=selector)["items"], TIMEOUT, describe=info)
    quiet()
    assert job_history.of("first-i1-gen") == [(True, OPERATOR), (False, KUEUE)], info()
    assert queue.usage() == {"cpu": "1", "memory": "1Gi"}, info()


# -- (b) quota --------------------------------------------------------------------------------------------------------
async def test_b_a_run_that_does_not_fit_waits_until_the_quota_is_freed(
    cluster: Cluster, spinrun_crd_applied: None, cluster_namespace: str, make_queue: Callable[..., Queue],
    job_history: SuspendHistory, cluster_operator: Any,
) -> None:  # fmt: skip
    """Quota for one generation pod (1 cpu). The first run is admitted and runs; the second's Workload does not fit:
    Kueue keeps its Job suspended and the operator leaves it so (the run waits for admission). Deleting the first
    run frees the quota (its Job and Workload go with it) and Kueue admits the second."""
    ns, api = cluster_namespace, cluster.api
    queue = make_queue(cpu="1")
    info = describe(cluster, ns)
    api.create(spinruns_path(ns), queued_run("first", ns, queue.local_queue))
    first = api.wait_for("the first Job", lambda: api.find(f"{jobs(ns)}/first-i1-gen"), TIMEOUT, describe=info)
    api.wait_for("the first run admitted", lambda: admitted(workload_of(api, ns, first)), TIMEOUT, describe=info)
    api.wait_for("the first run Generating", lambda: generating(api, ns, "first"), TIMEOUT, describe=info)

    api.create(spinruns_path(ns), queued_run("second", ns, queue.local_queue))
    second = api.wait_for("the second Job", lambda: api.find(f"{jobs(ns)}/second-i1-gen"), TIMEOUT, describe=info)

    def pending_for_quota() -> bool:
        reserved = condition(workload_of(api, ns, second), "QuotaReserved")
        return reserved.get("status") == "False" and "insufficient" in reserved.get("message", "").lower()

    api.wait_for("Kueue to find no room for the second", pending_for_quota, TIMEOUT, describe=info)
    api.wait_for("the second run waiting for admission", lambda: waiting(api, ns, "second"), TIMEOUT, describe=info)
    quiet()
    assert job_history.of("second-i1-gen") == [(True, OPERATOR)], info()
    assert waiting(api, ns, "second") and generating(api, ns, "first"), info()

    api.delete(f"{spinruns_path(ns)}/first")
    api.wait_for("the second run admitted", lambda: admitted(workload_of(api, ns, second)), TIMEOUT, describe=info)
    api.wait_for("the second Job resumed", lambda: api.get(f"{jobs(ns)}/second-i1-gen")["spec"]["suspend"] is False,
                 TIMEOUT, describe=info)  # fmt: skip
    api.wait_for("the second run Generating", lambda: generating(api, ns, "second"), TIMEOUT, describe=info)
    quiet()
    assert job_history.of("second-i1-gen") == [(True, OPERATOR), (False, KUEUE)], info()
    assert job_history.of("first-i1-gen") == [(True, OPERATOR), (False, KUEUE)], info()


# -- preemption ------------------------------------------------------------------------------------------------------
async def test_b2_a_run_preempted_by_kueue_waits_and_is_readmitted(
    cluster: Cluster, spinrun_crd_applied: None, cluster_namespace: str, make_queue: Callable[..., Queue],
    job_history: SuspendHistory, cluster_operator: Any,
) -> None:  # fmt: skip
    """Quota for one generation pod, preemption of lower priorities: a run without priority is admitted; a run with
    the higher WorkloadPriorityClass makes Kueue evict the first (Preempted) and suspend its Job, which the
    operator leaves suspended (the first run waits for admission again) while the second runs. Deleting the second
    lets Kueue readmit the first."""
    ns, api = cluster_namespace, cluster.api
    queue = make_queue(cpu="1", preempt=True)
    info = describe(cluster, ns)
    api.create(spinruns_path(ns), queued_run("low", ns, queue.local_queue))
    low = api.wait_for("the low Job", lambda: api.find(f"{jobs(ns)}/low-i1-gen"), TIMEOUT, describe=info)
    api.wait_for("the low run Generating", lambda: generating(api, ns, "low"), TIMEOUT, describe=info)

    api.create(spinruns_path(ns), queued_run("high", ns, queue.local_queue, workloadPriorityClass=PRIORITY_CLASS))
    high = api.wait_for("the high Job", lambda: api.find(f"{jobs(ns)}/high-i1-gen"), TIMEOUT, describe=info)
    api.wait_for("the high run admitted", lambda: admitted(workload_of(api, ns, high)), TIMEOUT, describe=info)
    api.wait_for("the high run Generating", lambda: generating(api, ns, "high"), TIMEOUT, describe=info)
    evicted = condition(workload_of(api, ns, low), "Evicted")
    assert (evicted.get("status"), evicted.get("reason")) == ("True", "Preempted"), info()
    api.wait_for("the low run waiting for admission", lambda: waiting(api, ns, "low"), TIMEOUT, describe=info)
    quiet()
    assert api.get(f"{jobs(ns)}/low-i1-gen")["spec"]["suspend"] is True, info()
    assert job_history.of("low-i1-gen") == [(True, OPERATOR), (False, KUEUE), (True, KUEUE)], info()
    assert waiting(api, ns, "low"), info()

    api.delete(f"{spinruns_path(ns)}/high")
    api.wait_for("the low run readmitted", lambda: admitted(workload_of(api, ns, low)), TIMEOUT, describe=info)
    api.wait_for("the low run Generating", lambda: generating(api, ns, "low"), TIMEOUT, describe=info)
    quiet()
    assert job_history.of("low-i1-gen") == [(True, OPERATOR), (False, KUEUE), (True, KUEUE), (False, KUEUE)], info()


# -- (c) spec.suspend -------------------------------------------------------------------------------------------------
async def test_c_spec_suspend_stops_an_admitted_run_through_kueue_and_resumes_it(
    cluster: Cluster, spinrun_crd_applied: None, cluster_namespace: str, make_queue: Callable[..., Queue],
    job_history: SuspendHistory, cluster_operator: Any,
) -> None:  # fmt: skip
    """spec.suspend on an admitted run: the operator deactivates the child's Workload (Kueue's way to stop an
    admitted workload), so Kueue evicts it, suspends the Job, deletes its pod and frees the quota, and the Job stays
    suspended (a Job suspended over an admitted Workload, as a plain spec.suspend patch would leave it, is resumed by
    Kueue at once). spec.suspend back to false: the Workload is reactivated, Kueue readmits it and resumes the Job.
    Kueue alone writes the Job's `suspend` after creation; it changes once per step of that story."""
    ns, api = cluster_namespace, cluster.api
    queue = make_queue(cpu="1")
    info = describe(cluster, ns)
    api.create(spinruns_path(ns), queued_run("first", ns, queue.local_queue))
    job_path = f"{jobs(ns)}/first-i1-gen"
    job = api.wait_for("the Job", lambda: api.find(job_path), TIMEOUT, describe=info)
    api.wait_for("the run admitted", lambda: admitted(workload_of(api, ns, job)), TIMEOUT, describe=info)
    api.wait_for("the run Generating", lambda: generating(api, ns, "first"), TIMEOUT, describe=info)

    api.patch(f"{spinruns_path(ns)}/first", {"spec": {"suspend": True}})
    api.wait_for("the run Suspended", lambda: status_of(api, ns, "first").get("phase") == "Suspended", TIMEOUT,
                 describe=info)  # fmt: skip
    api.wait_for("the Job suspended", lambda: api.get(job_path)["spec"]["suspend"] is True, TIMEOUT, describe=info)
    api.wait_for("the quota freed", lambda: queue.usage() == {"cpu": "0", "memory": "0"}, TIMEOUT, describe=info)
    quiet()
    assert api.get(job_path)["spec"]["suspend"] is True, f"the suspended run's Job runs again\n{info()}"
    assert not admitted(workload_of(api, ns, job)), info()
    assert status_of(api, ns, "first").get("phase") == "Suspended", info()

    api.patch(f"{spinruns_path(ns)}/first", {"spec": {"suspend": False}})
    api.wait_for("the Workload readmitted", lambda: admitted(workload_of(api, ns, job)), TIMEOUT, describe=info)
    api.wait_for("the Job resumed", lambda: api.get(job_path)["spec"]["suspend"] is False, TIMEOUT, describe=info)
    api.wait_for("the run Generating", lambda: generating(api, ns, "first"), TIMEOUT, describe=info)
    quiet()
    assert job_history.of("first-i1-gen") == [(True, OPERATOR), (False, KUEUE), (True, KUEUE), (False, KUEUE)], info()
    annotations = api.get(job_path)["metadata"].get("annotations") or {}
    assert children.SUSPENDED_BY_ANNOTATION not in annotations, annotations


# -- (d) PyTorchJob ---------------------------------------------------------------------------------------------------
def test_d_the_operator_built_pytorchjob_is_admitted_by_kueues_pytorchjob_integration(
    cluster: Cluster, spinrun_crd_applied: None, cluster_namespace: str, make_queue: Callable[..., Queue]
) -> None:
    """The training child exactly as the operator builds it for a queued run (children.training_job, owned by a real
    SpinRun; created here, since a generation step that finishes needs S3 and a model: no operator runs in this
    test). Kueue's PyTorchJob integration makes a Workload for it (pod set `master`, the trainer's requests), holds
    it while the ClusterQueue is on Hold (the Training Operator creates no pod for the suspended job), then admits
    it and resumes it; the Training Operator then creates the Master pod and the scheduler places it."""
    ns, api = cluster_namespace, cluster.api
    queue = make_queue(cpu="2", hold=True)
    info = describe(cluster, ns)
    owner = api.create(spinruns_path(ns), queued_run("train", ns, queue.local_queue, suspend=True))
    run = parse({k: owner[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    api.create(f"/api/v1/namespaces/{ns}/configmaps", children.configmap(run, owner))
    built = children.training_job(run, owner, 1, 0, Config())
    assert built["spec"]["runPolicy"]["suspend"] is True
    history = SuspendHistory(api, pytorchjobs(ns), ("runPolicy", "suspend"))
    try:
        job = api.create(pytorchjobs(ns), built)
        name = job["metadata"]["name"]
        wl = api.wait_for("Kueue's Workload for the PyTorchJob", lambda: workload_of(api, ns, job), TIMEOUT,
                          describe=info)  # fmt: skip
        owners = [(r["kind"], r["name"]) for r in wl["metadata"]["ownerReferences"]]
        assert owners == [("PyTorchJob", name)], owners
        pod_sets = {
            p["name"]: p["template"]["spec"]["containers"][0]["resources"]["requests"] for p in wl["spec"]["podSets"]
        }
        assert pod_sets == {"master": {"cpu": "1", "memory": "1Gi"}}, pod_sets
        quiet()
        assert not admitted(workload_of(api, ns, job)), info()
        assert not api.get(f"/api/v1/namespaces/{ns}/pods")["items"], info()

        queue.hold(False)
        api.wait_for("Kueue to admit the PyTorchJob", lambda: admitted(workload_of(api, ns, job)), TIMEOUT,
                     describe=info)  # fmt: skip
        api.wait_for("the PyTorchJob resumed",
                     lambda: api.get(f"{pytorchjobs(ns)}/{name}")["spec"]["runPolicy"]["suspend"] is False,
                     TIMEOUT, describe=info)  # fmt: skip

        def master_placed() -> bool:
            pods = api.get(f"/api/v1/namespaces/{ns}/pods", labelSelector="training.kubeflow.org/replica-type=master")
            return any(p["spec"].get("nodeName") for p in pods["items"])

        api.wait_for("the Master pod created and scheduled", master_placed, TIMEOUT, describe=info)
        assert history.of(name) == [(True, TESTS), (False, KUEUE)], info()
    finally:
        history.stop()


# -- the documented example ------------------------------------------------------------------------------------------
def documented_kueue_objects(namespace: str) -> list[dict[str, Any]]:
    """The Kueue objects of docs/operations.md's "Kueue" section, the LocalQueue moved to `namespace`."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("### Kueue") :]
    section = section[: section.index("\n### ", 1)]
    objects = []
    for block in re.findall(r"```yaml\n(.*?)```", section, re.S):
        for doc in yaml.safe_load_all(block):
            if doc and str(doc.get("apiVersion", "")).startswith("kueue.x-k8s.io/"):
                if doc["kind"] == "LocalQueue":
                    doc["metadata"]["namespace"] = namespace
                objects.append(doc)
    return objects


def test_e_the_operations_guides_queues_admit_what_the_operator_builds(
    cluster: Cluster, kueue: KueueManager, spinrun_crd_applied: None, cluster_namespace: str
) -> None:
    """docs/operations.md's Kueue example (ResourceFlavor, ClusterQueue, LocalQueue, WorkloadPriorityClass), as
    written there: Kueue's webhooks and schemas accept it, the queues become Active, and a GPU generation Job with a
    scratch volume, as the operator builds it for a run naming that LocalQueue and priority, is admitted (every
    resource it asks for, ephemeral-storage included, is covered). No operator runs: the Job is created here."""
    ns, api = cluster_namespace, cluster.api
    info = describe(cluster, ns)
    objects = documented_kueue_objects(ns)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ClusterQueue", "LocalQueue", "ResourceFlavor", "WorkloadPriorityClass"], kinds
    made: list[tuple[str, str]] = []
    try:
        for obj in objects:
            plural = obj["kind"].lower() + ("es" if obj["kind"].endswith("s") else "s")
            collection = kueue_path(plural, namespace=obj["metadata"].get("namespace"))
            try:
                api.create(collection, obj)
            except ApiError as e:
                pytest.fail(f"Kueue refused the documented {obj['kind']}: {e}", pytrace=False)
            made.append((obj["kind"], f"{collection}/{obj['metadata']['name']}"))
        for kind, path in made:
            if kind in ("ClusterQueue", "LocalQueue"):
                api.wait_for(f"the documented {kind} Active",
                             lambda p=path: condition(api.get(p), "Active").get("status") == "True", TIMEOUT,
                             describe=info)  # fmt: skip
        local_queue = next(o for o in objects if o["kind"] == "LocalQueue")["metadata"]["name"]
        priority = next(o for o in objects if o["kind"] == "WorkloadPriorityClass")["metadata"]["name"]
        doc = queued_run("gpu", ns, local_queue, suspend=True, workloadPriorityClass=priority)
        doc["spec"]["generation"] |= {"gpusPerShard": 1, "scratchSize": "100Gi"}
        owner = api.create(spinruns_path(ns), doc)
        run = parse({k: owner[k] for k in ("apiVersion", "kind", "metadata", "spec")})
        job = api.create(jobs(ns), children.generation_job(run, owner, 1, 0, Config()))
        requested = job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
        assert set(requested) == {"cpu", "memory", "nvidia.com/gpu", "ephemeral-storage"}, requested
        api.wait_for("the documented queue to admit the GPU Job", lambda: admitted(workload_of(api, ns, job)),
                     TIMEOUT, describe=info)  # fmt: skip
        api.delete(f"{spinruns_path(ns)}/gpu")
    finally:
        for _, path in reversed(made):
            api.delete(path)

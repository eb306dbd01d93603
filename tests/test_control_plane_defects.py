"""Issue 14's defects, each on the real control plane, each fixed (the form that failed is shown where it still can
be: the CRD's old forms in tests/test_cluster_crd.py, pod-level runAsNonRoot and a digit-leading PyTorchJob name in
tests/test_cluster_pytorchjob.py).

Real: etcd, kube-apiserver v1.37.2 (the CRD's schema and CEL, admission, RBAC), kube-controller-manager (the Job
controller, the garbage collector), kube-scheduler, the Kubeflow Training Operator v1.9.4 (its PyTorchJob controller
and webhook), kopf and spin_operator (in this process, authenticated as the chart's ServiceAccount with a token from
the TokenRequest API, bound by the chart's own RBAC). Stand-ins: the kubelet (tests/cluster/kubelet.py: containers
as local processes); Kueue where a test says so (the test admits a queued child itself); and, where a test replaces a
container's command, the workload (the pod, its spec and the controllers around it stay what the operator built).
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import pytest
from spin_operator import children
from spin_operator.config import Config
from spin_operator.controller import Controller, RunState
from spin_operator.kube import SPINRUNS, ApiError, Kube
from spin_operator.observe import job_child, pod_problem, pytorchjob_child

from spin_core import spec as s
from spin_core.resource import parse
from tests.cluster.api import ApiError as ClusterApiError
from tests.fixtures.cluster import Cluster, spinrun_doc, spinruns_path

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


# -- helpers ----------------------------------------------------------------------------------------------------------
def create_run(cluster: Cluster, doc: dict[str, Any]) -> dict[str, Any]:
    return cluster.api.create(spinruns_path(doc["metadata"]["namespace"]), doc)


def status_of(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return cluster.api.get(f"{spinruns_path(namespace)}/{name}").get("status") or {}


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def jobs(namespace: str) -> str:
    return f"/apis/batch/v1/namespaces/{namespace}/jobs"


def pytorchjobs(namespace: str) -> str:
    return f"/apis/kubeflow.org/v1/namespaces/{namespace}/pytorchjobs"


def pods_of_job(cluster: Cluster, namespace: str, job: str) -> list[dict[str, Any]]:
    return cluster.api.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector=f"batch.kubernetes.io/job-name={job}")[
        "items"
    ]


def built(cluster: Cluster, namespace: str, owner: dict[str, Any], step: str, **spec: Any) -> dict[str, Any]:
    """The child the operator builds for a run (owned by that real SpinRun), with its spec ConfigMap created."""
    run = parse({k: owner[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    cm = children.configmap(run, owner)
    if not cluster.api.find(f"/api/v1/namespaces/{namespace}/configmaps/{cm['metadata']['name']}"):
        cluster.api.create(f"/api/v1/namespaces/{namespace}/configmaps", cm)
    return children.build(run, step, owner, 1, 0, Config())


# -- 3. multi-node training starts ---------------------------------------------------------------------------------
def test_3_a_workers_injected_init_container_runs_and_its_training_container_starts(
    cluster: Cluster, spinrun_crd_applied: None, cluster_namespace: str
) -> None:
    """The PyTorchJob as the operator builds it for 2 nodes: the Training Operator injects its root `init-pytorch`
    container into the Worker; without a pod-level runAsNonRoot it runs (the stand-in's nslookup loop), and the
    Worker's own container starts (here `torchrun ... spin train` fails soon after: there is no S3; what matters is
    that it got past CreateContainerConfigError, where a pod-level runAsNonRoot left it, see
    tests/test_cluster_pytorchjob.py)."""
    ns = cluster_namespace
    owner = create_run(cluster, spinrun_doc("multi", ns, suspend=True, training={
        "nodes": 2, "processesPerNode": 1, "gpusPerNode": 0, "microBatchSize": 1, "globalBatchSize": 8}))  # fmt: skip
    job = built(cluster, ns, owner, "train")
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master", "Worker"}
    cluster.api.create(pytorchjobs(ns), job)

    def worker() -> dict[str, Any] | None:
        pods = cluster.api.get(
            f"/api/v1/namespaces/{ns}/pods", labelSelector="training.kubeflow.org/replica-type=worker"
        )
        return pods["items"][0] if pods["items"] else None

    def started() -> bool:
        pod = worker()
        if not pod:
            return False
        status = pod.get("status", {})
        inits = status.get("initContainerStatuses") or []
        mains = status.get("containerStatuses") or []
        waiting = [c["state"]["waiting"] for c in inits + mains if "waiting" in c.get("state", {})]
        assert not [w for w in waiting if w.get("reason") == "CreateContainerConfigError"], waiting
        return (
            bool(inits)
            and "terminated" in inits[0]["state"]
            and any({"running", "terminated"} & set(c.get("state", {})) for c in mains)
        )

    cluster.api.wait_for("the Worker's training container to start", started, timeout=180,
                         describe=lambda: cluster.describe(ns))  # fmt: skip
    pod = worker()
    (init,) = pod["status"]["initContainerStatuses"]
    assert init["name"] == "init-pytorch" and init["state"]["terminated"]["exitCode"] == 0
    assert "runAsNonRoot" not in pod["spec"].get("securityContext", {})
    assert pod["spec"]["containers"][0]["securityContext"]["runAsNonRoot"] is True


# -- 4. names ------------------------------------------------------------------------------------------------------
def test_4_a_run_name_the_training_operator_would_refuse_is_refused_at_apply(
    cluster: Cluster, spinrun_crd_applied: None, cluster_namespace: str
) -> None:
    """`7b-spin` (a valid DNS-1123 label) is refused by the CRD: its PyTorchJobs would be refused by the Training
    Operator's webhook (DNS-1035), and the run would never train."""
    with pytest.raises(ClusterApiError) as refused:
        create_run(cluster, spinrun_doc("7b-spin", cluster_namespace))
    assert refused.value.status == 422
    assert any(c.get("field") == "metadata.name" for c in refused.value.body["details"]["causes"]), refused.value.body


def test_4_b_the_longest_names_pass_the_webhook_and_name_the_replica_services(
    cluster: Cluster, spinrun_crd_applied: None, cluster_namespace: str
) -> None:
    """The longest allowed run name, at the last iteration and attempt: the webhook admits its PyTorchJob and the
    Training Operator creates its replica Services (63-character DNS-1035 labels)."""
    ns = cluster_namespace
    name = "r" + "x" * (s.MAX_NAME_LENGTH - 1)
    owner = create_run(cluster, spinrun_doc(name, ns, suspend=True, iterations=s.MAX_ITERATIONS, training={
        "nodes": 3, "processesPerNode": 1, "gpusPerNode": 0, "microBatchSize": 1, "globalBatchSize": 9}))  # fmt: skip
    run = parse({k: owner[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    job = children.training_job(run, owner, s.MAX_ITERATIONS, 9, Config())
    cluster.api.create(pytorchjobs(ns), job)  # its pods fail soon (no S3): the Services are the point
    job_name = job["metadata"]["name"]
    want = {f"{job_name}-master-0", f"{job_name}-worker-0", f"{job_name}-worker-1"}

    def services() -> set[str]:
        return {svc["metadata"]["name"] for svc in cluster.api.get(f"/api/v1/namespaces/{ns}/services")["items"]}

    cluster.api.wait_for(f"the Services {sorted(want)}", lambda: want <= services(), timeout=120,
                         describe=lambda: cluster.describe(ns))  # fmt: skip
    assert max(len(n) for n in want) <= 63


# -- 5. non-finite metrics -------------------------------------------------------------------------------------------
async def test_5_a_nan_metric_does_not_freeze_the_status(
    cluster: Cluster,
    spinrun_crd_applied: None,
    cluster_namespace: str,
    operator_kubeconfig: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The apiserver refuses a status patch holding NaN (the trainer's summary can carry one); the operator's
    status writer drops non-finite numbers, so this and every later write goes through."""
    monkeypatch.setenv("KUBECONFIG", str(operator_kubeconfig))
    ns, name = cluster_namespace, "nan"
    created = create_run(cluster, spinrun_doc(name, ns, suspend=True))
    kube = Kube()
    try:
        with pytest.raises(ApiError) as refused:
            await kube.patch(SPINRUNS, ns, name, {"status": {"message": "x", "bestMetric": math.nan}}, "status")
        assert refused.value.status == 400, refused.value
        controller = Controller(Config(), kube=kube)
        metrics = {"loss": math.nan, "acc": 0.5}
        status = {"phase": "Training", "iterations": [{"iteration": 1, "metrics": metrics}]}
        state = RunState(uid=created["metadata"]["uid"], written={}, status=status)
        await controller._write((ns, name), state)
        assert status_of(cluster, ns, name)["iterations"][0]["metrics"] == {"acc": 0.5}
        state.status["message"] = "later writes still work"
        await controller._write((ns, name), state)
        assert status_of(cluster, ns, name)["message"] == "later writes still work"
    finally:
        await kube.close()


# -- 6. stuck pods -----------------------------------------------------------------------------------------------
def test_6_stuck_pods_are_told_apart_from_running_ones_by_the_real_statuses(
    cluster: Cluster, spinrun_crd_applied: None, cluster_namespace: str
) -> None:
    """Generation Jobs as the operator builds them: with an image no registry has, and with a node selector no
    node matches. The Job controller counts both pods active (the child reads as running); the kubelet and the
    scheduler say why they are stuck, which is what the operator now reports. With activeDeadlineSeconds the Job
    controller ends such a Job, and the operator reads it as failed."""
    ns = cluster_namespace
    generation = {"shards": 1, "gpusPerShard": 0, "image": "registry.invalid/nowhere/spin:1"}
    owner = create_run(
        cluster, spinrun_doc("stuck", ns, suspend=True, generation=generation | {"activeDeadlineSeconds": 20})
    )
    pull = built(cluster, ns, owner, "generate")
    pull["metadata"]["name"] = "stuck-pull"
    cluster.api.create(jobs(ns), pull)
    unschedulable = built(cluster, ns, owner, "generate")
    unschedulable["metadata"]["name"] = "stuck-sched"
    unschedulable["spec"].pop("activeDeadlineSeconds")
    unschedulable["spec"]["template"]["spec"]["nodeSelector"] = {"pool": "no-such-pool"}
    cluster.api.create(jobs(ns), unschedulable)

    def problem(job: str) -> tuple[str, str] | None:
        found = [pod_problem(p) for p in pods_of_job(cluster, ns, job)]
        return next((p for p in found if p), None)

    reason, message = cluster.api.wait_for("the image pull to be reported", lambda: problem("stuck-pull"),
                                           timeout=60, describe=lambda: cluster.describe(ns))  # fmt: skip
    assert reason in ("ErrImagePull", "ImagePullBackOff") and "registry.invalid/nowhere/spin:1" in message
    assert job_child(cluster.api.get(f"{jobs(ns)}/stuck-pull")).phase in ("Running", "Pending")
    reason, message = cluster.api.wait_for("the scheduler's verdict", lambda: problem("stuck-sched"), timeout=60)
    assert reason == "Unschedulable" and "node" in message, message
    failed = cluster.api.wait_for(
        "the deadline to end the stuck Job",
        lambda: (lambda c: c if c.phase == "Failed" else None)(job_child(cluster.api.get(f"{jobs(ns)}/stuck-pull"))),
        timeout=120,
    )
    assert "DeadlineExceeded" in failed.message, failed.message


# -- 7. Kueue -------------------------------------------------------------------------------------------------------
async def test_7_a_child_held_by_another_controller_is_never_resumed(
    cluster: Cluster, spinrun_crd_applied: None, cluster_namespace: str, cluster_operator: Any
) -> None:
    """A queued run's generation Job is created suspended with Kueue's labels (the run's own kueue label is not
    copied) and stays so: the operator shows it waiting for admission. The test admits it (standing in for Kueue).
    Later someone else suspends it again (Kueue preempting it): the operator leaves it alone. spec.suspend still
    suspends and resumes what the operator itself suspended."""
    ns = cluster_namespace
    doc = spinrun_doc("queued", ns, queueName="team-a", generation={"shards": 1, "gpusPerShard": 0,
                                                                    "image": "registry.invalid/held:1"})  # fmt: skip
    doc["metadata"]["labels"] = {"team": "nlp", "kueue.x-k8s.io/queue-name": "from-the-run"}
    create_run(cluster, doc)
    job_path = f"{jobs(ns)}/queued-i1-gen"
    job = cluster.api.wait_for("the generation Job", lambda: cluster.api.find(job_path), timeout=60)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["metadata"]["labels"]["team"] == "nlp"
    cluster.api.wait_for("waiting for admission", lambda: waiting(cluster, ns), timeout=30)
    await asyncio.sleep(2)
    assert cluster.api.get(job_path)["spec"]["suspend"] is True  # not resumed by the operator

    cluster.api.patch(job_path, {"spec": {"suspend": False}})  # admitted
    cluster.api.wait_for("Generating", lambda: status_of(cluster, ns, "queued").get("phase") == "Generating", 30)
    cluster.api.patch(job_path, {"spec": {"suspend": True}})  # preempted by Kueue
    cluster.api.wait_for("waiting for admission again", lambda: waiting(cluster, ns), timeout=30)
    await asyncio.sleep(2)
    assert cluster.api.get(job_path)["spec"]["suspend"] is True

    cluster.api.patch(job_path, {"spec": {"suspend": False}})  # admitted again
    cluster.api.patch(f"{spinruns_path(ns)}/queued", {"spec": {"suspend": True}})

    def suspended_by_operator() -> bool:
        job = cluster.api.get(job_path)
        return job["spec"]["suspend"] and children.SUSPENDED_BY_ANNOTATION in job["metadata"].get("annotations", {})

    cluster.api.wait_for("suspended by the operator", suspended_by_operator, 30)
    cluster.api.patch(f"{spinruns_path(ns)}/queued", {"spec": {"suspend": False}})
    cluster.api.wait_for("resumed by the operator", lambda: cluster.api.get(job_path)["spec"]["suspend"] is False, 30)


def waiting(cluster: Cluster, namespace: str) -> bool:
    return "waiting for admission" in status_of(cluster, namespace, "queued").get("message", "")


# -- 8. a foreign ConfigMap ------------------------------------------------------------------------------------------
async def test_8_a_foreign_configmap_of_the_runs_name_is_never_taken_over(
    cluster: Cluster, spinrun_crd_applied: None, cluster_namespace: str, cluster_operator: Any
) -> None:
    """Someone's ConfigMap named `<run>-spec`: the operator reports that the name is taken, changes nothing in it,
    creates no child, and deleting the run does not garbage-collect it."""
    ns = cluster_namespace
    cm_path = f"/api/v1/namespaces/{ns}/configmaps"
    cluster.api.create(cm_path, {"metadata": {"name": "mine-spec"}, "data": {"settings": "someone else's"}})
    create_run(cluster, spinrun_doc("mine", ns))
    degraded = cluster.api.wait_for(
        "the run to report the taken name",
        lambda: (lambda c: c if c.get("status") == "True" else None)(
            condition(status_of(cluster, ns, "mine"), "Degraded")
        ),
        timeout=60,
    )
    assert "ConfigMap mine-spec exists and does not belong to this SpinRun" in degraded["message"], degraded
    cm = cluster.api.get(f"{cm_path}/mine-spec")
    assert cm["data"] == {"settings": "someone else's"} and not cm["metadata"].get("ownerReferences")
    assert not cluster.api.get(jobs(ns))["items"]
    cluster.api.delete(f"{spinruns_path(ns)}/mine")
    await asyncio.sleep(3)  # the garbage collector had its chance
    assert cluster.api.get(f"{cm_path}/mine-spec")["data"] == {"settings": "someone else's"}


# -- 9. scratch storage -------------------------------------------------------------------------------------------
def test_9_pods_get_a_scratch_volume_that_the_scheduler_and_kubelet_honour(
    cluster: Cluster, spinrun_crd_applied: None, cluster_namespace: str
) -> None:
    """Generation pods as built with scratchSize: the apiserver admits the emptyDir size limit and the
    ephemeral-storage request, the scheduler places the pod on a node with room, and every cache points there."""
    ns = cluster_namespace
    owner = create_run(cluster, spinrun_doc("scratch", ns, suspend=True, pods={"scratchSize": "20Gi"}))
    job = built(cluster, ns, owner, "generate")
    cluster.api.create(jobs(ns), job)

    def scheduled() -> dict[str, Any] | None:
        return next((p for p in pods_of_job(cluster, ns, job["metadata"]["name"]) if p["spec"].get("nodeName")), None)

    pod = cluster.api.wait_for("a scheduled pod", scheduled, timeout=60)
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "scratch")
    assert volume["emptyDir"] == {"sizeLimit": "20Gi"}
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["requests"]["ephemeral-storage"] == "20Gi"
    env = {e["name"]: e.get("value") for e in container["env"]}
    for var in ("TMPDIR", "SPIN_CACHE_DIR", "HF_HOME", "TORCH_EXTENSIONS_DIR", "VLLM_CACHE_ROOT"):
        assert env[var].startswith(children.SCRATCH), (var, env[var])
    assert {"name": "scratch", "mountPath": children.SCRATCH} in container["volumeMounts"]


# -- 10. retry semantics of training -------------------------------------------------------------------------------
def _exit_once(marker: Path, first: int) -> list[str]:
    """A command that appends a line to `marker` each time it runs, and exits `first` the first time, 0 after."""
    program = (
        "import pathlib, sys\n"
        f"m = pathlib.Path({str(marker)!r})\n"
        "runs = (m.read_text() if m.exists() else '') + 'ran\\n'\n"
        "m.write_text(runs)\n"
        f"sys.exit({first} if runs.count('ran') == 1 else 0)\n"
    )
    return ["python", "-c", program]


@pytest.mark.parametrize(("first_exit", "outcome"), [(137, "Succeeded"), (1, "Failed")])
def test_10_training_restarts_in_place_only_when_killed_by_a_signal(
    cluster: Cluster, spinrun_crd_applied: None, cluster_namespace: str, marker_dir: Path, first_exit: int, outcome: str
) -> None:
    """The PyTorchJob as built (restartPolicy ExitCode, no restartPolicy in the pod template), its container's
    command replaced by one that exits `first_exit` once and 0 the next time. 137 (killed: preemption, OOM): the real
    Training Operator recreates the pod and the job succeeds. 1 (a failed step) or 2 (bad input): it fails at once,
    for the operator to decide. No warning Event about the template's restart policy."""
    ns = cluster_namespace
    owner = create_run(cluster, spinrun_doc("restarts", ns, suspend=True))
    job = built(cluster, ns, owner, "train")
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        replica["template"]["spec"]["containers"][0]["command"] = _exit_once(marker_dir / "ran", first_exit)
        replica["template"]["spec"]["containers"][0]["args"] = []
    cluster.api.create(pytorchjobs(ns), job)
    name = job["metadata"]["name"]

    def finished() -> Any:
        child = pytorchjob_child(cluster.api.get(f"{pytorchjobs(ns)}/{name}"))
        return child if child.terminal else None

    child = cluster.api.wait_for(f"the PyTorchJob to end ({outcome})", finished, timeout=180,
                                 describe=lambda: cluster.describe(ns))  # fmt: skip
    assert child.phase == outcome, child
    if outcome == "Failed":
        time.sleep(3)  # a restart, if any, would have run by now
    runs = (marker_dir / "ran").read_text().count("ran")
    assert runs == (2 if first_exit >= 128 else 1), f"the training container ran {runs} times"
    reasons = [e.get("reason") for e in cluster.api.get(f"/api/v1/namespaces/{ns}/events")["items"]]
    assert "SetPodTemplateRestartPolicy" not in reasons, "the Training Operator warned about the template's policy"

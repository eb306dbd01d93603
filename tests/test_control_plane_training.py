"""Training on a shared cluster (issue 17): Kubeflow Trainer v2 TrainJobs and preemption, on the real control plane.

Real: kube-apiserver (Kubeflow Trainer v2.0.0's own CRDs, from its Go module, validate the operator's TrainJobs; the
Eviction API adds the DisruptionTarget condition), the Job controller (podFailurePolicy), the Kubeflow Training
Operator v1.9.4 (restartPolicy ExitCode), kopf and spin_operator (in this process, as the chart's ServiceAccount).
Stand-ins: the kubelet (containers as local processes; an evicted container gets SIGTERM, exit code 143); Kubeflow
Trainer v2's controller and JobSet, which are not run here (the test writes the TrainJob's status and creates its
rank-0 pod, as they would); where a test replaces a container's command, the workload.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from spin_operator import children
from spin_operator.config import Config
from spin_operator.observe import job_child, pytorchjob_child

from spin_core.resource import parse
from tests.cluster import build
from tests.cluster.api import ApiError
from tests.fixtures.cluster import Cluster, crd_established, spinrun_doc, spinruns_path

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

TRAINER_GROUP = "trainer.kubeflow.org"
IMAGE = "ghcr.io/spin-selfplay/spin-trainer:0.1.0"


@pytest.fixture(scope="module")
def trainer_crds(cluster: Cluster) -> None:
    """Kubeflow Trainer v2.0.0's CRDs and its torch-distributed ClusterTrainingRuntime, as its manifests define them."""
    folder = build.build("trainer", log=lambda _m: None)
    for path in sorted((folder / "crds").glob(f"{TRAINER_GROUP}_*.yaml")):
        cluster.kubectl("apply", "--server-side", "-f", str(path))
    for name in ("trainjobs", "clustertrainingruntimes"):
        cluster.api.wait_for(f"{name} to be served", lambda n=name: crd_established(cluster, f"{n}.{TRAINER_GROUP}"))
    cluster.kubectl("apply", "--server-side", "-f", str(folder / "runtimes" / "torch_distributed.yaml"))


def owner_of(cluster: Cluster, doc: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Create the SpinRun (the children's owner) and its spec ConfigMap; returns its body and the parsed run."""
    body = cluster.api.create(spinruns_path(doc["metadata"]["namespace"]), doc)
    run = parse({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    cluster.api.create(f"/api/v1/namespaces/{doc['metadata']['namespace']}/configmaps", children.configmap(run, body))
    return body, run


def sleep_once(marker: Path) -> list[str]:
    """Runs for a long while the first time (to be evicted), then exits 0 at once."""
    program = (
        "import pathlib, sys, time\n"
        f"m = pathlib.Path({str(marker)!r})\n"
        "first = not m.exists()\n"
        "m.write_text((m.read_text() if m.exists() else '') + 'ran\\n')\n"
        "time.sleep(600 if first else 0)\n"
    )
    return ["python", "-c", program]


def evict(cluster: Cluster, namespace: str, pod: str) -> None:
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": namespace}}
    cluster.api.create(f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction", body)


def running_pod(cluster: Cluster, namespace: str, selector: str) -> dict[str, Any] | None:
    pods = cluster.api.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector=selector)["items"]
    return next((p for p in pods if p["status"].get("phase") == "Running"), None)


# -- Kubeflow Trainer v2 ------------------------------------------------------------------------------------------
def test_the_operators_trainjob_is_valid_for_kubeflow_trainer_v2s_crd(
    cluster: Cluster, trainer_crds: None, spinrun_crd_applied: None, cluster_namespace: str
) -> None:
    """The TrainJob the operator builds for `training.runtime: torch-distributed` is admitted by Trainer v2.0.0's own
    CRD schema (and the same object with a wrong field is not: the schema is enforced)."""
    ns = cluster_namespace
    storage = {"uri": "s3://runs/v2", "credentialsSecret": "s3-credentials"}
    training = {"runtime": "torch-distributed", "nodes": 2, "processesPerNode": 2, "gpusPerNode": 2,
                "microBatchSize": 1, "globalBatchSize": 8, "nodeSelector": {"gpu": "h100"}}  # fmt: skip
    doc = spinrun_doc("v2", ns, suspend=True, storage=storage, pods={"scratchSize": "10Gi"}, training=training)
    owner, run = owner_of(cluster, doc)
    trainjob = children.trainjob(run, owner, 1, 0, Config())
    path = f"/apis/{TRAINER_GROUP}/v1alpha1/namespaces/{ns}/trainjobs"
    created = cluster.api.create(path, trainjob, fieldValidation="Strict")
    assert created["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert created["spec"]["trainer"]["numNodes"] == 2
    broken = {**trainjob, "metadata": {**trainjob["metadata"], "name": "v2-broken"}}
    broken["spec"] = {**trainjob["spec"], "trainer": {**trainjob["spec"]["trainer"], "numNodes": "two"}}
    with pytest.raises(ApiError) as refused:
        cluster.api.create(path, broken, fieldValidation="Strict")
    assert refused.value.status == 422 and "numNodes" in refused.value.message, refused.value


async def test_a_run_on_a_training_runtime_trains_through_a_trainjob(
    cluster: Cluster, trainer_crds: None, spinrun_crd_applied: None, cluster_namespace: str, cluster_operator: Any
) -> None:
    """A SpinRun with training.runtime: its finished generation Job (already there, its command replaced by one
    that succeeds: the real Job controller completes it) is followed by a TrainJob that Trainer v2's CRD admits,
    created by the operator as its ServiceAccount. The test then does what Trainer v2 and JobSet would: rank 0's pod
    (a real pod the kubelet runs, writing the trainer's summary as its termination message) and the Complete
    condition. The run succeeds with the summary's metrics in its status."""
    ns, name = cluster_namespace, "onv2"
    training = {"runtime": "torch-distributed", "nodes": 1, "processesPerNode": 1, "gpusPerNode": 0,
                "microBatchSize": 1, "globalBatchSize": 8}  # fmt: skip
    doc = spinrun_doc(name, ns, training=training)
    run = parse(doc)
    generation = children.generation_job(run, {"metadata": {"name": name, "namespace": ns}}, 1, 0, Config())
    generation["metadata"].pop("ownerReferences")  # the run does not exist yet; the operator adopts its child
    generation["spec"]["template"]["spec"]["containers"][0]["command"] = ["python", "-c", "pass"]
    generation["spec"]["template"]["spec"]["containers"][0]["args"] = []
    generation["spec"]["template"]["spec"]["volumes"] = [
        v for v in generation["spec"]["template"]["spec"]["volumes"] if v["name"] != "spec"
    ]
    generation["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = [
        m for m in generation["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] if m["name"] != "spec"
    ]
    cluster.api.create(f"/apis/batch/v1/namespaces/{ns}/jobs", generation)
    gen_path = f"/apis/batch/v1/namespaces/{ns}/jobs/{name}-i1-gen"
    cluster.api.wait_for(
        "the generation Job to complete",
        lambda: job_child(cluster.api.get(gen_path)).phase == "Succeeded",
        timeout=120,
        describe=lambda: cluster.describe(ns),
    )
    cluster.api.create(spinruns_path(ns), doc)
    tj_path = f"/apis/{TRAINER_GROUP}/v1alpha1/namespaces/{ns}/trainjobs/{name}-i1-train"
    trainjob = cluster.api.wait_for("the operator's TrainJob", lambda: cluster.api.find(tj_path), timeout=120,
                                    describe=lambda: cluster.describe(ns))  # fmt: skip
    assert trainjob["metadata"]["ownerReferences"][0]["name"] == name
    assert not cluster.api.get(f"/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs")["items"]

    summary = '{"iteration": 1, "checkpoint": null, "metrics": {"loss": 0.125}}'
    rank0 = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{name}-i1-train-node-0-0-x",
            "labels": {
                "jobset.sigs.k8s.io/jobset-name": f"{name}-i1-train",
                "jobset.sigs.k8s.io/replicatedjob-name": "node",
                "jobset.sigs.k8s.io/job-index": "0",
                "batch.kubernetes.io/job-completion-index": "0",
            },
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "node",
                    "image": IMAGE,
                    "command": ["python", "-c", f"open('/dev/termination-log', 'w').write({summary!r})"],
                }
            ],
        },
    }
    cluster.api.create(f"/api/v1/namespaces/{ns}/pods", rank0)
    pod_path = f"/api/v1/namespaces/{ns}/pods/{rank0['metadata']['name']}"
    cluster.api.wait_for(
        "rank 0's pod to finish",
        lambda: cluster.api.get(pod_path)["status"].get("phase") == "Succeeded",
        timeout=120,
        describe=lambda: cluster.describe(ns),
    )
    complete = {"type": "Complete", "status": "True", "reason": "JobsCompleted", "message": "jobset completed",
                "lastTransitionTime": "2026-12-07T00:00:00Z"}  # fmt: skip
    cluster.api.patch(f"{tj_path}/status", {"status": {"conditions": [complete]}})
    status = cluster.api.wait_for(
        "the run to succeed",
        lambda: (lambda st: st if st.get("phase") == "Succeeded" else None)(
            cluster.api.get(f"{spinruns_path(ns)}/{name}").get("status") or {}
        ),
        timeout=120,
    )
    assert status["iterations"][0]["metrics"] == {"loss": 0.125}
    assert status["iterations"][0]["trainingJob"] == f"{name}-i1-train"


# -- preemption -------------------------------------------------------------------------------------------------
def test_an_evicted_generation_pod_is_retried_without_counting_as_a_failure(
    cluster: Cluster, spinrun_crd_applied: None, cluster_namespace: str, marker_dir: Path
) -> None:
    """The generation Job as built, with backoffLimitPerIndex 0 (any counted failure fails the shard): its pod is
    evicted (a drain, a spot reclaim: the Eviction API marks it DisruptionTarget), the Job's podFailurePolicy
    ignores that failure, a new pod runs the shard and the Job completes."""
    ns = cluster_namespace
    body, run = owner_of(cluster, spinrun_doc("evicted", ns, suspend=True))
    job = children.generation_job(run, body, 1, 0, Config())
    assert job["spec"]["backoffLimitPerIndex"] == 0
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["command"], container["args"] = sleep_once(marker_dir / "ran"), []
    cluster.api.create(f"/apis/batch/v1/namespaces/{ns}/jobs", job)
    selector = f"batch.kubernetes.io/job-name={job['metadata']['name']}"
    pod = cluster.api.wait_for("the shard's pod to run", lambda: running_pod(cluster, ns, selector), timeout=120,
                               describe=lambda: cluster.describe(ns))  # fmt: skip
    cluster.api.wait_for("the container to start", lambda: (marker_dir / "ran").exists(), timeout=60)
    evict(cluster, ns, pod["metadata"]["name"])
    path = f"/apis/batch/v1/namespaces/{ns}/jobs/{job['metadata']['name']}"
    child = cluster.api.wait_for(
        "the Job to end", lambda: (lambda c: c if c.terminal else None)(job_child(cluster.api.get(path))), timeout=180,
        describe=lambda: cluster.describe(ns),
    )  # fmt: skip
    assert child.phase == "Succeeded", child
    assert (marker_dir / "ran").read_text().count("ran") == 2


def test_an_evicted_training_pod_restarts_in_place(
    cluster: Cluster, spinrun_crd_applied: None, cluster_namespace: str, marker_dir: Path
) -> None:
    """The PyTorchJob as built (restartPolicy ExitCode): its Master pod is evicted; the container gets SIGTERM and
    exits 143 (>= 128: killed), so the Training Operator recreates the pod in place and the job succeeds, where
    spin train resumes from its last train state."""
    ns = cluster_namespace
    body, run = owner_of(cluster, spinrun_doc("preempted", ns, suspend=True))
    job = children.training_job(run, body, 1, 0, Config())
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    container["command"], container["args"] = sleep_once(marker_dir / "ran"), []
    cluster.api.create(f"/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs", job)
    selector = f"training.kubeflow.org/job-name={job['metadata']['name']}"
    pod = cluster.api.wait_for("the Master pod to run", lambda: running_pod(cluster, ns, selector), timeout=120,
                               describe=lambda: cluster.describe(ns))  # fmt: skip
    cluster.api.wait_for("the container to start", lambda: (marker_dir / "ran").exists(), timeout=60)
    evict(cluster, ns, pod["metadata"]["name"])
    path = f"/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs/{job['metadata']['name']}"
    child = cluster.api.wait_for(
        "the PyTorchJob to end",
        lambda: (lambda c: c if c.terminal else None)(pytorchjob_child(cluster.api.get(path))),
        timeout=180,
        describe=lambda: cluster.describe(ns),
    )
    assert child.phase == "Succeeded", child
    assert (marker_dir / "ran").read_text().count("ran") == 2

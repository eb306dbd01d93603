"""PyTorchJobs through the real Kubeflow Training Operator v1.9.4 (issue 14).

Real: the Training Operator (its PyTorchJob controller creates the pods and Services, sets MASTER_ADDR/RANK/...,
injects the `init-pytorch` init container into Workers; its validating webhook, called by kube-apiserver over
HTTPS), kube-apiserver, scheduler, torch.distributed (gloo) in the containers. Stand-in: the kubelet (processes on
this machine; MASTER_ADDR, a Service name, rewritten to 127.0.0.1 as there is no cluster DNS; the alpine
`nslookup <master>` init container succeeds once the master's Service exists).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.cluster.api import ApiError
from tests.cluster.controlplane import free_ports
from tests.fixtures.cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

IMAGE = "ghcr.io/spin-selfplay/spin-trainer:0.1.0"
# Two ranks, one per pod, rendezvous through MASTER_ADDR/MASTER_PORT as the Training Operator sets them.
ALL_REDUCE = """
import datetime, json, os, pathlib
import torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
seen = {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item(), "master": os.environ["MASTER_ADDR"]}
pathlib.Path("/dev/termination-log").write_text(json.dumps(seen))
dist.destroy_process_group()
"""


def pytorchjob(name: str, command: list[str], port: int, pod_security: dict[str, Any] | None = None) -> dict[str, Any]:
    container = {
        "name": "pytorch",  # the container the Training Operator configures
        "image": IMAGE,
        "command": command,
        "ports": [{"name": "pytorchjob-port", "containerPort": port}],  # host network here: a free port
    }
    template: dict[str, Any] = {"spec": {"containers": [container]}}
    if pod_security:
        template["spec"]["securityContext"] = pod_security
    replica = {"replicas": 1, "restartPolicy": "Never", "template": template}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {"pytorchReplicaSpecs": {"Master": replica, "Worker": replica}},
    }


def jobs_path(namespace: str) -> str:
    return f"/apis/kubeflow.org/v1/namespaces/{namespace}/pytorchjobs"


def condition(cluster: Cluster, namespace: str, name: str, *kinds: str) -> dict[str, Any] | None:
    job = cluster.api.find(f"{jobs_path(namespace)}/{name}") or {}
    for c in job.get("status", {}).get("conditions") or []:
        if c["type"] in kinds and c["status"] == "True":
            return c
    return None


def pod(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return cluster.api.get(f"/api/v1/namespaces/{namespace}/pods/{name}")


def test_a_pytorchjob_master_and_worker_all_reduce(cluster: Cluster, cluster_namespace: str) -> None:
    """Master and Worker pods made by the Training Operator run a gloo all-reduce together; the Worker's injected
    init-pytorch waits for the master's Service; the PyTorchJob ends Succeeded."""
    ns = cluster_namespace
    (port,) = free_ports(1)
    cluster.api.create(jobs_path(ns), pytorchjob("ddp", ["python", "-c", ALL_REDUCE], port))
    done = cluster.api.wait_for(
        "PyTorchJob ddp to finish",
        lambda: condition(cluster, ns, "ddp", "Succeeded", "Failed"),
        timeout=300,
        describe=lambda: cluster.describe(ns),
    )
    assert done["type"] == "Succeeded", cluster.describe(ns)
    ranks = {}
    for name in ("ddp-master-0", "ddp-worker-0"):
        terminated = pod(cluster, ns, name)["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 0, terminated
        seen = json.loads(terminated["message"])
        ranks[seen["rank"]] = seen
    assert sorted(ranks) == [0, 1] and all(r["world"] == 2 and r["sum"] == 3.0 for r in ranks.values()), ranks
    assert ranks[0]["master"] == "127.0.0.1"  # the stand-in's answer for the master's Service name
    (init,) = pod(cluster, ns, "ddp-worker-0")["status"]["initContainerStatuses"]
    assert init["name"] == "init-pytorch" and init["state"]["terminated"]["exitCode"] == 0
    assert cluster.api.find(f"/api/v1/namespaces/{ns}/services/ddp-master-0"), "the Training Operator made no Service"


def test_the_webhook_refuses_a_name_that_is_not_dns_1035(cluster: Cluster, cluster_namespace: str) -> None:
    """The Training Operator's validating webhook (called by kube-apiserver over HTTPS) refuses a PyTorchJob whose
    name starts with a digit, as a SpinRun named `7b-spin` would make (issue 14, defect 4)."""
    body = pytorchjob("7b-spin-i1-train", ["python", "-c", "pass"], 29500)
    with pytest.raises(ApiError) as refused:
        cluster.api.create(jobs_path(cluster_namespace), body)
    message = refused.value.message
    assert 'admission webhook "validator.pytorchjob.training-operator.kubeflow.org" denied the request' in message
    assert "DNS-1035" in message, message


def test_pod_level_run_as_non_root_blocks_the_injected_init_container(cluster: Cluster, cluster_namespace: str) -> None:
    """What the operator's training pods meet (issue 14, defect 3): with pod-level runAsNonRoot and no runAsUser,
    the alpine init-pytorch container the Training Operator injects into Workers cannot start
    (CreateContainerConfigError), so the Worker never initializes; the Master is unaffected."""
    ns = cluster_namespace
    (port,) = free_ports(1)
    body = pytorchjob("nonroot", ["python", "-c", "import time; time.sleep(600)"], port, {"runAsNonRoot": True})
    cluster.api.create(jobs_path(ns), body)

    def blocked() -> dict[str, Any] | None:
        worker = cluster.api.find(f"/api/v1/namespaces/{ns}/pods/nonroot-worker-0") or {}
        for status in worker.get("status", {}).get("initContainerStatuses", []):
            waiting = status["state"].get("waiting") or {}
            if waiting.get("reason") == "CreateContainerConfigError":
                return waiting
        return None

    waiting = cluster.api.wait_for("the Worker's init container to fail", blocked, timeout=120,
                                   describe=lambda: cluster.describe(ns))  # fmt: skip
    assert "container has runAsNonRoot and image will run as root" in waiting["message"]
    assert "container: init-pytorch" in waiting["message"]
    assert pod(cluster, ns, "nonroot-worker-0")["status"]["phase"] == "Pending"
    cluster.api.delete(f"{jobs_path(ns)}/nonroot")

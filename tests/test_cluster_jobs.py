"""Jobs and pods through the real control plane and the stand-in kubelet (issue 14).

Real: kube-apiserver (admission: ServiceAccount, NodeRestriction...), the Job controller, the garbage collector and
the scheduler (kube-controller-manager, kube-scheduler v1.37.2), the Node authorizer judging the kubelet's calls.
Stand-in: the kubelet (tests/cluster/kubelet.py), which runs each container as a local process with the pod's env,
volumes and user, and reports its status as a kubelet does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "ghcr.io/spin-selfplay/spin-operator:0.1.0"  # a known image: images/operator/Dockerfile (USER 10001)

# The container's program: reports what it sees through its termination message (JSON).
PROBE = """
import json, os, pathlib
sa = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount")
seen = {
    "pod": os.environ["POD_NAME"], "node": os.environ["NODE_NAME"], "secret": os.environ["FROM_SECRET"],
    "run": pathlib.Path("/etc/spin/run.json").read_text(), "uid": os.getuid(), "home": os.environ["HOME"],
    "namespace": (sa / "namespace").read_text(), "token": len((sa / "token").read_text()) > 100,
    "ca": (sa / "ca.crt").read_text().startswith("-----BEGIN CERTIFICATE-----"),
    "apiserver": os.environ["KUBERNETES_SERVICE_HOST"] + ":" + os.environ["KUBERNETES_SERVICE_PORT"],
}
pathlib.Path("/dev/termination-log").write_text(json.dumps(seen))
print("done")
"""


def job(name: str, command: list[str], owner: dict[str, Any] | None = None, **pod_spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": IMAGE, "command": command}
    container.update(pod_spec.pop("container", {}))
    body: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": pod_spec.pop("backoffLimit", 0),
            "template": {"spec": {"restartPolicy": "Never", "containers": [container], **pod_spec}},
        },
    }
    if owner:
        meta = owner["metadata"]
        body["metadata"]["ownerReferences"] = [
            {"apiVersion": "v1", "kind": owner["kind"], "name": meta["name"], "uid": meta["uid"]}
        ]
    return body


def job_condition(cluster: Cluster, namespace: str, name: str, kind: str) -> dict[str, Any] | None:
    obj = cluster.api.find(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
    for condition in (obj or {}).get("status", {}).get("conditions", []):
        if condition["type"] == kind and condition["status"] == "True":
            return condition
    return None


def job_pods(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    return cluster.api.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector=f"job-name={name}")["items"]


def test_a_job_runs_to_complete_and_is_collected_with_its_owner(cluster: Cluster, cluster_namespace: str) -> None:
    """A Job made by hand: the Job controller creates its pod, the scheduler binds it, the stand-in kubelet runs
    it (env from fieldRef and secretKeyRef, a configMap volume at /etc/spin, the projected ServiceAccount token, the
    image's USER and HOME), its termination message lands in the pod status, the Job completes; deleting the Job's
    owner makes the garbage collector delete the Job and its pod."""
    ns, api = cluster_namespace, cluster.api
    owner = api.create(f"/api/v1/namespaces/{ns}/configmaps", {"metadata": {"name": "owner"}, "data": {}})
    api.create(f"/api/v1/namespaces/{ns}/configmaps", {"metadata": {"name": "spec"}, "data": {"run.json": '{"a": 1}'}})
    api.create(f"/api/v1/namespaces/{ns}/secrets", {"metadata": {"name": "creds"}, "stringData": {"key": "s3cr3t"}})
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
    ]
    body = job(
        "probe",
        ["python", "-c", PROBE],
        owner=owner,
        container={"env": env, "volumeMounts": [{"name": "spec", "mountPath": "/etc/spin", "readOnly": True}]},
        volumes=[{"name": "spec", "configMap": {"name": "spec"}}],
    )
    api.create(f"/apis/batch/v1/namespaces/{ns}/jobs", body)
    api.wait_for(
        "Job probe to be Complete",
        lambda: job_condition(cluster, ns, "probe", "Complete") or job_condition(cluster, ns, "probe", "Failed"),
        timeout=120,
        describe=lambda: cluster.describe(ns),
    )
    assert job_condition(cluster, ns, "probe", "Complete"), cluster.describe(ns)
    (pod,) = job_pods(cluster, ns, "probe")
    assert pod["status"]["phase"] == "Succeeded"
    (status,) = pod["status"]["containerStatuses"]
    terminated = status["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    seen = json.loads(terminated["message"])
    assert seen == {
        "pod": pod["metadata"]["name"],
        "node": pod["spec"]["nodeName"],
        "secret": "s3cr3t",
        "run": '{"a": 1}',
        "uid": 10001,
        "home": "/home/spin",
        "namespace": ns,
        "token": True,
        "ca": True,
        "apiserver": cluster.server.removeprefix("https://"),
    }
    assert "done" in cluster.container_log(ns, pod["metadata"]["name"], "main")

    api.delete(f"/api/v1/namespaces/{ns}/configmaps/owner")
    api.wait_for(
        "the garbage collector to delete the Job and its pod",
        lambda: api.find(f"/apis/batch/v1/namespaces/{ns}/jobs/probe") is None and not job_pods(cluster, ns, "probe"),
        timeout=120,
        describe=lambda: cluster.describe(ns),
    )


def test_a_failing_job_reports_exit_code_and_log_tail(cluster: Cluster, cluster_namespace: str) -> None:
    """A container that exits 3 with FallbackToLogsOnError: the pod fails with exit code 3 and the log tail as its
    termination message; the Job controller marks the Job Failed (BackoffLimitExceeded)."""
    ns = cluster_namespace
    program = "import sys; print('first line'); print('bad input: no such column', file=sys.stderr); sys.exit(3)"
    body = job("failing", ["python", "-c", program], container={"terminationMessagePolicy": "FallbackToLogsOnError"})
    cluster.api.create(f"/apis/batch/v1/namespaces/{ns}/jobs", body)
    failed = cluster.api.wait_for(
        "Job failing to fail",
        lambda: job_condition(cluster, ns, "failing", "Failed"),
        timeout=120,
        describe=lambda: cluster.describe(ns),
    )
    assert failed["reason"] == "BackoffLimitExceeded"
    (pod,) = job_pods(cluster, ns, "failing")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3 and terminated["reason"] == "Error"
    assert terminated["message"].splitlines()[-1] == "bad input: no such column"


# The pod's program, run from the checkout with an emptyDir over the checkout's top folder.
UNDER_A_VOLUME = """
import json, os, pathlib, sys
import spin_core
top = pathlib.Path(sys.argv[1])
(top / "written-by-the-pod").write_text("only in the volume")
seen = {"spin_core": spin_core.__file__, "top": sorted(os.listdir(top))}
pathlib.Path("/dev/termination-log").write_text(json.dumps(seen))
"""


def test_a_volume_over_the_checkouts_folder_hides_the_folder_not_the_checkout(
    cluster: Cluster, cluster_namespace: str
) -> None:
    """An emptyDir mounted over the folder that holds the checkout (the operator's and trainer's pods mount one at
    /tmp, and a checkout may live under /tmp, as a CI clone does): the volume hides the host's folder, while the
    stand-in's "image" (the venv's Python and the checkout) stays visible on top of it, as an image's files would
    in a real container."""
    ns = cluster_namespace
    top = Path("/", ROOT.parts[1])
    body = job(
        "under-a-volume",
        ["python", "-c", UNDER_A_VOLUME, str(top)],
        container={"volumeMounts": [{"name": "scratch", "mountPath": str(top)}]},
        volumes=[{"name": "scratch", "emptyDir": {}}],
    )
    cluster.api.create(f"/apis/batch/v1/namespaces/{ns}/jobs", body)
    cluster.api.wait_for(
        "Job under-a-volume to end",
        lambda: (
            job_condition(cluster, ns, "under-a-volume", "Complete")
            or job_condition(cluster, ns, "under-a-volume", "Failed")
        ),
        timeout=120,
        describe=lambda: cluster.describe(ns),
    )
    (pod,) = job_pods(cluster, ns, "under-a-volume")
    log = cluster.container_log(ns, pod["metadata"]["name"], "main")
    assert job_condition(cluster, ns, "under-a-volume", "Complete"), log
    seen = json.loads(pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"])
    assert Path(seen["spin_core"]).is_relative_to(ROOT)
    assert seen["top"] == sorted({ROOT.parts[2], "written-by-the-pod"})  # the volume, holding just the checkout
    assert not (top / "written-by-the-pod").exists()


def pod_body(name: str, image: str, **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": image, "command": ["python", "-c", "print('hi')"]}
    container.update(spec.pop("container", {}))
    return {"metadata": {"name": name}, "spec": {"restartPolicy": "Never", "containers": [container], **spec}}


def waiting_reason(
    cluster: Cluster, ns: str, name: str, reasons: set[str], init: bool = False
) -> dict[str, Any] | None:
    pod = cluster.api.find(f"/api/v1/namespaces/{ns}/pods/{name}") or {}
    key = "initContainerStatuses" if init else "containerStatuses"
    for status in pod.get("status", {}).get(key, []):
        waiting = status.get("state", {}).get("waiting") or {}
        if waiting.get("reason") in reasons:
            return waiting
    return None


def test_an_unknown_image_is_an_image_pull_error(cluster: Cluster, cluster_namespace: str) -> None:
    """An image the node cannot pull: the pod stays Pending with ErrImagePull, then ImagePullBackOff."""
    ns = cluster_namespace
    cluster.api.create(f"/api/v1/namespaces/{ns}/pods", pod_body("typo", "ghcr.io/spin-selfplay/spin-trainr:0.1.0"))
    waiting = cluster.api.wait_for(
        "ImagePullBackOff",
        lambda: waiting_reason(cluster, ns, "typo", {"ImagePullBackOff"}),
        timeout=60,
        describe=lambda: cluster.describe(ns),
    )
    assert waiting["message"].startswith('Back-off pulling image "ghcr.io/spin-selfplay/spin-trainr:0.1.0"')
    assert cluster.api.get(f"/api/v1/namespaces/{ns}/pods/typo")["status"]["phase"] == "Pending"


def test_run_as_non_root_refuses_an_image_that_runs_as_root(cluster: Cluster, cluster_namespace: str) -> None:
    """Pod-level runAsNonRoot with an alpine init container (no USER, so root), as the Training Operator injects
    into PyTorchJob workers: CreateContainerConfigError with the kubelet's message; the pod never initializes."""
    ns = cluster_namespace
    body = pod_body(
        "nonroot",
        "ghcr.io/spin-selfplay/spin-trainer:0.1.0",
        securityContext={"runAsNonRoot": True},
        initContainers=[{"name": "init-pytorch", "image": "alpine:3.10", "command": ["sh", "-c", "true"]}],
    )
    pod = cluster.api.create(f"/api/v1/namespaces/{ns}/pods", body)
    waiting = cluster.api.wait_for(
        "CreateContainerConfigError",
        lambda: waiting_reason(cluster, ns, "nonroot", {"CreateContainerConfigError"}, init=True),
        timeout=60,
        describe=lambda: cluster.describe(ns),
    )
    expected = (
        "container has runAsNonRoot and image will run as root "
        f'(pod: "nonroot_{ns}({pod["metadata"]["uid"]})", container: init-pytorch)'
    )
    assert waiting["message"] == expected
    status = cluster.api.get(f"/api/v1/namespaces/{ns}/pods/nonroot")["status"]
    initialized = next(c for c in status["conditions"] if c["type"] == "Initialized")
    assert status["phase"] == "Pending" and initialized["status"] == "False"


def test_deleting_a_running_pod_stops_its_process(cluster: Cluster, cluster_namespace: str) -> None:
    """A running pod deleted with a grace period: the kubelet sends SIGTERM (the program's handler runs) and
    completes the graceful deletion once the process has exited: the pod object disappears."""
    ns = cluster_namespace
    program = (
        "import signal, sys, time\n"
        "def bye(*_):\n"
        "    print('got SIGTERM', flush=True)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('up', flush=True)\n"
        "time.sleep(600)\n"
    )
    body = pod_body("sleeper", IMAGE, container={"command": ["python", "-c", program]})
    cluster.api.create(f"/api/v1/namespaces/{ns}/pods", body)
    path = f"/api/v1/namespaces/{ns}/pods/sleeper"
    cluster.api.wait_for(
        "pod sleeper to run",
        lambda: (
            (cluster.api.find(path) or {}).get("status", {}).get("phase") == "Running"
            and "up" in cluster.container_log(ns, "sleeper", "main")
        ),
        timeout=60,
        describe=lambda: cluster.describe(ns),
    )
    cluster.api.delete(path, {"gracePeriodSeconds": 30})
    cluster.api.wait_for(
        "pod sleeper to be deleted",
        lambda: cluster.api.find(path) is None,
        timeout=60,
        describe=lambda: cluster.describe(ns),
    )
    assert "got SIGTERM" in cluster.container_log(ns, "sleeper", "main")


def test_on_failure_restarts_the_container_in_the_same_pod(cluster: Cluster, cluster_namespace: str) -> None:
    """restartPolicy OnFailure: the container fails once (exit 7), the kubelet restarts it in the same pod (an
    emptyDir keeps what the first run wrote), the second run succeeds: one pod, restartCount 1, lastState exit 7."""
    ns = cluster_namespace
    program = (
        "import pathlib, sys\n"
        "mark = pathlib.Path('/scratch/tried')\n"
        "if not mark.exists():\n"
        "    mark.write_text('once')\n"
        "    sys.exit(7)\n"
        "print('second run')\n"
    )
    body = job(
        "retry",
        ["python", "-c", program],
        backoffLimit=3,
        restartPolicy="OnFailure",
        container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]},
        volumes=[{"name": "scratch", "emptyDir": {}}],
    )
    cluster.api.create(f"/apis/batch/v1/namespaces/{ns}/jobs", body)
    cluster.api.wait_for(
        "Job retry to be Complete",
        lambda: job_condition(cluster, ns, "retry", "Complete"),
        timeout=120,
        describe=lambda: cluster.describe(ns),
    )
    (pod,) = job_pods(cluster, ns, "retry")
    (status,) = pod["status"]["containerStatuses"]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 7
    assert status["state"]["terminated"]["exitCode"] == 0

"""`helm install` of charts/spin-operator on a real control plane (issue 14).

Real: kube-apiserver (the chart's CRD, RBAC and Deployment validated and admitted for real; the ServiceAccount's
token issued by the TokenRequest API and checked by the authenticator; RBAC enforced), the Deployment and ReplicaSet
controllers, the scheduler, helm (the pinned binary). Stand-in: the kubelet, which runs the operator pod's
container (`spin operator ...` as the chart writes it) as a local process with the image's user (uid 10001), the
projected ServiceAccount token at /var/run/secrets/kubernetes.io/serviceaccount and KUBERNETES_SERVICE_HOST/PORT
pointing at the test apiserver, and probes its /healthz for the startup and readiness probes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spin_core import spec
from tests.cluster.api import Api, ApiError, Credentials
from tests.cluster.controlplane import free_ports
from tests.fixtures.cluster import Cluster, spinruns_path
from tests.test_cluster_crd import CRD_NAME, delete_crd, established, tiny_spinrun

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

RELEASE = "spin"


@pytest.fixture(scope="module")
def release(cluster: Cluster) -> Iterator[dict[str, Any]]:
    """The chart installed with helm into a fresh namespace (the CRD from the chart's crds/, so any earlier copy is
    deleted first); the health port is a free one (pods share the host's network here). Uninstalled afterwards."""
    delete_crd(cluster)
    namespace = "spin-system"
    (port,) = free_ports(1)
    done = cluster.helm(
        "install", RELEASE, "charts/spin-operator", "--namespace", namespace, "--create-namespace",
        "--set", f"healthPort={port}",
    )  # fmt: skip
    try:
        yield {"namespace": namespace, "output": done.stdout}
    finally:
        cluster.helm("uninstall", RELEASE, "--namespace", namespace, "--wait", "--timeout", "2m", check=False)
        cluster.api.delete(f"/api/v1/namespaces/{namespace}")


def test_helm_install_creates_the_charts_crd(cluster: Cluster, release: dict[str, Any]) -> None:
    """helm install, on a cluster without the CRD, creates it from the chart's crds/ and it is Established."""
    cluster.api.wait_for("the chart's CRD to be Established", lambda: established(cluster, CRD_NAME), timeout=60)


def deployment(cluster: Cluster, namespace: str) -> dict[str, Any]:
    items = cluster.api.get(f"/apis/apps/v1/namespaces/{namespace}/deployments")["items"]
    assert len(items) == 1, [d["metadata"]["name"] for d in items]
    return items[0]


def available(cluster: Cluster, namespace: str) -> bool:
    status = deployment(cluster, namespace).get("status", {})
    conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
    return status.get("readyReplicas") == 1 and conditions.get("Available") == "True"


def operator_pod(cluster: Cluster, namespace: str) -> dict[str, Any]:
    pods = cluster.api.get(f"/api/v1/namespaces/{namespace}/pods")["items"]
    running = [p for p in pods if p["status"].get("phase") == "Running"]
    assert len(running) == 1, [(p["metadata"]["name"], p["status"].get("phase")) for p in pods]
    return running[0]


def mounted_token(cluster: Cluster, pod: dict[str, Any]) -> str:
    """The ServiceAccount token the kubelet mounted into the pod (its projected kube-api-access volume)."""
    volume = next(v["name"] for v in pod["spec"]["volumes"] if v["name"].startswith("kube-api-access-"))
    return (cluster.kubelet_root / "pods" / pod["metadata"]["uid"] / "volumes" / volume / "token").read_text()


def test_helm_install_brings_the_operator_to_ready_as_its_service_account(
    cluster: Cluster, release: dict[str, Any]
) -> None:
    """helm installs the chart's CRD, RBAC and Deployment; the Deployment becomes Available with its one pod Ready
    (kopf's /healthz answering the readiness probe), the pod runs as the chart's ServiceAccount, and the token it
    holds is that ServiceAccount's: the apiserver allows it what the chart's ClusterRole grants, and nothing else."""
    ns = release["namespace"]
    cluster.api.wait_for(
        "the operator Deployment to be Available",
        lambda: available(cluster, ns),
        timeout=180,
        describe=lambda: cluster.describe(ns),
    )
    pod = operator_pod(cluster, ns)
    sa_name = deployment(cluster, ns)["spec"]["template"]["spec"]["serviceAccountName"]
    assert pod["spec"]["serviceAccountName"] == sa_name
    assert all(c["ready"] for c in pod["status"]["containerStatuses"])

    token = mounted_token(cluster, pod)
    as_operator = Api(Credentials(cluster.server, cluster.ca_file, token=token), user_agent="spin-tests-as-operator")
    review = as_operator.create("/apis/authentication.k8s.io/v1/selfsubjectreviews", {})
    user = review["status"]["userInfo"]
    assert user["username"] == f"system:serviceaccount:{ns}:{sa_name}"
    assert user["extra"]["authentication.kubernetes.io/pod-name"] == [pod["metadata"]["name"]]
    # Within its ClusterRole: SpinRuns, Jobs. Outside it: Secrets, Deployments, deleting ConfigMaps.
    as_operator.get(f"/apis/{spec.GROUP}/{spec.VERSION}/spinruns")
    as_operator.get("/apis/batch/v1/jobs")
    for method, path in (
        ("GET", "/api/v1/namespaces/kube-system/secrets"),
        ("GET", f"/apis/apps/v1/namespaces/{ns}/deployments"),
        ("DELETE", "/api/v1/namespaces/default/configmaps/kube-root-ca.crt"),
    ):
        with pytest.raises(ApiError) as refused:
            as_operator.request(method, path)
        assert refused.value.status == 403, (method, path, refused.value)

    log = cluster.container_log(ns, pod["metadata"]["name"], "operator")
    assert "Forbidden" not in log and "status=403" not in log, log[-4000:]  # no call of its own was refused


def test_the_operator_pod_is_what_the_chart_says(cluster: Cluster, release: dict[str, Any]) -> None:
    """The pod as admitted: the chart's command, its security context (non-root uid 10001, read-only root), the
    ServiceAccount token volume added by the ServiceAccount admission plugin."""
    ns = release["namespace"]
    cluster.api.wait_for("the operator pod to run", lambda: operator_pod(cluster, ns), timeout=180,
                         describe=lambda: cluster.describe(ns))  # fmt: skip
    pod = operator_pod(cluster, ns)
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["spin"] and container["args"][:2] == ["operator", "--all-namespaces"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["runAsUser"] == 10001
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/var/run/secrets/kubernetes.io/serviceaccount" in mounts and "/tmp" in mounts
    spec_file = cluster.kubelet_root / "pods" / pod["metadata"]["uid"] / "containers" / "operator" / "spec-0.json"
    process = json.loads(spec_file.read_text())
    assert process["uid"] == 10001 and Path(process["argv"][0]).name == "spin"


def test_the_operator_acts_on_a_spinrun_as_its_service_account(
    cluster: Cluster, release: dict[str, Any], cluster_namespace: str
) -> None:
    """A SpinRun in another namespace: the operator, as its ServiceAccount, writes the run's status and creates its
    first children (whatever becomes of their pods), and none of its API calls is refused by RBAC."""
    ns = release["namespace"]
    cluster.api.wait_for("the operator Deployment to be Available", lambda: available(cluster, ns), timeout=180,
                         describe=lambda: cluster.describe(ns))  # fmt: skip
    run = tiny_spinrun(cluster_namespace)
    cluster.api.create(spinruns_path(cluster_namespace), run)
    path = f"{spinruns_path(cluster_namespace)}/{run['metadata']['name']}"
    cluster.api.wait_for(
        "the operator to write the SpinRun's status",
        lambda: (cluster.api.get(path).get("status") or {}).get("phase"),
        timeout=120,
        describe=lambda: cluster.describe(cluster_namespace) + "\n" + operator_log(cluster, ns)[-4000:],
    )
    jobs = cluster.api.get(f"/apis/batch/v1/namespaces/{cluster_namespace}/jobs")["items"]
    log = operator_log(cluster, ns)
    assert "Forbidden" not in log and "status=403" not in log, log[-4000:]
    assert jobs, f"no child Job; status {cluster.api.get(path).get('status')}\n{log[-4000:]}"


def operator_log(cluster: Cluster, namespace: str) -> str:
    return cluster.container_log(namespace, operator_pod(cluster, namespace)["metadata"]["name"], "operator")

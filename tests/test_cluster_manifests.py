"""The plain-YAML install (`kubectl apply -f manifests/crd/ -f manifests/operator/`) on the real control plane
(issue 14): what the README's "Without Helm" promises.

Real: kube-apiserver (the CRD, the RBAC, the Namespace and Deployment of manifests/operator/ admitted for real),
the Deployment/ReplicaSet/Job controllers, the scheduler, the Training Operator, the pinned kubectl, and the operator
pod running as the manifests' ServiceAccount. Stand-ins: the kubelet (containers as local processes) and the runs'
workload, the stub image (tests/cluster/stub/spin), whose steps succeed at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.control_plane import Release, create, stub_spinrun, unique_name, wait_status
from tests.fixtures.cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

MANIFESTS = ("-f", "manifests/crd/", "-f", "manifests/operator/")


@pytest.fixture(scope="module")
def applied(cluster: Cluster) -> Iterator[Release]:
    """manifests/ applied with kubectl; deleted afterwards (the CRD kept: other modules apply it as they need)."""
    done = cluster.kubectl("apply", *MANIFESTS)
    assert "deployment.apps/spin-operator created" in done.stdout, done.stdout
    try:
        yield Release(cluster, "spin-operator", "spin-system", [])
    finally:
        cluster.kubectl("delete", "-f", "manifests/operator/", "--wait=true", "--timeout=120s", check=False)


def test_kubectl_apply_of_the_manifests_runs_the_operator_and_a_run_to_the_end(
    cluster: Cluster, applied: Release, cluster_namespace: str
) -> None:
    """The operator of manifests/operator/ becomes Ready as its ServiceAccount and serves a SpinRun (children on the
    stub image) to Succeeded, every child created by the real controllers' rules, no API call refused."""
    (pod,) = applied.wait_ready()
    assert pod["spec"]["serviceAccountName"] == "spin-operator"
    name = unique_name("plain")
    create(cluster, stub_spinrun(name, cluster_namespace))
    final = wait_status(
        cluster, cluster_namespace, name, "Succeeded", lambda st: st if st.get("phase") == "Succeeded" else None,
        applied.describe,
    )  # fmt: skip
    assert final["iterations"][0]["phase"] == "Succeeded"
    log = applied.log()
    assert "Forbidden" not in log and "status=403" not in log, log[-4000:]

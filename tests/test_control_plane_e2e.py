"""The tiny SpinRun through the test control plane: helm-installed operator, generation Job, PyTorchJob, evaluation
Job, S3 (issue 14).

Real: etcd, kube-apiserver (the chart's CRD, RBAC and Deployment admitted; the operator's every call made with its
ServiceAccount's token and judged by RBAC), kube-controller-manager (Deployment, ReplicaSet, Job controllers, the
garbage collector), kube-scheduler, the Kubeflow Training Operator v1.9.4 (the PyTorchJob's Master pod, torchrun's
PET_* rendezvous variables), helm, the operator (`spin operator` as the chart runs it, in its pod), `spin generate`
/ `spin train` (under torchrun, 2 gloo ranks, DeepSpeed) / `spin evaluate` as the children's containers, and the S3
server (SeaweedFS, signatures checked) they read and publish to with the credentials Secret's keys.
Stand-in: the kubelet (tests/cluster/kubelet.py) runs each container as a local process on this machine with the
pod's env, volumes and user; the project's images are the checkout and its .venv, and the pods' DeepSpeed ops are
compiled once into a shared cache (`spec.pods.env` TORCH_EXTENSIONS_DIR) in place of the trainer image's prebuilt
ones. The inputs are a smaller spin_core.demo.prepare (64 training rows, 16 held-out, 20 SFT steps) to keep CI time
down; the SpinRun is manifests/examples/spinrun-tiny.yaml adapted as tests/e2e.py does it for a real cluster.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from spin_core import layout
from spin_core.store import Store
from tests import control_plane as cp
from tests.e2e import check_artefacts, check_status, pod_resources, prepare_inputs, spinrun_document, upload_inputs
from tests.fixtures.cluster import ROOT, Cluster
from tests.fixtures.s3 import S3Server

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

POD_EXTENSIONS = ROOT / ".cache" / "torch_extensions-pods"  # writable by the pods' uid (10001): see the docstring
TRAIN_ROWS, HELDOUT_ROWS, SHARDS = 64, 16, 2
RUN_TIMEOUT = 1500.0


def test_the_tiny_spinrun_runs_through_the_cluster(
    cluster: Cluster, cluster_namespace: str, s3_server: S3Server, s3_env: tuple[str, str], tmp_path: Path
) -> None:
    """helm install (namespaced), the demo's inputs in S3, a credentials Secret, the SpinRun -> Succeeded: both
    generation pods published their shards, the PyTorchJob's Master pod trained under torchrun with 2 ranks, the
    operator copied the trainer's termination message into status.iterations[].metrics, the evaluation pod's
    numbers are in the status, and the checkpoint and metrics are published (MANIFEST.json) in S3."""
    watch = cp.Stopwatch()
    ns, api = cluster_namespace, cluster.api
    endpoint, bucket = s3_env
    inputs_uri, storage_uri = f"s3://{bucket}/inputs", f"s3://{bucket}/run"

    demo = prepare_inputs(tmp_path / "demo", train_rows=TRAIN_ROWS, heldout_rows=HELDOUT_ROWS, sft_steps=20)
    upload_inputs(Store.open(inputs_uri, endpoint), demo)
    watch.mark("demo inputs built and uploaded")

    resources = pod_resources("1", "4Gi")
    values = {"generator": {"resources": resources}, "trainer": {"resources": resources}}
    with cp.installed(cluster, ns, ns, [ns], values) as release:
        release.wait_ready()
        watch.mark("operator pod Ready (helm install)")
        secret = {"metadata": {"name": "s3-credentials"},
                  "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key,
                                 "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}}  # fmt: skip
        api.create(f"/api/v1/namespaces/{ns}/secrets", secret)
        POD_EXTENSIONS.mkdir(parents=True, exist_ok=True)
        POD_EXTENSIONS.chmod(0o777)
        storage = {
            "uri": storage_uri,
            "endpoint": endpoint,
            "region": "us-east-1",
            "credentialsSecret": "s3-credentials",
        }
        doc = spinrun_document(
            "tiny", ns, inputs_uri, storage, resources, train_rows=TRAIN_ROWS, heldout_rows=HELDOUT_ROWS,
            iterations=1, generation={"shards": SHARDS},
            pods={"env": [{"name": "TORCH_EXTENSIONS_DIR", "value": str(POD_EXTENSIONS)}]},
        )  # fmt: skip
        cp.create(cluster, doc)

        seen: list[str] = []

        def finished(status: dict[str, Any]) -> str | None:
            phase = status.get("phase")
            if phase and (not seen or seen[-1] != phase):
                seen.append(phase)
                watch.mark(f"phase {phase}: {status.get('message')}")
            return phase if phase in ("Succeeded", "Failed") else None

        cp.wait_status(cluster, ns, "tiny", "Succeeded or Failed", finished, release.describe, timeout=RUN_TIMEOUT)
        status = cp.status(cluster, ns, "tiny")
        store = Store.open(storage_uri, endpoint)
        problems = check_status(status, storage_uri, iterations=1) or check_artefacts(store, status)
        assert not problems, "\n".join(problems) + f"\nstatus: {json.dumps(status, indent=1)}\n{release.describe()}"
        assert seen[:3] == ["Generating", "Training", "Evaluating"], seen

        # Generation: one pod per shard, each published its shard.
        kids = cp.children(cluster, ns, "tiny")
        assert cp.names(kids["jobs"]) == ["tiny-i1-eval", "tiny-i1-gen"]
        assert cp.names(kids["pytorchjobs"]) == ["tiny-i1-train"]
        gen_pods = [p for p in kids["pods"] if p["metadata"]["labels"].get("selfplay.dev/step") == "generate"]
        assert len(gen_pods) == SHARDS and all(p["status"]["phase"] == "Succeeded" for p in gen_pods)
        for index in range(SHARDS):
            assert store.is_published(layout.shard(1, index, SHARDS)), f"shard {index} of {SHARDS} not published"

        # Training: the Training Operator's Master pod ran torchrun with 2 ranks; its termination message is the
        # trainer's summary, whose metrics the operator put into the status.
        master = api.get(f"/api/v1/namespaces/{ns}/pods/tiny-i1-train-master-0")
        assert master["metadata"]["labels"]["training.kubeflow.org/replica-type"] == "master"
        terminated = master["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 0, terminated
        summary = json.loads(terminated["message"].strip().splitlines()[-1])
        record = status["iterations"][0]
        assert record["metrics"] == summary["metrics"] and record["checkpoint"] == summary["checkpoint"]
        assert record["metrics"]["pairs/trained"] == TRAIN_ROWS
        master_log = cluster.container_log(ns, "tiny-i1-train-master-0", "pytorch")
        assert re.search(r"\bworld 2\b", master_log), master_log[-3000:]  # torchrun's 2 ranks, as the trainer says
        assert store.read_json(layout.metrics(1))["final"]["pairs/trained"] == TRAIN_ROWS

        # Evaluation: the numbers of eval.json, which its pod published, are in the status too (via its termination
        # message: the operator reads no S3).
        published = store.read_json(layout.evaluation(1))
        numbers = {k: v for k, v in published.items() if type(v) in (int, float) and math.isfinite(v)}
        assert "score" in numbers and record["evaluation"] == numbers, (record["evaluation"], published)
        watch.mark("checked status, pods and S3")

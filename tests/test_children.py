"""The objects the operator builds for a SpinRun (pure functions of the spec and the operator's config) and the
pieces of reading them back: pod settings and their merge, Kueue, retries, names, the operator's policy.

How the API server, the Job controller and the Training Operator treat these objects is tested on the real control
plane (tests/test_control_plane*.py); here, the rules that decide their content.
"""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any

import pytest
from spin_operator import children, policy
from spin_operator.config import MAX_RETRIES, Config
from spin_operator.observe import input_error, pod_problem
from spin_operator.status import drop_non_finite

from spin_core import spec as s
from spin_core.resource import parse

OWNER = {
    "apiVersion": "selfplay.dev/v1alpha1",
    "kind": "SpinRun",
    "metadata": {
        "name": "tiny",
        "namespace": "team-a",
        "uid": "u-1",
        "labels": {"team": "nlp", "kueue.x-k8s.io/queue-name": "copied-by-mistake"},
    },
}


def run(**spec: Any) -> s.SpinRun:
    doc = {
        "apiVersion": s.API_VERSION,
        "kind": s.KIND,
        "metadata": {"name": "tiny", "namespace": "team-a"},
        "spec": {
            "model": {"uri": "s3://models/m"},
            "dataset": {"uri": "s3://data/d.jsonl"},
            "storage": {"uri": "s3://runs/tiny", "credentialsSecret": "s3-credentials"},
            "training": {"nodes": 3, "processesPerNode": 8, "gpusPerNode": 8, "globalBatchSize": 192},
            **spec,
        },
    }
    return parse(doc)


def pod_of(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "Job":
        return obj["spec"]["template"]
    return obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]


def test_pod_settings_merge_operator_defaults_run_and_step():
    """The most specific level that sets a field wins; maps merge key by key; empty lists set nothing."""
    config = Config(
        pod_defaults=s.PodSettings.model_validate(
            {
                "priorityClassName": "batch-low",
                "nodeSelector": {"pool": "gpu", "zone": "a"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                "podAnnotations": {"sidecar.istio.io/inject": "false"},
                "scratchSize": "100Gi",
            }
        ),
        job_service_account="fallback-sa",
    )
    r = run(
        pods={"nodeSelector": {"zone": "b"}, "serviceAccountName": "spin-s3", "podLabels": {"cost": "42"}},
        training={
            "nodes": 1,
            "processesPerNode": 8,
            "gpusPerNode": 8,
            "globalBatchSize": 64,
            "nodeSelector": {"gpu": "h100"},
            "priorityClassName": "batch-high",
            "scratchSize": "500Gi",
            "tolerations": [],
        },
    )
    train = children.pod_settings(r, "train", config)
    assert train.node_selector == {"pool": "gpu", "zone": "b", "gpu": "h100"}
    assert train.priority_class_name == "batch-high" and train.scratch_size == "500Gi"
    assert train.service_account_name == "spin-s3"
    assert [t.key for t in train.tolerations] == ["nvidia.com/gpu"]  # an empty list sets nothing
    assert train.pod_annotations == {"sidecar.istio.io/inject": "false"} and train.pod_labels == {"cost": "42"}
    gen = children.pod_settings(r, "generate", config)
    assert gen.node_selector == {"pool": "gpu", "zone": "b"} and gen.priority_class_name == "batch-low"
    assert gen.scratch_size == "100Gi"
    assert children.pod_settings(run(), "evaluate", config).service_account_name == "fallback-sa"


def test_jobs_carry_identity_placement_env_volumes_and_scratch():
    r = run(
        pods={
            "serviceAccountName": "spin-s3",
            "imagePullSecrets": ["regcred"],
            "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
            "podLabels": {"cost": "42", children.RUN_LABEL: "someone-else"},
            "podAnnotations": {"sidecar.istio.io/inject": "false"},
            "env": [
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                {"name": "HF_HOME", "value": "/data/hf"},
            ],
            "volumes": [{"name": "data", "mountPath": "/data", "persistentVolumeClaim": "shared", "readOnly": True}],
            "scratchSize": "200Gi",
            "activeDeadlineSeconds": 3600,
        },
    )
    job = children.generation_job(r, OWNER, 1, 0, Config())
    template = pod_of(job)
    pod, (container,) = template["spec"], template["spec"]["containers"]
    assert pod["serviceAccountName"] == "spin-s3" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["affinity"] == {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    assert template["metadata"]["labels"]["cost"] == "42"
    assert template["metadata"]["labels"][children.RUN_LABEL] == "tiny"  # the operator's labels win
    assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    assert env["HF_HOME"] == {"name": "HF_HOME", "value": "/data/hf"}  # replaces the operator's own
    assert env["SPIN_CACHE_DIR"]["value"].startswith(children.SCRATCH) and len(env) == len(container["env"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"] == {"name": "data", "persistentVolumeClaim": {"claimName": "shared"}}
    assert volumes["scratch"] == {"name": "scratch", "emptyDir": {"sizeLimit": "200Gi"}}
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in container["volumeMounts"]
    assert container["resources"]["requests"]["ephemeral-storage"] == "200Gi"
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    claim = children.generation_job(run(pods={"scratchClaim": "big-disk", "scratchSize": "1Ti"}), OWNER, 1, 0, Config())
    scratch = next(v for v in pod_of(claim)["spec"]["volumes"] if v["name"] == "scratch")
    assert scratch == {"name": "scratch", "persistentVolumeClaim": {"claimName": "big-disk"}}
    assert "ephemeral-storage" not in json.dumps(claim)  # a claim is not node disk


def test_queued_children_start_suspended_with_kueue_labels_and_the_owners_are_not_copied():
    plain = children.generation_job(run(), OWNER, 1, 0, Config())
    assert plain["spec"]["suspend"] is False
    assert plain["metadata"]["labels"]["team"] == "nlp"
    assert not [k for k in plain["metadata"]["labels"] if k.startswith("kueue.x-k8s.io/")]
    queued = run(queueName="team-a-gpus", workloadPriorityClass="research")
    for obj in (
        children.generation_job(queued, OWNER, 1, 0, Config()),
        children.training_job(queued, OWNER, 1, 0, Config()),
    ):
        labels = obj["metadata"]["labels"]
        assert labels[children.QUEUE_LABEL] == "team-a-gpus" and labels[children.PRIORITY_LABEL] == "research"
        suspended = obj["spec"]["suspend"] if obj["kind"] == "Job" else obj["spec"]["runPolicy"]["suspend"]
        assert suspended is True


def test_training_replicas_restart_on_signals_only_and_leave_room_for_the_init_container():
    r = run(
        training={"nodes": 3, "processesPerNode": 8, "gpusPerNode": 8, "globalBatchSize": 192, "priorityClassName": "p"}
    )
    job = children.training_job(r, OWNER, 1, 0, Config())
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        assert replica["restartPolicy"] == "ExitCode"
        pod = replica["template"]["spec"]
        assert "restartPolicy" not in pod  # the Training Operator sets it (and warns per pod when we do)
        assert "runAsNonRoot" not in pod["securityContext"]  # its init-pytorch container runs as root
        assert pod["containers"][0]["securityContext"]["runAsNonRoot"] is True
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 3, "priorityClass": "p"}
    one_node = children.training_job(
        run(training={"nodes": 1, "processesPerNode": 1, "gpusPerNode": 1, "globalBatchSize": 8}), OWNER, 1, 0, Config()
    )
    assert "schedulingPolicy" not in one_node["spec"]["runPolicy"]
    # Generation and evaluation pods keep pod-level runAsNonRoot and never restart in place.
    gen = pod_of(children.generation_job(r, OWNER, 1, 0, Config()))["spec"]
    assert gen["securityContext"]["runAsNonRoot"] is True and gen["restartPolicy"] == "Never"


def test_the_longest_child_names_are_dns_1035_labels():
    """What the Training Operator derives from the longest run name at the last iteration and attempt: the
    PyTorchJob (its webhook checks DNS-1035), its replica Services and pods (<= 63 characters)."""
    name = "a" + "b" * (s.MAX_NAME_LENGTH - 1)
    job = children.child_name(name, s.MAX_ITERATIONS, "train", MAX_RETRIES)
    generation = children.child_name(name, s.MAX_ITERATIONS, "generate", MAX_RETRIES)
    derived = [job, f"{job}-master-0", f"{job}-worker-{1024 - 2}", f"{generation}-1023"]
    for text in derived:
        assert len(text) <= 63 and re.fullmatch(s.DNS1035_LABEL, text), text
    with pytest.raises(ValueError, match="SPIN_CHILD_RETRIES must be between 0 and 9"):
        Config(max_retries=10)


def test_the_policy_refuses_foreign_registries_and_unlisted_secrets():
    r = run(
        generation={"image": "docker.io/evil/miner:1"},
        pods={
            "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "prod-db", "key": "password"}}}],
            "volumes": [{"name": "keys", "mountPath": "/keys", "secret": "signing-keys"}],
            "imagePullSecrets": ["regcred"],
        },
    )
    assert policy.violations(r, Config()) == []  # no allow-lists: anything the author could do alone
    config = Config(allowed_registries=("registry.example.com/ml/",), allowed_secrets=("s3-credentials", "regcred"))
    problems = policy.violations(r, config)
    assert problems == [
        "spec.generation.image: 'docker.io/evil/miner:1' is not from an allowed registry (registry.example.com/ml/): "
        "ask the operator's administrators",
        "spec.pods.env[0].valueFrom.secretKeyRef: Secret 'prod-db' is not one this operator lets runs use "
        "(allowed: s3-credentials, regcred)",
        "spec.pods.volumes[0].secret: Secret 'signing-keys' is not one this operator lets runs use "
        "(allowed: s3-credentials, regcred)",
    ]
    assert policy.violations(run(), Config(allowed_secrets=())) == [
        "spec.storage.credentialsSecret: Secret 's3-credentials' is not one this operator lets runs use (allowed: none)"
    ]


def test_non_finite_numbers_never_reach_a_status_patch():
    status = {"iterations": [{"metrics": {"loss": math.nan, "acc": 0.5, "margin": -math.inf}, "summary": "NaN"}]}
    drop_non_finite(status)
    assert status == {"iterations": [{"metrics": {"acc": 0.5}, "summary": "NaN"}]}
    json.dumps(status, allow_nan=False)


def _pod(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "tiny-i1-gen-0-x"}, "status": {"phase": "Pending", **status}}


def test_stuck_pods_are_recognised_by_the_kubelets_and_schedulers_reasons():
    waiting = {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x"'}}
    assert pod_problem(_pod(containerStatuses=[{"name": "generate", "state": waiting}])) == (
        "ImagePullBackOff",
        'pod tiny-i1-gen-0-x, container generate: Back-off pulling image "x"',
    )
    init = {"waiting": {"reason": "CreateContainerConfigError", "message": "container has runAsNonRoot"}}
    assert pod_problem(_pod(initContainerStatuses=[{"name": "init-pytorch", "state": init}]))[0] == (
        "CreateContainerConfigError"
    )
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes"}
    assert pod_problem(_pod(conditions=[unschedulable])) == (
        "Unschedulable",
        "pod tiny-i1-gen-0-x cannot be scheduled: 0/3 nodes",
    )
    starting = {"waiting": {"reason": "ContainerCreating"}}
    assert pod_problem(_pod(containerStatuses=[{"name": "generate", "state": starting}])) is None
    done = copy.deepcopy(_pod(containerStatuses=[{"name": "generate", "state": waiting}]))
    done["status"]["phase"] = "Failed"
    assert pod_problem(done) is None


def test_bad_input_is_recognised_by_exit_code_or_by_the_jobs_message():
    def terminated(code: int, message: str = "") -> dict[str, Any]:
        state = {"terminated": {"exitCode": code, "message": message}}
        return {"status": {"containerStatuses": [{"name": "pytorch", "state": state}]}}

    assert input_error(terminated(2), "pytorch")
    assert input_error(terminated(1, 'noise\n{"error": "input", "message": "bad row"}'), "pytorch")  # under torchrun
    assert not input_error(terminated(1, "Traceback ... CUDA out of memory"), "pytorch")
    assert not input_error(terminated(137), "pytorch")
    assert not input_error(terminated(2), "other-container")

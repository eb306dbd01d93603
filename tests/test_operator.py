"""The operator, for real: kopf and spin_operator run (in their own thread and event loop) against an emulated
Kubernetes API server (kmock, over HTTP; tests/fixtures/kube.py lists its gaps and the shims).

Nothing runs pods here. Where a cluster's Job controller, the Kubeflow Training Operator and the kubelet would
move the children along, the tests write the children's statuses themselves, through the API (`FakeCluster`,
`AutoCluster`), so that the operator sees ordinary watch events. kmock does no garbage collection and no schema
validation either: the tests say where that matters.

Every API request the operator makes here is recorded into tests/data/operator_api_requests.json.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from spin_core.resource import parse
from tests.fixtures.kube import (
    CONFIGMAPS,
    EVENTS,
    JOBS,
    PYTORCHJOBS,
    SPINRUNS,
    TRAINJOBS,
    WORKLOADS,
    AutoCluster,
    FakeCluster,
    KubeAPI,
    start_operator,
)

NS = "default"
pytestmark = pytest.mark.timeout(120)


def spinrun(name: str = "tiny", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SpinRun",
        "metadata": {"name": name, "labels": {"team": "nlp"}},
        "spec": {
            "model": {"uri": "s3://models/zephyr-sft"},
            "dataset": {"uri": "s3://data/ultrachat.jsonl"},
            "storage": {"uri": f"s3://runs/{name}"},
            "iterations": 1,
            "generation": {"shards": 1, "gpusPerShard": 0},
            "training": {"nodes": 1, "processesPerNode": 1, "gpusPerNode": 0, "globalBatchSize": 8},
        },
    }
    body["spec"].update(spec)
    return body


async def create(kube: KubeAPI, body: dict[str, Any], namespace: str = NS) -> dict[str, Any]:
    return await kube.call("POST", f"/apis/selfplay.dev/v1alpha1/namespaces/{namespace}/spinruns", body)


async def patch_spec(kube: KubeAPI, name: str, spec: dict[str, Any], namespace: str = NS) -> None:
    await kube.call(
        "PATCH", f"/apis/selfplay.dev/v1alpha1/namespaces/{namespace}/spinruns/{name}", {"spec": spec}, patch=True
    )


def status(kube: KubeAPI, name: str, namespace: str = NS) -> dict[str, Any]:
    obj = kube.obj(SPINRUNS, namespace, name)
    return (obj or {}).get("status") or {}


def condition(kube: KubeAPI, name: str, type_: str, namespace: str = NS) -> dict[str, Any]:
    return next((c for c in status(kube, name, namespace).get("conditions", []) if c["type"] == type_), {})


async def wait_for(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll the emulated cluster's state (the test's view, not the operator's) until `check` is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def wait_child(kube: KubeAPI, resource: str, name: str, namespace: str = NS) -> dict[str, Any]:
    return await wait_for(lambda: kube.obj(resource, namespace, name), f"{resource} {name}")


async def wait_phase(kube: KubeAPI, name: str, phase: str, namespace: str = NS, timeout: float = 15.0) -> dict:
    await wait_for(lambda: status(kube, name, namespace).get("phase") == phase, f"{name} phase {phase}", timeout)
    return status(kube, name, namespace)


def operator_creates(kube: KubeAPI) -> list[str]:
    """Names of objects the operator POSTed, in order (events excluded)."""
    out = []
    for r in kube.requests_by():
        agent = r.headers.get("User-Agent", "")
        if r.method == "POST" and agent.startswith("spin-operator") and isinstance(r.data, dict):
            out.append(r.data.get("metadata", {}).get("name"))
    return out


def events_of(kube: KubeAPI, name: str, namespace: str = NS) -> list[tuple[str, str, str]]:
    out = []
    for ev_name in kube.names(EVENTS, namespace):
        ev = kube.obj(EVENTS, namespace, ev_name) or {}
        if ev.get("involvedObject", {}).get("name") == name:
            out.append((ev.get("type"), ev.get("reason"), ev.get("message")))
    return out


def uid_of(kube: KubeAPI, name: str, namespace: str = NS) -> str:
    return (kube.obj(SPINRUNS, namespace, name) or {})["metadata"]["uid"]


@pytest.fixture()
async def operator(kube: KubeAPI, operator_config: Any):
    op = await start_operator(config=operator_config)
    yield op
    await op.stop()


# -- a whole run ---------------------------------------------------------------------------------------------------
async def test_three_iterations_run_to_success_with_children_in_order(kube: KubeAPI, operator: Any) -> None:
    """generate(1) -> train(1) -> generate(2) -> ... -> train(3) -> Succeeded, each child created once, only after
    its predecessor finished; the trainer's summary (Master pod termination message) lands in the records.
    The test plays the Job controller and the Training Operator (kmock runs nothing)."""
    fake = FakeCluster(kube)
    await create(kube, spinrun(iterations=3, generation={"shards": 2, "gpusPerShard": 0}))
    for t in (1, 2, 3):
        await wait_child(kube, JOBS, f"tiny-i{t}-gen")
        await wait_for(
            lambda t=t: (
                status(kube, "tiny").get("phase") == "Generating" and status(kube, "tiny").get("progress") == f"{t}/3"
            ),
            f"Generating {t}/3",
        )
        assert kube.obj(PYTORCHJOBS, NS, f"tiny-i{t}-train") is None, "training must wait for generation"
        await fake.run_job(NS, f"tiny-i{t}-gen", completed="1")
        await wait_for(lambda: status(kube, "tiny")["iterations"][-1].get("shardsDone") == 1, "1/2 shards")
        assert kube.obj(PYTORCHJOBS, NS, f"tiny-i{t}-train") is None, "half the shards are not enough"
        await fake.complete_job(NS, f"tiny-i{t}-gen")
        await wait_child(kube, PYTORCHJOBS, f"tiny-i{t}-train")
        await wait_phase(kube, "tiny", "Training")
        assert kube.obj(JOBS, NS, f"tiny-i{t + 1}-gen") is None
        await fake.run_pytorchjob(NS, f"tiny-i{t}-train")
        summary = {
            "metrics": {"loss": round(0.6 / t, 3), "rewards/accuracy": 0.5 + t / 10},
            "checkpoint": f"s3://runs/tiny/iter-{t}/checkpoint",
        }
        await fake.succeed_pytorchjob(NS, f"tiny-i{t}-train", summary)

    final = await wait_phase(kube, "tiny", "Succeeded")
    assert final["latestCheckpoint"] == "s3://runs/tiny/iter-3/checkpoint"
    assert final["progress"] == "3/3" and final["iteration"] == 3
    assert final["observedGeneration"] == 1
    await wait_for(lambda: len([r for r in status(kube, "tiny")["iterations"] if "summary" in r]) == 3, "summaries")
    records = status(kube, "tiny")["iterations"]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    for t, rec in enumerate(records, start=1):
        assert rec["phase"] == "Succeeded"
        assert rec["generationJob"] == f"tiny-i{t}-gen" and rec["trainingJob"] == f"tiny-i{t}-train"
        assert rec["shards"] == 2 and rec["shardsDone"] == 2
        assert rec["startedAt"] <= rec["finishedAt"]
        assert rec["metrics"] == {"loss": round(0.6 / t, 3), "rewards/accuracy": 0.5 + t / 10}
        assert rec["checkpoint"] == f"s3://runs/tiny/iter-{t}/checkpoint"
    conds = {c["type"]: c for c in final["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Ready"]["reason"] == "Succeeded"
    assert conds["Progressing"]["status"] == "False"
    assert conds["Failed"]["status"] == "False" and conds["Degraded"]["status"] == "False"
    assert conds["SpecAccepted"]["status"] == "True"
    assert all(c["lastTransitionTime"] and c["observedGeneration"] == 1 for c in conds.values())

    expected = ["tiny-spec"] + [n for t in (1, 2, 3) for n in (f"tiny-i{t}-gen", f"tiny-i{t}-train")]
    assert operator_creates(kube) == expected
    await wait_for(lambda: "Succeeded" in [r for _, r, _ in events_of(kube, "tiny")], "the Succeeded event")
    reasons = Counter(reason for _, reason, _ in events_of(kube, "tiny"))
    assert reasons["Created"] == 6 and reasons["GenerationComplete"] == 3 and reasons["TrainingComplete"] == 3
    assert reasons["Generating"] == 3 and reasons["Training"] == 3 and reasons["Succeeded"] == 1


async def test_children_carry_the_spec_owner_labels_and_safe_pod_settings(kube: KubeAPI, operator: Any) -> None:
    """The generation Job and the PyTorchJob as created: Indexed, GPUs, placement, S3 settings, the spec
    ConfigMap, owner references and labels; commands are argument lists (no shell)."""
    fake = FakeCluster(kube)
    body = spinrun(
        iterations=2,
        storage={
            "uri": "s3://runs/tiny",
            "endpoint": "http://minio.storage:9000",
            "region": "eu-west-1",
            "credentialsSecret": "s3-credentials",
        },
        generation={
            "shards": 4,
            "gpusPerShard": 2,
            "backoffLimitPerIndex": 3,
            "image": "registry.local/gen:1",
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "resources": {"requests": {"cpu": 8, "memory": "64Gi"}, "limits": {"memory": "64Gi"}},
        },
        training={
            "nodes": 3,
            "processesPerNode": 8,
            "gpusPerNode": 8,
            "globalBatchSize": 96,
            "microBatchSize": 4,
            "backoffLimit": 4,
        },
        schedule=[{"iteration": 2, "learningRate": 1e-7}],
    )
    created = await create(kube, body)
    uid = created["metadata"]["uid"]
    owner = {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SpinRun",
        "name": "tiny",
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }

    cm = await wait_child(kube, CONFIGMAPS, "tiny-spec")
    assert cm["metadata"]["ownerReferences"] == [owner]
    document = json.loads(cm["data"]["run.json"])
    resolved = parse(body).to_document()
    assert document["spec"] == resolved["spec"]  # defaults filled in, e.g. training.beta
    assert document["spec"]["training"]["beta"] == 0.1 and document["metadata"]["name"] == "tiny"

    job = await wait_child(kube, JOBS, "tiny-i1-gen")
    meta, spec = job["metadata"], job["spec"]
    assert meta["ownerReferences"] == [owner]
    for key, value in {
        "selfplay.dev/run": "tiny",
        "selfplay.dev/iteration": "1",
        "selfplay.dev/step": "generate",
        "selfplay.dev/attempt": "0",
        "team": "nlp",
    }.items():
        assert meta["labels"][key] == value
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 4
    assert spec["backoffLimitPerIndex"] == 3
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in (
        spec["podFailurePolicy"]["rules"]
    )
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["suspend"] is False
    pod = spec["template"]["spec"]
    assert spec["template"]["metadata"]["labels"]["selfplay.dev/run"] == "tiny"
    assert pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert container["image"] == "registry.local/gen:1"
    assert container["command"] == ["spin"]
    assert container["args"] == ["generate", "--spec", "/etc/spin/run.json", "--iteration", "1"]
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "2"},
    }
    assert {"name": "AWS_ENDPOINT_URL", "value": "http://minio.storage:9000"} in container["env"]
    assert {"name": "AWS_REGION", "value": "eu-west-1"} in container["env"]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    assert not any("SECRET" in e["name"] or "KEY" in e["name"] for e in container["env"])
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {"name": "spec", "mountPath": "/etc/spin", "readOnly": True} in container["volumeMounts"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["spec"]["configMap"] == {"name": "tiny-spec", "items": [{"key": "run.json", "path": "run.json"}]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}

    await fake.complete_job(NS, "tiny-i1-gen")
    pj = await wait_child(kube, PYTORCHJOBS, "tiny-i1-train")
    assert pj["metadata"]["ownerReferences"] == [owner]
    assert pj["metadata"]["labels"]["selfplay.dev/step"] == "train"
    pspec = pj["spec"]
    assert pspec["nprocPerNode"] == "8"
    assert pspec["runPolicy"]["backoffLimit"] == 4
    assert pspec["runPolicy"]["cleanPodPolicy"] in ("None", "Running")
    assert pspec["runPolicy"]["suspend"] is False
    replicas = pspec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    for replica in replicas.values():
        tpod = replica["template"]["spec"]
        (c,) = tpod["containers"]
        assert c["name"] == "pytorch"
        assert c["image"] == operator.controller.config.trainer_image  # spec.training.image is empty
        assert c["command"] == ["torchrun"]
        assert c["args"] == [
            "--nnodes",
            "3",
            "--nproc-per-node",
            "8",
            "--no-python",
            "spin",
            "train",
            "--spec",
            "/etc/spin/run.json",
            "--iteration",
            "1",
        ]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in tpod["volumes"]
        assert c["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    # No spec value is ever part of a shell command line.
    for obj in (job, pj):
        text = json.dumps(obj)
        assert '"sh"' not in text and '"-c"' not in text and "bash" not in text


async def test_a_one_node_training_job_has_no_worker_replicas(kube: KubeAPI, operator: Any) -> None:
    await create(kube, spinrun())
    await wait_child(kube, JOBS, "tiny-i1-gen")
    await FakeCluster(kube).complete_job(NS, "tiny-i1-gen")
    pj = await wait_child(kube, PYTORCHJOBS, "tiny-i1-train")
    assert set(pj["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    limits = pj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in json.dumps(limits)  # gpusPerNode 0: no GPU request at all


# -- failures --------------------------------------------------------------------------------------------------------
async def test_a_failed_child_is_recreated_with_backoff_then_the_run_fails(kube: KubeAPI, operator: Any) -> None:
    """The test fails the generation Job three times (kmock runs nothing): the operator deletes and recreates it
    twice (max_retries 2), counting in the status, then fails the run naming the child and its pod's message."""
    fake = FakeCluster(kube)
    await create(kube, spinrun())
    names = ["tiny-i1-gen", "tiny-i1-gen-r1", "tiny-i1-gen-r2"]
    for attempt, name in enumerate(names):
        await wait_child(kube, JOBS, name)
        if attempt:
            await wait_for(lambda a=attempt: kube.obj(JOBS, NS, names[a - 1]) is None, "the failed attempt deleted")
            rec = status(kube, "tiny")["iterations"][0]
            assert rec["generateRetries"] == attempt and rec["retries"] == attempt
        await fake.fail_job(NS, name, pod_message=f"CUDA out of memory (attempt {attempt})")
    final = await wait_phase(kube, "tiny", "Failed")
    failed = condition(kube, "tiny", "Failed")
    assert failed["status"] == "True" and failed["reason"] == "GenerationFailed"
    assert "Job tiny-i1-gen-r2 failed" in failed["message"]
    assert "CUDA out of memory (attempt 2)" in failed["message"]
    assert "no retries left" in final["message"]
    assert condition(kube, "tiny", "Ready")["status"] == "False"
    assert condition(kube, "tiny", "Progressing")["status"] == "False"
    assert final["iterations"][0]["phase"] == "Failed"
    await asyncio.sleep(0.3)
    assert kube.names(JOBS, NS) == ["tiny-i1-gen-r2"]  # no fourth attempt; the last one stays for inspection
    assert kube.names(PYTORCHJOBS, NS) == []
    await wait_for(lambda: ("Warning", "Failed") in [(t, r) for t, r, _ in events_of(kube, "tiny")], "the Event")
    warnings = [(reason, message) for type_, reason, message in events_of(kube, "tiny") if type_ == "Warning"]
    assert [r for r, _ in warnings].count("ChildFailed") == 3
    assert [r for r, _ in warnings].count("Retrying") == 2
    assert ("Failed", final["message"]) in warnings


async def test_a_training_failure_is_retried_and_the_run_recovers(kube: KubeAPI, operator: Any) -> None:
    """The PyTorchJob fails once (the test writes its Failed condition and the Master pod's log tail); the
    recreated one succeeds; the run completes, remembering the retry."""
    fake = FakeCluster(kube)
    await create(kube, spinrun())
    await wait_child(kube, JOBS, "tiny-i1-gen")
    await fake.complete_job(NS, "tiny-i1-gen")
    await wait_child(kube, PYTORCHJOBS, "tiny-i1-train")
    await fake.fail_pytorchjob(NS, "tiny-i1-train", pod_message="RuntimeError: NCCL watchdog timeout")
    await wait_child(kube, PYTORCHJOBS, "tiny-i1-train-r1")
    degraded = await wait_for(
        lambda: condition(kube, "tiny", "Degraded").get("status") == "True" and condition(kube, "tiny", "Degraded"),
        "Degraded",
    )
    assert "NCCL watchdog timeout" in degraded["message"]
    assert kube.names(JOBS, NS) == ["tiny-i1-gen"]  # generation is not redone
    await fake.succeed_pytorchjob(NS, "tiny-i1-train-r1", {"metrics": {"loss": 0.2}})
    final = await wait_phase(kube, "tiny", "Succeeded")
    rec = final["iterations"][0]
    assert rec["trainRetries"] == 1 and rec["trainingJob"] == "tiny-i1-train-r1"
    await wait_for(lambda: status(kube, "tiny")["iterations"][0].get("metrics") == {"loss": 0.2}, "metrics")
    assert condition(kube, "tiny", "Degraded")["status"] == "False"


async def test_in_place_restarts_beyond_the_backoff_limit_count_as_a_failed_attempt(
    kube: KubeAPI, operator: Any
) -> None:
    """restartPolicy ExitCode recreates a signal-killed pod without a limit of its own: a crash that repeats (an OOM
    kill at the same step) would loop for ever. The operator counts the Restarting transitions of the current
    attempt and, past training.backoffLimit, retries the attempt like any failure.

    kmock, and the test as the Training Operator: the repeated kills are an injected fault (the real Training
    Operator's in-place restart is shown in tests/test_control_plane_defects.py, test 10)."""
    fake = FakeCluster(kube)
    await create(kube, spinrun(training={"nodes": 1, "processesPerNode": 1, "gpusPerNode": 0, "globalBatchSize": 8,
                                         "backoffLimit": 1}))  # fmt: skip
    await wait_child(kube, JOBS, "tiny-i1-gen")
    await fake.complete_job(NS, "tiny-i1-gen")
    await wait_child(kube, PYTORCHJOBS, "tiny-i1-train")
    for second in range(2):
        at = f"2026-12-07T10:00:0{second}Z"
        restarting = {"type": "Restarting", "status": "True", "reason": "PyTorchJobRestarting",
                      "message": "1 Master replica(s) failed.", "lastTransitionTime": at}  # fmt: skip
        await fake._status(PYTORCHJOBS, NS, "tiny-i1-train", {"conditions": [restarting]})
        await wait_for(lambda at=at: status(kube, "tiny")["iterations"][0].get("trainingRestartedAt") == at, "counted")
    await wait_child(kube, PYTORCHJOBS, "tiny-i1-train-r1")
    record = await wait_for(
        lambda: (lambda r: r if r.get("trainRetries") == 1 and "trainingRestarts" not in r else None)(
            status(kube, "tiny")["iterations"][0]
        ),
        "the retry recorded, its restarts counted afresh",
    )
    assert "restarted 2 times" in record["message"] and "training.backoffLimit 1" in record["message"]


# -- suspend, resume, spec changes ---------------------------------------------------------------------------------
async def test_suspend_and_resume_in_each_step(kube: KubeAPI, operator: Any) -> None:
    """spec.suspend reaches the running child (Job spec.suspend, PyTorchJob runPolicy.suspend); nothing new is
    created while suspended, even when a step finishes; resuming carries on."""
    fake = FakeCluster(kube)
    await create(kube, spinrun(iterations=2))
    await wait_child(kube, JOBS, "tiny-i1-gen")
    await patch_spec(kube, "tiny", {"suspend": True})
    await wait_for(lambda: kube.obj(JOBS, NS, "tiny-i1-gen")["spec"]["suspend"] is True, "Job suspended")
    suspended = await wait_phase(kube, "tiny", "Suspended")
    assert condition(kube, "tiny", "Progressing")["status"] == "False"
    assert suspended["iterations"][0]["phase"] == "Suspended"
    await patch_spec(kube, "tiny", {"suspend": False})
    await wait_for(lambda: kube.obj(JOBS, NS, "tiny-i1-gen")["spec"]["suspend"] is False, "Job resumed")
    await wait_phase(kube, "tiny", "Generating")

    # Suspended at a step boundary: generation finishes, training must not start.
    await patch_spec(kube, "tiny", {"suspend": True})
    await wait_phase(kube, "tiny", "Suspended")
    await fake.complete_job(NS, "tiny-i1-gen")
    await wait_for(lambda: "before training" in status(kube, "tiny").get("message", ""), "suspended before training")
    await asyncio.sleep(0.2)
    assert kube.obj(PYTORCHJOBS, NS, "tiny-i1-train") is None
    await patch_spec(kube, "tiny", {"suspend": False})
    pj = await wait_child(kube, PYTORCHJOBS, "tiny-i1-train")
    assert pj["spec"]["runPolicy"]["suspend"] is False

    await patch_spec(kube, "tiny", {"suspend": True})
    await wait_for(
        lambda: kube.obj(PYTORCHJOBS, NS, "tiny-i1-train")["spec"]["runPolicy"]["suspend"] is True,
        "PyTorchJob suspended",
    )
    await wait_phase(kube, "tiny", "Suspended")
    await patch_spec(kube, "tiny", {"suspend": False})
    await wait_for(
        lambda: kube.obj(PYTORCHJOBS, NS, "tiny-i1-train")["spec"]["runPolicy"]["suspend"] is False,
        "PyTorchJob resumed",
    )
    await fake.succeed_pytorchjob(NS, "tiny-i1-train", {"metrics": {"loss": 0.4}})
    await wait_child(kube, JOBS, "tiny-i2-gen")
    await fake.complete_job(NS, "tiny-i2-gen")
    await wait_child(kube, PYTORCHJOBS, "tiny-i2-train")
    await fake.succeed_pytorchjob(NS, "tiny-i2-train", {"metrics": {"loss": 0.3}})
    await wait_phase(kube, "tiny", "Succeeded")
    reasons = [reason for _, reason, _ in events_of(kube, "tiny")]
    assert reasons.count("Suspended") >= 3 and reasons.count("Resumed") >= 2


def marked(child: dict[str, Any]) -> bool:
    """Whether a child carries the operator's suspended-by annotation."""
    return "selfplay.dev/suspended-by" in (child["metadata"].get("annotations") or {})


async def test_suspending_a_queued_run_deactivates_its_kueue_workload(kube: KubeAPI, operator: Any) -> None:
    """A queued child's `suspend` is Kueue's: spec.suspend deactivates the child's Workload (found by Kueue's job-uid
    label) and only marks the child; spec.suspend false reactivates it and unmarks the child. The test stands in for
    Kueue (it makes the Workload and writes the child's suspend); tests/test_control_plane_kueue.py runs Kueue."""
    await create(kube, spinrun(queueName="team-a"))
    job = await wait_child(kube, JOBS, "tiny-i1-gen")
    assert job["spec"]["suspend"] is True
    path = f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{NS}/workloads"
    mine = {"job-tiny-i1-gen-1a2b3": job["metadata"]["uid"], "job-other-4c5d6": "another-uid"}
    for name, uid in mine.items():
        await kube.call("POST", path, {"metadata": {"name": name, "labels": {"kueue.x-k8s.io/job-uid": uid}},
                                       "spec": {"queueName": "team-a"}})  # fmt: skip
    job_path = f"/apis/batch/v1/namespaces/{NS}/jobs/tiny-i1-gen"
    await kube.call("PATCH", job_path, {"spec": {"suspend": False}}, patch=True)  # admitted
    await wait_phase(kube, "tiny", "Generating")

    await patch_spec(kube, "tiny", {"suspend": True})
    await wait_for(
        lambda: kube.obj(WORKLOADS, NS, "job-tiny-i1-gen-1a2b3")["spec"].get("active") is False, "deactivated"
    )
    await wait_for(lambda: marked(kube.obj(JOBS, NS, "tiny-i1-gen")), "the Job marked as suspended by the operator")
    assert kube.obj(JOBS, NS, "tiny-i1-gen")["spec"]["suspend"] is False  # left to Kueue
    assert "active" not in kube.obj(WORKLOADS, NS, "job-other-4c5d6")["spec"]
    await kube.call("PATCH", job_path, {"spec": {"suspend": True}}, patch=True)  # Kueue evicts it
    await wait_phase(kube, "tiny", "Suspended")

    await patch_spec(kube, "tiny", {"suspend": False})
    await wait_for(
        lambda: kube.obj(WORKLOADS, NS, "job-tiny-i1-gen-1a2b3")["spec"].get("active") is True, "reactivated"
    )
    await wait_for(lambda: "waiting for admission" in status(kube, "tiny").get("message", ""), "waiting for admission")
    job = kube.obj(JOBS, NS, "tiny-i1-gen")
    assert job["spec"]["suspend"] is True and not marked(job)  # Kueue resumes it once it admits it again


async def test_training_runtime_trains_with_kubeflow_trainer_v2(kube: KubeAPI, operator: Any) -> None:
    """training.runtime: each training step is a TrainJob on that ClusterTrainingRuntime, suspended and resumed
    through spec.suspend, retried on failure, and its rank-0 pod's summary lands in the status.

    kmock stands in for the API server and the test for Kubeflow Trainer v2 and JobSet (which do not run here):
    the TrainJob's content is checked against Trainer v2's real CRD schema on the real control plane
    (tests/test_control_plane_operator.py); here, the operator's reactions to its states."""
    fake = FakeCluster(kube)
    body = spinrun(
        training={"runtime": "torch-distributed", "nodes": 2, "processesPerNode": 4, "gpusPerNode": 4,
                  "globalBatchSize": 64},
        storage={"uri": "s3://runs/tiny", "credentialsSecret": "s3-credentials"},
    )  # fmt: skip
    created = await create(kube, body)
    await wait_child(kube, JOBS, "tiny-i1-gen")
    # The TrainJob exists already, without owner or labels (as made by a version of the operator that did not label
    # it): creating it gets 409, and it is adopted, not duplicated.
    from spin_operator import children

    orphan = children.trainjob(parse(body), created, 1, 0, operator.controller.config)
    orphan["metadata"].pop("ownerReferences")
    orphan["metadata"].pop("labels")
    await kube.call("POST", f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs", orphan)
    await fake.complete_job(NS, "tiny-i1-gen")
    await wait_for(lambda: kube.obj(TRAINJOBS, NS, "tiny-i1-train")["metadata"].get("ownerReferences"), "adopted")
    tj = kube.obj(TRAINJOBS, NS, "tiny-i1-train")
    assert kube.obj(PYTORCHJOBS, NS, "tiny-i1-train") is None
    spec = tj["spec"]
    assert spec["runtimeRef"] == {
        "name": "torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4
    assert trainer["command"] == ["torchrun"] and trainer["args"][:3] == ["--no-python", "spin", "train"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    env = {e["name"]: e for e in trainer["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}
    }
    (override,) = spec["podSpecOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    assert {v["name"] for v in override["volumes"]} == {"spec", "dshm", "scratch"}

    await patch_spec(kube, "tiny", {"suspend": True})
    await wait_for(lambda: kube.obj(TRAINJOBS, NS, "tiny-i1-train")["spec"]["suspend"] is True, "TrainJob suspended")
    await patch_spec(kube, "tiny", {"suspend": False})
    await wait_for(lambda: kube.obj(TRAINJOBS, NS, "tiny-i1-train")["spec"]["suspend"] is False, "TrainJob resumed")

    await fake.finish_trainjob(NS, "tiny-i1-train", succeeded=False, message="jobset failed: node-0 exit 1")
    retried = await wait_child(kube, TRAINJOBS, "tiny-i1-train-r1")
    assert retried["metadata"]["labels"]["selfplay.dev/attempt"] == "1"
    await wait_for(lambda: kube.obj(TRAINJOBS, NS, "tiny-i1-train") is None, "the failed attempt deleted")
    await fake.finish_trainjob(
        NS, "tiny-i1-train-r1", succeeded=True, message="done", summary={"metrics": {"loss": 0.25}, "checkpoint": None}
    )
    done = await wait_phase(kube, "tiny", "Succeeded")
    assert done["iterations"][0]["metrics"] == {"loss": 0.25}
    assert done["iterations"][0]["trainingJob"] == "tiny-i1-train-r1"


async def test_unsafe_spec_changes_are_rejected_and_safe_ones_applied(kube: KubeAPI, operator: Any) -> None:
    """After the run started, changing the shard count or an earlier iteration's schedule is refused with a
    condition (the run goes on with the accepted spec); more iterations and a later iteration's schedule apply.
    (The CRD would accept both kinds of edit: the rule is the operator's.)"""
    fake = FakeCluster(kube)
    await create(kube, spinrun(iterations=2))
    await wait_child(kube, JOBS, "tiny-i1-gen")
    before = kube.obj(CONFIGMAPS, NS, "tiny-spec")["data"]["run.json"]

    await patch_spec(kube, "tiny", {"generation": {"shards": 4, "gpusPerShard": 0}})
    rejected = await wait_for(
        lambda: (
            condition(kube, "tiny", "SpecAccepted").get("status") == "False" and condition(kube, "tiny", "SpecAccepted")
        ),
        "SpecAccepted False",
    )
    assert rejected["reason"] == "UnsafeSpecChange"
    assert "spec.generation.shards cannot change after the run started: 1 -> 4" in rejected["message"]
    assert rejected["observedGeneration"] == 2
    assert kube.obj(CONFIGMAPS, NS, "tiny-spec")["data"]["run.json"] == before
    assert kube.obj(JOBS, NS, "tiny-i1-gen")["spec"]["completions"] == 1
    # kopf posts Events from its own queue, after the status patch: wait for it rather than race it.
    await wait_for(lambda: "SpecRejected" in [reason for _, reason, _ in events_of(kube, "tiny")], "SpecRejected")

    await patch_spec(kube, "tiny", {"schedule": [{"iteration": 1, "beta": 0.5}]})
    await wait_for(
        lambda: "schedule entry of iteration 1" in condition(kube, "tiny", "SpecAccepted")["message"],
        "schedule of a started iteration refused",
    )

    await patch_spec(
        kube,
        "tiny",
        {
            "generation": {"shards": 1, "gpusPerShard": 0},
            "iterations": 3,
            "schedule": [{"iteration": 3, "learningRate": 1e-7}],
        },
    )
    await wait_for(lambda: condition(kube, "tiny", "SpecAccepted").get("status") == "True", "SpecAccepted True")
    document = json.loads(kube.obj(CONFIGMAPS, NS, "tiny-spec")["data"]["run.json"])
    assert document["spec"]["iterations"] == 3
    assert document["spec"]["schedule"] == [{"iteration": 3, "learningRate": 1e-7}]
    for t in (1, 2, 3):
        await wait_child(kube, JOBS, f"tiny-i{t}-gen")
        await fake.complete_job(NS, f"tiny-i{t}-gen")
        await wait_child(kube, PYTORCHJOBS, f"tiny-i{t}-train")
        await fake.succeed_pytorchjob(NS, f"tiny-i{t}-train", {"metrics": {"loss": 0.1}})
    final = await wait_phase(kube, "tiny", "Succeeded")
    assert final["latestCheckpoint"] == "s3://runs/tiny/iter-3/checkpoint"

    # A finished run can be extended: one more iteration.
    await patch_spec(kube, "tiny", {"iterations": 4})
    await wait_child(kube, JOBS, "tiny-i4-gen")
    await wait_phase(kube, "tiny", "Generating")


async def test_an_invalid_spec_fails_the_run_with_the_validation_message(kube: KubeAPI, operator: Any) -> None:
    """A SpinRun the CRD schema and CEL rules would reject (kmock validates nothing, as if they were bypassed):
    phase Failed with every problem listed, no child, no crash loop; the operator keeps serving other runs, and
    fixing the spec starts the run."""
    bad = spinrun("broken")
    bad["spec"]["training"] = {"globalBatchSize": 10, "microBatchSize": 4, "nodes": 1, "processesPerNode": 1}
    bad["spec"]["generation"] = {"shards": 0, "bogus": True}
    await create(kube, bad)
    final = await wait_phase(kube, "broken", "Failed")
    failed = condition(kube, "broken", "Failed")
    assert failed["reason"] == "InvalidSpec"
    message = final["message"]  # spin_core.resource's one line per problem, joined
    assert message.startswith("invalid spec: ")
    assert "spec.generation.shards: " in message and "greater than or equal to 1" in message
    assert "spec.generation.bogus: unknown field" in message
    assert "globalBatchSize" in message and "multiple" in message
    assert condition(kube, "broken", "SpecAccepted")["status"] == "False"
    # kopf posts Events in the background, after the status write that made the phase visible.
    await wait_for(lambda: ("Warning", "Failed") in [(t, r) for t, r, _ in events_of(kube, "broken")], "the Event")

    await create(kube, spinrun("good"))
    await wait_child(kube, JOBS, "good-i1-gen")
    assert kube.names(JOBS, NS) == ["good-i1-gen"] and kube.obj(CONFIGMAPS, NS, "broken-spec") is None

    fixed = spinrun("broken")["spec"]
    await kube.call(
        "PATCH",
        f"/apis/selfplay.dev/v1alpha1/namespaces/{NS}/spinruns/broken",
        {"spec": {"generation": None, "training": None}},
        patch=True,
    )
    await patch_spec(kube, "broken", {"generation": fixed["generation"], "training": fixed["training"]})
    await wait_child(kube, JOBS, "broken-i1-gen")
    await wait_phase(kube, "broken", "Generating")
    assert condition(kube, "broken", "Failed")["status"] == "False"


# -- deletion, restarts, adoption ----------------------------------------------------------------------------------
async def test_deleting_a_run_leaves_its_children_to_the_garbage_collector(kube: KubeAPI, operator: Any) -> None:
    """Children are owned by the run (ownerReferences with its uid), so Kubernetes deletes them with it. kmock has
    no garbage collector: the test checks the references, sees the operator create nothing more, then runs
    one explicit GC pass (`collect_garbage`) to show that every child would go."""
    fake = FakeCluster(kube)
    await create(kube, spinrun(iterations=2))
    uid = uid_of(kube, "tiny")
    await wait_child(kube, JOBS, "tiny-i1-gen")
    await fake.complete_job(NS, "tiny-i1-gen")
    await wait_child(kube, PYTORCHJOBS, "tiny-i1-train")
    await kube.call("DELETE", f"/apis/selfplay.dev/v1alpha1/namespaces/{NS}/spinruns/tiny")
    await wait_for(lambda: ("default", "tiny") not in operator.controller.states, "the operator forgets the run")
    await fake.succeed_pytorchjob(NS, "tiny-i1-train", {"metrics": {"loss": 0.1}})
    await asyncio.sleep(0.3)
    assert kube.obj(JOBS, NS, "tiny-i2-gen") is None
    children = [(CONFIGMAPS, "tiny-spec"), (JOBS, "tiny-i1-gen"), (PYTORCHJOBS, "tiny-i1-train")]
    for resource, name in children:
        refs = kube.obj(resource, NS, name)["metadata"]["ownerReferences"]
        assert [(r["kind"], r["name"], r["uid"], r["controller"]) for r in refs] == [("SpinRun", "tiny", uid, True)]
    removed = kube.collect_garbage()
    assert {"configmaps/tiny-spec", "jobs/tiny-i1-gen", "pytorchjobs/tiny-i1-train"} <= set(removed)
    assert not any(
        r.method == "DELETE" and r.headers.get("User-Agent", "").startswith("spin-operator") for r in kube.requests_by()
    )


async def test_killed_and_restarted_at_every_phase_without_duplicates(kube: KubeAPI, operator_config: Any) -> None:
    """The operator is killed (its tasks cancelled mid-flight) at every phase of a 2-iteration run, including
    right as it creates a child (before it can record it), and while down the children move on (the test plays
    the cluster). Each restart adopts what exists: every child is created exactly once and the run completes."""
    fake = FakeCluster(kube)
    kill_on: dict[str, Any] = {}

    def kill_when_created(resource: str, obj: dict[str, Any]) -> None:
        op = kill_on.get(obj.get("metadata", {}).get("name"))
        if op is not None and op.loop is not None and op.task is not None:
            op.loop.call_soon_threadsafe(op.task.cancel)  # mid-reconcile: the status is not written yet

    kube.created.append(kill_when_created)

    await create(kube, spinrun(iterations=2, generation={"shards": 2, "gpusPerShard": 0}))  # operator down
    op = await start_operator(config=operator_config)
    kill_on["tiny-i1-gen"] = op
    await wait_child(kube, JOBS, "tiny-i1-gen")
    await op.kill()

    op = await start_operator(config=operator_config)  # generation running
    await wait_for(
        lambda: status(kube, "tiny").get("iterations", [{}])[0].get("generationJob") == "tiny-i1-gen",
        "the restarted operator records the adopted Job",
    )
    await fake.run_job(NS, "tiny-i1-gen", completed="0")
    await wait_for(lambda: status(kube, "tiny")["iterations"][0]["shardsDone"] == 1, "1 shard")
    await op.kill()

    await fake.complete_job(NS, "tiny-i1-gen")  # generation finishes while the operator is down
    op = await start_operator(config=operator_config)
    kill_on["tiny-i1-train"] = op
    await wait_child(kube, PYTORCHJOBS, "tiny-i1-train")
    await op.kill()

    op = await start_operator(config=operator_config)  # training running
    await wait_phase(kube, "tiny", "Training")
    await op.kill()
    await fake.succeed_pytorchjob(NS, "tiny-i1-train", {"metrics": {"loss": 0.5}})  # finishes while down

    op = await start_operator(config=operator_config)
    await wait_child(kube, JOBS, "tiny-i2-gen")
    await op.stop()  # a graceful stop too
    await fake.complete_job(NS, "tiny-i2-gen")
    op = await start_operator(config=operator_config)
    await wait_child(kube, PYTORCHJOBS, "tiny-i2-train")
    await fake.succeed_pytorchjob(NS, "tiny-i2-train", {"metrics": {"loss": 0.25}})
    final = await wait_phase(kube, "tiny", "Succeeded")
    await op.kill()
    writes = len(kube.log)
    op = await start_operator(config=operator_config)  # a finished run: nothing to do
    await asyncio.sleep(0.3)
    await op.stop()

    assert final["latestCheckpoint"] == "s3://runs/tiny/iter-2/checkpoint"
    assert [r["metrics"] for r in status(kube, "tiny")["iterations"]] == [{"loss": 0.5}, {"loss": 0.25}]
    created = Counter(operator_creates(kube))
    assert created == {
        "tiny-i1-gen": 1,
        "tiny-i1-train": 1,
        "tiny-i2-gen": 1,
        "tiny-i2-train": 1,
        "tiny-spec": created["tiny-spec"],
    }  # the ConfigMap is re-asserted (409) on restarts
    assert kube.names(JOBS, NS) == ["tiny-i1-gen", "tiny-i2-gen"]
    assert kube.names(PYTORCHJOBS, NS) == ["tiny-i1-train", "tiny-i2-train"]
    late = [
        r
        for _, r in kube.log[writes:]
        if r.method in ("POST", "PATCH", "DELETE") and r.headers.get("User-Agent", "").startswith("spin-operator")
    ]
    assert late == [], "a restart over a finished run writes nothing"


async def test_an_existing_child_is_adopted_on_conflict(kube: KubeAPI, operator: Any) -> None:
    """A Job with the child's name already exists without owner or labels (e.g. created by hand, or by a
    version of the operator that did not label it): creating gets 409, the operator reads it, adopts it
    (owner reference + labels) and carries on with it instead of duplicating it."""
    await kube.call(
        "POST",
        f"/apis/batch/v1/namespaces/{NS}/jobs",
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "tiny-i1-gen"},
            "spec": {"completions": 1, "completionMode": "Indexed"},
        },
    )
    await kube.call(
        "POST",
        f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs",
        {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "tiny-i1-train"}, "spec": {}},
    )
    await create(kube, spinrun())
    await wait_for(lambda: kube.obj(JOBS, NS, "tiny-i1-gen")["metadata"].get("ownerReferences"), "adopted")
    job = kube.obj(JOBS, NS, "tiny-i1-gen")
    assert job["metadata"]["ownerReferences"][0]["uid"] == uid_of(kube, "tiny")
    assert job["metadata"]["labels"]["selfplay.dev/run"] == "tiny"
    await FakeCluster(kube).complete_job(NS, "tiny-i1-gen")
    # The training child too: a PyTorchJob of that name exists already, so it is adopted, not duplicated.
    await wait_for(lambda: kube.obj(PYTORCHJOBS, NS, "tiny-i1-train")["metadata"].get("ownerReferences"), "adopted")
    train = kube.obj(PYTORCHJOBS, NS, "tiny-i1-train")
    assert train["metadata"]["ownerReferences"][0]["uid"] == uid_of(kube, "tiny")
    assert train["metadata"]["labels"]["selfplay.dev/step"] == "train"
    assert kube.names(JOBS, NS) == ["tiny-i1-gen"]
    assert kube.names(PYTORCHJOBS, NS) == ["tiny-i1-train"]


async def test_the_trainer_summary_is_found_by_label_when_the_pod_name_differs(kube: KubeAPI, operator: Any) -> None:
    fake = FakeCluster(kube)
    await create(kube, spinrun())
    await wait_child(kube, JOBS, "tiny-i1-gen")
    await fake.complete_job(NS, "tiny-i1-gen")
    await wait_child(kube, PYTORCHJOBS, "tiny-i1-train")
    await fake.succeed_pytorchjob(
        NS, "tiny-i1-train", {"loss": 0.125, "checkpoint": "s3://elsewhere/ckpt"}, pod_name="tiny-i1-train-master-0-x1"
    )
    await wait_phase(kube, "tiny", "Succeeded")
    rec = await wait_for(
        lambda: "summary" in status(kube, "tiny")["iterations"][0] and status(kube, "tiny")["iterations"][0], "summary"
    )
    assert rec["metrics"] == {"loss": 0.125}
    assert rec["checkpoint"] == "s3://elsewhere/ckpt"
    assert status(kube, "tiny")["latestCheckpoint"] == "s3://elsewhere/ckpt"


# -- scale, health, metrics -----------------------------------------------------------------------------------------
async def test_fifty_runs_at_once_across_namespaces(kube: KubeAPI, operator_config: Any) -> None:
    """50 SpinRuns (2 iterations each) created together, served by one cluster-wide operator; the fake cluster
    finishes every child as soon as it appears. All succeed, each child created exactly once."""
    auto = AutoCluster(kube)
    op = await start_operator(config=operator_config, clusterwide=True)
    try:
        started = time.monotonic()
        namespaces = [NS if i % 2 else "team-a" for i in range(50)]
        await asyncio.gather(
            *(create(kube, spinrun(f"run-{i:02d}", iterations=2), ns) for i, ns in enumerate(namespaces))
        )
        for i, ns in enumerate(namespaces):
            await wait_phase(kube, f"run-{i:02d}", "Succeeded", ns, timeout=90)
        elapsed = time.monotonic() - started
    finally:
        await auto.close()
        await op.stop()
    created = Counter(operator_creates(kube))
    assert len(created) == 50 * 5 and set(created.values()) == {1}
    assert elapsed < 60, f"50 runs took {elapsed:.1f}s"


async def test_liveness_probe_and_prometheus_metrics(kube: KubeAPI, operator_config: Any, unused_tcp_port: int) -> None:
    auto = AutoCluster(kube)
    op = await start_operator(
        config=operator_config, metrics_port=0, liveness=f"http://127.0.0.1:{unused_tcp_port}/healthz"
    )
    try:
        await create(kube, spinrun())
        await wait_phase(kube, "tiny", "Succeeded")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{unused_tcp_port}/healthz") as response:
                assert response.status == 200
                assert (await response.json())["runs"] == 1
            port = op.controller.metrics_port
            assert port
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
        assert 'spin_operator_runs{phase="Succeeded"} 1.0' in text
        assert 'spin_operator_runs{phase="Failed"} 0.0' in text
        assert "spin_operator_reconcile_errors_total" in text
        assert 'spin_operator_children_created_total{step="generate"}' in text
        assert 'spin_operator_step_duration_seconds_count{step="train"}' in text
        assert "spin_operator_reaction_seconds_bucket" in text
        # At least this run's train child was created in reaction to its generation Job's end (observed, not 0).
        reacted = re.search(r"^spin_operator_reaction_seconds_count (\S+)$", text, flags=re.M)
        assert reacted and float(reacted.group(1)) >= 1
    finally:
        await auto.close()
        await op.stop()


# -- which watch events wake a run ---------------------------------------------------------------------------------
async def test_watch_events_that_only_echo_the_operators_own_writes_do_not_wake_the_run() -> None:
    """The creation event of a child the operator just created, and the SpinRun event of its own status write,
    carry nothing new: they must not cost a reconciliation. Anything else must wake the run. (The controller alone:
    no API server is needed to decide whether an event wakes a run.)"""
    from spin_operator.config import Config
    from spin_operator.controller import Controller, RunState, _fingerprint

    ctrl = Controller(Config(), kube=None)  # type: ignore[arg-type]  # never called: no reconciliation runs
    key = (NS, "tiny")
    state = ctrl.states[key] = RunState(uid="u1", written={"phase": "Generating"}, status={"phase": "Generating"})
    job = {"kind": "Job", "metadata": {"name": "tiny-i1-gen", "uid": "j1"}, "spec": {"parallelism": 1}, "status": {}}
    state.created["tiny-i1-gen"] = job
    run = {"metadata": {"uid": "u1", "generation": 1}, "spec": {"iterations": 3}, "status": {"phase": "Generating"}}
    state.seen = _fingerprint(run, copy=True)

    def woken(event: Callable[[], None], run_key: tuple[str, str] = key) -> bool:
        event()
        was = run_key in ctrl._dirty
        ctrl._dirty.discard(run_key)
        for task in ctrl._workers.values():
            task.cancel()
        ctrl._workers.clear()
        return was

    assert not woken(lambda: ctrl.child_changed(key, json.loads(json.dumps(job))))
    assert woken(lambda: ctrl.child_changed(key, {**job, "status": {"active": 1}}))
    assert woken(lambda: ctrl.child_changed(key, {**job, "metadata": {**job["metadata"], "deletionTimestamp": "t"}}))
    assert woken(lambda: ctrl.child_changed(key, {**job, "metadata": {"name": "tiny-i1-gen-r1"}}))
    assert not woken(lambda: ctrl.spinrun_changed(key, json.loads(json.dumps(run))))
    assert woken(lambda: ctrl.spinrun_changed(key, {**run, "spec": {"iterations": 4}}))
    assert woken(lambda: ctrl.spinrun_changed(key, {**run, "status": {"phase": "Failed"}}))
    assert woken(lambda: ctrl.child_changed((NS, "other"), job), (NS, "other")), (
        "a run the operator has not reconciled yet"
    )
    await asyncio.sleep(0)


def test_the_operations_guide_lists_exactly_the_metrics_the_operator_serves() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    served = set(re.findall(r'"(spin_operator_\w+)"', (root / "operator/spin_operator/metrics.py").read_text()))
    guide = (root / "docs/operations.md").read_text()
    listed = set(re.findall(r"^\| `(spin_operator_\w+)(?:\{\w+\})?` \|", guide, flags=re.M))
    assert len(served) >= 8 and served == listed


def test_replicas_started_in_the_same_millisecond_take_distinct_peering_priorities(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kopf pauses every replica while two share a peering priority. Two pods started together read the same
    millisecond (seen on the test control plane: both paused for good); the default priority differs anyway, and
    a replica started later still outranks an earlier one."""
    import spin_operator

    now = 1_796_686_608_555_123_456  # ns
    monkeypatch.setattr(spin_operator.time, "time_ns", lambda: now)
    same_millisecond = [spin_operator.default_priority() for _ in range(20)]
    assert len(set(same_millisecond)) > 1, same_millisecond
    assert all(1_796_686_608_555_000 <= p <= 1_796_686_608_555_999 for p in same_millisecond)
    monkeypatch.setattr(spin_operator.time, "time_ns", lambda: now + 1_000_000)
    assert spin_operator.default_priority() > max(same_millisecond)
    assert max(same_millisecond) < 2**53  # exact wherever the peering record is read as JSON

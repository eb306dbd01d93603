"""What the operator creates for a SpinRun: the spec ConfigMap, generation Jobs and training PyTorchJobs.

Pure functions from the accepted SpinRun to Kubernetes objects. Names are deterministic, so a restarted operator
finds (and adopts) what it created before instead of creating it twice:

    <run>-spec                  ConfigMap holding run.json (the resolved SpinRun), mounted at /etc/spin/run.json
    <run>-i<t>-gen[-r<k>]       batch/v1 Job, Indexed, one pod per shard: `spin generate --iteration t`
    <run>-i<t>-train[-r<k>]     kubeflow.org/v1 PyTorchJob: `torchrun ... spin train --iteration t`
    <run>-i<t>-eval[-r<k>]      batch/v1 Job, one pod: `spin evaluate --iteration t` (when spec.evaluation is set)

`-r<k>` marks the k-th recreation after a failure (attempt 0 has no suffix). No spec value is ever put into a
shell string: commands and arguments are lists, and the only values taken from the spec are numbers, the image,
resources, placement and the names of Secrets.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

import kopf

from spin_core.spec import Placement, PodSettings, SpinRun
from spin_operator.config import Config
from spin_operator.kube import JOBS, PYTORCHJOBS, TRAINJOBS, Kind

Step = Literal["generate", "train", "evaluate"]

RUN_LABEL = "selfplay.dev/run"
ITERATION_LABEL = "selfplay.dev/iteration"
STEP_LABEL = "selfplay.dev/step"
ATTEMPT_LABEL = "selfplay.dev/attempt"
SPEC_HASH_ANNOTATION = "selfplay.dev/spec-hash"
SUSPENDED_BY_ANNOTATION = "selfplay.dev/suspended-by"
"""Set on a child the operator suspended (spec.suspend): it resumes only those, never one that another controller
(Kueue, waiting for admission) holds."""
OPERATOR = "spin-operator"
MANAGED_BY = {"app.kubernetes.io/managed-by": "spin-operator", "app.kubernetes.io/part-of": "spin"}

SPEC_DIR = "/etc/spin"
SPEC_FILE = "run.json"
SPEC_PATH = f"{SPEC_DIR}/{SPEC_FILE}"
GENERATE_CONTAINER = "generate"
TRAIN_CONTAINER = "pytorch"  # the Training Operator finds the training container by this name
TRAINJOB_CONTAINER = "node"  # Kubeflow Trainer v2 runtimes' training container (replicated job "node")
EVALUATE_CONTAINER = "evaluate"
GPU = "nvidia.com/gpu"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
WORKLOAD_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
"""The label Kueue puts on the Workload of a child: the child's uid."""
EPHEMERAL_STORAGE = "ephemeral-storage"

KINDS: dict[str, Kind] = {k.kind: k for k in (JOBS, PYTORCHJOBS, TRAINJOBS)}


def kind_of(run: SpinRun, step: Step) -> Kind:
    """What a step's child is: a batch/v1 Job, a PyTorchJob, or (training.runtime set) a Trainer v2 TrainJob."""
    if step != "train":
        return JOBS
    return TRAINJOBS if run.spec.training.runtime else PYTORCHJOBS


def train_container(kind: Kind) -> str:
    """The container whose termination message carries the trainer's summary."""
    return TRAINJOB_CONTAINER if kind is TRAINJOBS else TRAIN_CONTAINER


SHORT = {"generate": "gen", "train": "train", "evaluate": "eval"}
COMPONENT = {"generate": "generator", "train": "trainer", "evaluate": "evaluator"}


def configmap_name(run: str) -> str:
    return f"{run}-spec"


def child_name(run: str, iteration: int, step: Step, attempt: int = 0) -> str:
    base = f"{run}-i{iteration}-{SHORT[step]}"
    return base if attempt == 0 else f"{base}-r{attempt}"


def master_pod_name(train_job: str) -> str:
    """The Training Operator names replica pods <job>-<replica type>-<index>."""
    return f"{train_job}-master-0"


def spec_json(run: SpinRun) -> str:
    """run.json: the resolved SpinRun (defaults filled in) the jobs read with `--spec`."""
    return json.dumps(run.to_document(), indent=1, sort_keys=True)


_HASHES: dict[str, str] = {}
"""spec_hash's memo: the compact JSON of a resolved SpinRun -> the hash of its run.json."""
_HASHES_MAX = 4096


def spec_hash(run: SpinRun) -> str:
    """The first 16 hex digits of run.json's sha256 (the ConfigMap's and the children's spec-hash annotation).

    run.json is indented JSON, which only Python's slow pure-Python encoder writes (the reconciler asks for the hash
    on every pass): it is hashed once per distinct content, found by the C encoder's compact JSON of the same
    document, which determines it (same keys, same order, same values; only the whitespace differs)."""
    document = run.to_document()
    key = json.dumps(document, sort_keys=True, separators=(",", ":"))
    found = _HASHES.get(key)
    if found is None:
        found = hashlib.sha256(json.dumps(document, indent=1, sort_keys=True).encode()).hexdigest()[:16]
        if len(_HASHES) >= _HASHES_MAX:
            del _HASHES[next(iter(_HASHES))]  # the oldest entry
        _HASHES[key] = found
    return found


def owner(body: dict[str, Any]) -> dict[str, Any]:
    """The parts of the SpinRun that kopf.adopt and kopf's events need."""
    meta = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion", "selfplay.dev/v1alpha1"),
        "kind": body.get("kind", "SpinRun"),
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "labels") if k in meta},
    }


def _labels(run: SpinRun, iteration: int | None = None, step: Step | None = None, attempt: int | None = None):
    labels = {RUN_LABEL: run.metadata.name, **MANAGED_BY}
    if iteration is not None:
        labels[ITERATION_LABEL] = str(iteration)
    if step is not None:
        labels[STEP_LABEL] = step
        labels["app.kubernetes.io/component"] = COMPONENT[step]
    if attempt is not None:
        labels[ATTEMPT_LABEL] = str(attempt)
    return labels


NOT_PROPAGATED = ("kueue.x-k8s.io/",)
"""Label prefixes of the SpinRun that its children do not inherit: they steer other controllers (a Kueue queue name
on a child makes Kueue hold it), which the SpinRun's own fields decide."""


def propagated_labels(owner_body: dict[str, Any]) -> dict[str, str]:
    """The SpinRun's labels its children carry too (team, cost centre...), minus the NOT_PROPAGATED prefixes."""
    labels = (owner_body.get("metadata") or {}).get("labels") or {}
    return {k: v for k, v in labels.items() if not k.startswith(NOT_PROPAGATED)}


def _adopt(obj: dict[str, Any], owner_body: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    """Owner reference (controller), namespace and the run's propagated labels; ours win over the owner's."""
    parent = owner(owner_body)
    kopf.append_owner_reference(obj, owner=parent)
    kopf.adjust_namespace(obj, namespace=parent["metadata"].get("namespace"))
    obj["metadata"]["labels"] = {**propagated_labels(owner_body), **obj["metadata"].get("labels", {}), **labels}
    return obj


def configmap(run: SpinRun, owner_body: dict[str, Any]) -> dict[str, Any]:
    obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(run.metadata.name),
            "annotations": {SPEC_HASH_ANNOTATION: spec_hash(run)},
        },
        "data": {SPEC_FILE: spec_json(run)},
    }
    return _adopt(obj, owner_body, _labels(run))


MAP_FIELDS = ("node_selector", "pod_labels", "pod_annotations")


def pod_settings(run: SpinRun, step: Step, config: Config) -> PodSettings:
    """The step's pod settings: the operator's defaults, then spec.pods, then the step's own (spec.generation for
    generation and evaluation, spec.training for training). A level's setting replaces the ones below it; maps are
    merged key by key instead; an empty list or map sets nothing."""
    levels: list[PodSettings] = [config.pod_defaults, run.spec.pods, STEP_PLACEMENT[step](run)]
    merged: dict[str, Any] = {}
    for name in PodSettings.model_fields:
        values = [getattr(level, name) for level in levels]
        if name in MAP_FIELDS:
            merged[name] = {k: v for value in values for k, v in value.items()}
        else:
            merged[name] = next((v for v in reversed(values) if v is not None and v != []), values[0])
    if merged["service_account_name"] is None:
        merged["service_account_name"] = config.job_service_account
    return PodSettings.model_construct(**merged)


STEP_PLACEMENT = {
    "generate": lambda run: run.spec.generation,
    "train": lambda run: run.spec.training,
    "evaluate": lambda run: run.spec.generation,
}


def _resources(placement: Placement, pods: PodSettings, default: dict[str, Any], gpus: int) -> dict[str, Any]:
    """The spec's requests/limits (or the operator's default when the spec sets none), GPUs from the GPU field,
    ephemeral-storage from the scratch size (unless requested explicitly)."""
    spec_resources = placement.resources.model_dump(mode="json")
    chosen = spec_resources if (spec_resources["requests"] or spec_resources["limits"]) else copy.deepcopy(default)
    requests = {k: str(v) for k, v in (chosen.get("requests") or {}).items() if k != GPU}
    limits = {k: str(v) for k, v in (chosen.get("limits") or {}).items() if k != GPU}
    if pods.scratch_size and not pods.scratch_claim:
        requests.setdefault(EPHEMERAL_STORAGE, str(pods.scratch_size))
    if gpus > 0:
        limits[GPU] = str(gpus)
        requests[GPU] = str(gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


SCRATCH = "/scratch"
SCRATCH_ENV = {
    # Everything big or written at run time goes to the scratch volume, not to the container's root filesystem.
    "TMPDIR": SCRATCH,
    "SPIN_CACHE_DIR": f"{SCRATCH}/spin",
    "HF_HOME": f"{SCRATCH}/huggingface",
    "XDG_CACHE_HOME": f"{SCRATCH}/cache",
    "TORCH_EXTENSIONS_DIR": f"{SCRATCH}/torch_extensions",
    "TRITON_CACHE_DIR": f"{SCRATCH}/triton",
    "VLLM_CACHE_ROOT": f"{SCRATCH}/vllm",
}


def _env(run: SpinRun, pods: PodSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The container's env: the run's, the scratch caches, S3 settings, then the pod settings' extra env (which
    replaces a variable of the same name)."""
    storage = run.spec.storage
    env: dict[str, dict[str, Any]] = {"SPIN_RUN": {"value": run.metadata.name}}
    env |= {k: {"value": v} for k, v in SCRATCH_ENV.items()}
    if storage.endpoint:
        env["AWS_ENDPOINT_URL"] = {"value": storage.endpoint}
    if storage.region:
        env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = {"value": storage.region}
    for var in pods.env:
        env[var.name] = var.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"name"})
    env_from = [{"secretRef": {"name": storage.credentials_secret}}] if storage.credentials_secret else []
    return [{"name": k, **v} for k, v in env.items()], env_from


POD_SECURITY = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
# The Training Operator adds an init container (`init-pytorch`: alpine, root, no securityContext) to every Worker
# pod, which a pod-level runAsNonRoot would stop with CreateContainerConfigError: training pods state it per
# container instead (ours), and keep the pod-level seccomp profile.
TRAINING_POD_SECURITY = {"seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _volumes(run: SpinRun, pods: PodSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, the container's mounts): the spec ConfigMap, shared memory, scratch and the extra volumes."""
    scratch: dict[str, Any]
    if pods.scratch_claim:
        scratch = {"persistentVolumeClaim": {"claimName": pods.scratch_claim}}
    else:
        scratch = {"emptyDir": {"sizeLimit": str(pods.scratch_size)} if pods.scratch_size else {}}
    volumes = [
        {
            "name": "spec",
            "configMap": {"name": configmap_name(run.metadata.name), "items": [{"key": SPEC_FILE, "path": SPEC_FILE}]},
        },
        # NCCL and vLLM need far more shared memory than the container runtime's 64 MiB default.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "scratch", **scratch},
    ]
    mounts = [
        {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "scratch", "mountPath": SCRATCH},
    ]
    for extra in pods.volumes:
        if extra.persistent_volume_claim:
            source = {"persistentVolumeClaim": {"claimName": extra.persistent_volume_claim}}
        elif extra.config_map:
            source = {"configMap": {"name": extra.config_map}}
        else:
            source = {"secret": {"secretName": extra.secret}}
        volumes.append({"name": extra.name, **source})
        mounts.append({"name": extra.name, "mountPath": extra.mount_path, "readOnly": extra.read_only})
    return volumes, mounts


def _pod_template(
    run: SpinRun,
    pods: PodSettings,
    labels: dict[str, str],
    container: dict[str, Any],
    restart_policy: str | None,
    pod_security: dict[str, Any] = POD_SECURITY,
) -> dict[str, Any]:
    """The pod template of a step. `restart_policy` None leaves it to the Training Operator (which sets it from the
    replica's policy, and warns with an Event per pod when the template sets one)."""
    env, env_from = _env(run, pods)
    volumes, mounts = _volumes(run, pods)
    container = {
        **container,
        "env": env,
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
    }
    if env_from:
        container["envFrom"] = env_from
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": copy.deepcopy(pod_security),
        "containers": [container],
        "volumes": volumes,
    }
    if restart_policy is not None:
        pod["restartPolicy"] = restart_policy
    if pods.service_account_name:
        pod["serviceAccountName"] = pods.service_account_name
    if pods.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": name} for name in pods.image_pull_secrets]
    if pods.priority_class_name:
        pod["priorityClassName"] = pods.priority_class_name
    if pods.node_selector:
        pod["nodeSelector"] = dict(pods.node_selector)
    if pods.affinity:
        pod["affinity"] = copy.deepcopy(pods.affinity)
    if pods.tolerations:
        pod["tolerations"] = [t.model_dump(mode="json", exclude_none=True) for t in pods.tolerations]
    metadata: dict[str, Any] = {"labels": {**pods.pod_labels, **labels}}
    if pods.pod_annotations:
        metadata["annotations"] = dict(pods.pod_annotations)
    return {"metadata": metadata, "spec": pod}


def _queue(run: SpinRun) -> dict[str, str]:
    """Kueue's labels of every child of a queued run."""
    labels = {}
    if run.spec.queue_name:
        labels[QUEUE_LABEL] = run.spec.queue_name
    if run.spec.workload_priority_class:
        labels[PRIORITY_LABEL] = run.spec.workload_priority_class
    return labels


def _batch_job(
    run: SpinRun,
    owner_body: dict[str, Any],
    iteration: int,
    attempt: int,
    config: Config,
    suspend: bool,
    step: Step,
    container_name: str,
    job_spec: dict[str, Any],
    user_error_action: str,
) -> dict[str, Any]:
    """A batch/v1 Job running `spin <step>` for one iteration in the generator's image and placement. `job_spec`
    holds its completions and retry fields; exit code 2 (a problem the user must fix: spec, data, scorer) takes
    `user_error_action`, since retrying cannot help, and node disruptions are not counted as failures."""
    gen = run.spec.generation
    pods = pod_settings(run, step, config)
    labels = _labels(run, iteration, step, attempt)
    container = {
        "name": container_name,
        "image": gen.image or config.generator_image,
        "command": ["spin"],
        "args": [step, "--spec", SPEC_PATH, "--iteration", str(iteration)],
        "resources": _resources(gen, pods, config.generator_resources, gen.gpus_per_shard),
    }
    obj = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": child_name(run.metadata.name, iteration, step, attempt),
            "annotations": {SPEC_HASH_ANNOTATION: spec_hash(run)},
        },
        "spec": {
            **job_spec,
            "podFailurePolicy": {
                "rules": [
                    # Node drains, preemption, spot reclaims: not the pod's fault, not counted.
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                    {
                        "action": user_error_action,
                        "onExitCodes": {"containerName": container_name, "operator": "In", "values": [2]},
                    },
                ]
            },
            "ttlSecondsAfterFinished": config.ttl_seconds_after_finished,
            # A queued run's children start suspended: Kueue resumes them once admitted.
            "suspend": suspend or bool(run.spec.queue_name),
            **({"activeDeadlineSeconds": pods.active_deadline_seconds} if pods.active_deadline_seconds else {}),
            "template": _pod_template(run, pods, labels, container, restart_policy="Never"),
        },
    }
    return _adopt(obj, owner_body, {**_queue(run), **labels})


def generation_job(
    run: SpinRun, owner_body: dict[str, Any], iteration: int, attempt: int, config: Config, suspend: bool = False
) -> dict[str, Any]:
    """The Indexed Job of one iteration's generation: pod i generates shard i (JOB_COMPLETION_INDEX)."""
    gen = run.spec.generation
    job_spec = {
        "completionMode": "Indexed",
        "completions": gen.shards,
        "parallelism": gen.shards,
        "backoffLimitPerIndex": gen.backoff_limit_per_index,
    }
    return _batch_job(
        run, owner_body, iteration, attempt, config, suspend, "generate", GENERATE_CONTAINER, job_spec, "FailIndex"
    )


def training_job(
    run: SpinRun, owner_body: dict[str, Any], iteration: int, attempt: int, config: Config, suspend: bool = False
) -> dict[str, Any]:
    """The PyTorchJob of one iteration's training: torchrun on every node, one Master and nodes-1 Workers."""
    train = run.spec.training
    pods = pod_settings(run, "train", config)
    labels = _labels(run, iteration, "train", attempt)
    container = {
        "name": TRAIN_CONTAINER,
        "image": train.image or config.trainer_image,
        # torchrun takes the rendezvous (master address/port, node rank) from the PET_* variables the Training
        # Operator sets; --no-python runs the `spin` executable itself in every rank.
        "command": ["torchrun"],
        "args": [
            "--nnodes",
            str(train.nodes),
            "--nproc-per-node",
            str(train.processes_per_node),
            "--no-python",
            "spin",
            "train",
            "--spec",
            SPEC_PATH,
            "--iteration",
            str(iteration),
        ],
        "resources": _resources(train, pods, config.trainer_resources, train.gpus_per_node),
    }

    def replica(replicas: int) -> dict[str, Any]:
        return {
            "replicas": replicas,
            # ExitCode: a pod killed by a signal (exit code >= 128: preemption, node loss, OOM) is recreated in
            # place and the run resumes from its last train state; exit codes 1-127 (1: a failed step, 2: bad
            # input) fail the job at once, and the operator decides (a new attempt, or no retry for bad input).
            "restartPolicy": "ExitCode",
            "template": _pod_template(
                run, pods, labels, container, restart_policy=None, pod_security=TRAINING_POD_SECURITY
            ),
        }

    replicas = {"Master": replica(1)}
    if train.nodes > 1:
        replicas["Worker"] = replica(train.nodes - 1)
    run_policy: dict[str, Any] = {
        "backoffLimit": train.backoff_limit,
        # Stragglers are stopped when the job ends; the finished Master pod stays for its termination message (the
        # trainer's summary) and its logs until the TTL removes the job.
        "cleanPodPolicy": "Running",
        "ttlSecondsAfterFinished": config.ttl_seconds_after_finished,
        "suspend": suspend or bool(run.spec.queue_name),
    }
    if pods.active_deadline_seconds:
        run_policy["activeDeadlineSeconds"] = pods.active_deadline_seconds
    if train.nodes > 1:
        # Gang scheduling (where the Training Operator runs with a gang scheduler: Volcano, scheduler-plugins):
        # all nodes' pods are placed together or not at all, so a half-placed job holds no GPUs.
        run_policy["schedulingPolicy"] = {"minAvailable": train.nodes}
        if pods.priority_class_name:
            run_policy["schedulingPolicy"]["priorityClass"] = pods.priority_class_name
    obj = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {
            "name": child_name(run.metadata.name, iteration, "train", attempt),
            "annotations": {SPEC_HASH_ANNOTATION: spec_hash(run)},
        },
        "spec": {
            "nprocPerNode": str(train.processes_per_node),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replicas,
        },
    }
    return _adopt(obj, owner_body, {**_queue(run), **labels})


def trainjob(
    run: SpinRun, owner_body: dict[str, Any], iteration: int, attempt: int, config: Config, suspend: bool = False
) -> dict[str, Any]:
    """The Kubeflow Trainer v2 TrainJob of one iteration's training (training.runtime names the
    ClusterTrainingRuntime, e.g. torch-distributed, which sets the PET_* rendezvous variables torchrun reads).

    Trainer v2.0's TrainJob takes the image, command, nodes, processes, resources and env, and per-pod overrides of
    the ServiceAccount, node selector, tolerations, volumes and mounts; the rest of the pod (security context,
    restart and failure policy, affinity, priority class, pull secrets) comes from the runtime."""
    train = run.spec.training
    pods = pod_settings(run, "train", config)
    labels = _labels(run, iteration, "train", attempt)
    env, env_from = _env(run, pods)
    volumes, mounts = _volumes(run, pods)
    if env_from:  # TrainJob env takes no envFrom: each credential key by reference
        secret = env_from[0]["secretRef"]["name"]
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        ]
    override: dict[str, Any] = {
        "targetJobs": [{"name": TRAINJOB_CONTAINER}],
        "volumes": volumes,
        "containers": [{"name": TRAINJOB_CONTAINER, "volumeMounts": mounts}],
    }
    if pods.service_account_name:
        override["serviceAccountName"] = pods.service_account_name
    if pods.node_selector:
        override["nodeSelector"] = dict(pods.node_selector)
    if pods.tolerations:
        override["tolerations"] = [t.model_dump(mode="json", exclude_none=True) for t in pods.tolerations]
    obj = {
        "apiVersion": TRAINJOBS.api_version,
        "kind": TRAINJOBS.kind,
        "metadata": {
            "name": child_name(run.metadata.name, iteration, "train", attempt),
            "annotations": {SPEC_HASH_ANNOTATION: spec_hash(run)},
        },
        "spec": {
            "runtimeRef": {"name": train.runtime, "apiGroup": TRAINJOBS.group, "kind": "ClusterTrainingRuntime"},
            "trainer": {
                "image": train.image or config.trainer_image,
                "command": ["torchrun"],
                "args": ["--no-python", "spin", "train", "--spec", SPEC_PATH, "--iteration", str(iteration)],
                "env": env,
                "numNodes": train.nodes,
                "numProcPerNode": train.processes_per_node,
                "resourcesPerNode": _resources(train, pods, config.trainer_resources, train.gpus_per_node),
            },
            # Labels and annotations of the JobSet and its Jobs (and so of the pods' owners).
            "labels": {**pods.pod_labels, **labels},
            **({"annotations": dict(pods.pod_annotations)} if pods.pod_annotations else {}),
            "podSpecOverrides": [override],
            "suspend": suspend or bool(run.spec.queue_name),
        },
    }
    return _adopt(obj, owner_body, {**_queue(run), **labels})


def evaluation_job(
    run: SpinRun, owner_body: dict[str, Any], iteration: int, attempt: int, config: Config, suspend: bool = False
) -> dict[str, Any]:
    """The Job that evaluates iteration t's model on the held-out prompts (one pod, the generator's image and
    placement: it runs the same engine). Its pod's termination message carries eval.json's numbers."""
    job_spec = {"completions": 1, "parallelism": 1, "backoffLimit": run.spec.generation.backoff_limit_per_index}
    return _batch_job(
        run, owner_body, iteration, attempt, config, suspend, "evaluate", EVALUATE_CONTAINER, job_spec, "FailJob"
    )


def build(run: SpinRun, step: Step, owner_body: dict[str, Any], iteration: int, attempt: int, config: Config):
    """The child of `step` for an iteration's attempt."""
    if step == "generate":
        return generation_job(run, owner_body, iteration, attempt, config)
    if step == "evaluate":
        return evaluation_job(run, owner_body, iteration, attempt, config)
    if run.spec.training.runtime:
        return trainjob(run, owner_body, iteration, attempt, config)
    return training_job(run, owner_body, iteration, attempt, config)


def suspend_patch(kind: Kind, suspend: bool, queued: bool = False) -> dict[str, Any]:
    """The merge patch that suspends (True) or resumes (False) a child, marking it as suspended by the operator. A
    queued child's `suspend` is Kueue's to write (it resumes at once a child suspended under an admitted Workload):
    the patch only marks it, and the operator (de)activates the child's Workload instead."""
    patch: dict[str, Any] = {"metadata": {"annotations": {SUSPENDED_BY_ANNOTATION: OPERATOR if suspend else None}}}
    if not queued:
        patch["spec"] = {"runPolicy": {"suspend": suspend}} if kind is PYTORCHJOBS else {"suspend": suspend}
    return patch


def queued(body: Mapping[str, Any]) -> bool:
    """Whether a child was submitted to a Kueue queue (it carries the queue label)."""
    return QUEUE_LABEL in ((body.get("metadata") or {}).get("labels") or {})

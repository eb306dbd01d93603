"""The SpinRun resource: the one source of truth for the CRD, the operator, the local runner and the jobs.

Field names are the Kubernetes (camelCase) names; Python code uses the snake_case attribute names.
Defaults are the official SPIN recipe's (alignment-handbook zephyr-7b-sft-full, 3 iterations).

The spec models are strict (no "3" for an integer, no `true` for a number, no infinities) so that what
pydantic accepts is what the API server accepts with the generated CRD; the status models are lenient.
Every bound that the CRD states (ranges, patterns, enums) comes from the `Field`s below; every rule that
spans fields exists twice, as a pydantic validator and as a CEL rule (`*_RULES`), and the tests check both.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel

GROUP = "selfplay.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "SpinRun"
PLURAL = "spinruns"
SHORT_NAME = "spin"

MAX_ITERATIONS = 100
MAX_ATTEMPTS_SUFFIX = "-r9"
"""A child's name ends with -r<k> at its k-th recreation; the operator allows at most 9 (spin_operator.config)."""
# The longest name the Training Operator derives from a run's: the Service and pod of its last Worker,
# "<run>-i100-train-r9-worker-1022", must be a DNS-1035 label (at most 63 characters).
MAX_NAME_LENGTH = 63 - len(f"-i{MAX_ITERATIONS}-train{MAX_ATTEMPTS_SUFFIX}-worker-1022")
# The largest integer bound a CRD can state: kube-apiserver holds `maximum` as a float64 and refuses the CRD when it
# is not an exact integer ("Maximum boundary value must be of type integer"), which 2**63 - 1 is not.
MAX_INTEGER = 2**53 - 1
SEED_MAX = 2**32 - 1  # numpy and vLLM take 32-bit seeds
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
S3_URI = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$"
STORE_URI = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|file://.+)$"
HTTP_URL = r"^https?://.+$"
SCORER = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$"
# The API server's own resource.Quantity pattern (as controller-gen writes it).
QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)

# What each pattern allows, in words: validation errors say this instead of printing the regular expression.
PATTERN_HINTS = {
    STORE_URI: "must be s3://bucket/path (bucket: 3-63 lowercase letters, digits, '.' or '-') or file://path",
    S3_URI: "must be s3://bucket/path (bucket: 3-63 lowercase letters, digits, '.' or '-')",
    DNS1123_LABEL: (
        "must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending with a letter or digit"
    ),
    DNS1035_LABEL: (
        "must be a DNS-1035 label: lowercase letters, digits and '-', starting with a letter and ending with a "
        "letter or digit (it names the run's PyTorchJobs and Services, which Kubernetes requires so)"
    ),
    DNS1123_SUBDOMAIN: (
        "must be a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', every dot-separated part "
        "starting and ending with a letter or digit"
    ),
    HTTP_URL: "must be an http:// or https:// URL",
    SCORER: "must be module:function, e.g. spin_core.demo:score",
}


class FieldProblem(ValueError):
    """A cross-field problem raised by a model validator but located at one of the model's fields.

    `loc` is relative to the model (e.g. ("schedule", 0, "iteration")); `resource.describe` appends it to the
    model's location so the message names the field, not just the object that holds it.
    """

    def __init__(self, loc: tuple[str | int, ...], message: str):
        super().__init__(message)
        self.loc = loc


class Spec(BaseModel):
    """Base for every part of the spec: camelCase on the wire, unknown fields rejected, strict types."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_alias=True,
        validate_by_name=False,
        serialize_by_alias=True,
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        use_attribute_docstrings=True,
    )


def _quantity(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("must be a Kubernetes quantity: an integer or a string such as 500m, 4 or 16Gi")
    if isinstance(value, str) and not re.fullmatch(QUANTITY, value):
        raise ValueError("must be a Kubernetes quantity such as 4, 500m or 16Gi")
    return value


Quantity = Annotated[
    int | str,
    PlainValidator(_quantity),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "pattern": QUANTITY}),
]


class Resources(Spec):
    """Kubernetes resource requests and limits for a container (GPUs are set by the GPU fields)."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    """Minimum resources, e.g. {cpu: 8, memory: 64Gi}."""
    limits: dict[str, Quantity] = Field(default_factory=dict)
    """Maximum resources, e.g. {memory: 64Gi}."""


class Toleration(Spec):
    """A Kubernetes toleration for the pods of a step."""

    key: str | None = None
    """Taint key the toleration applies to; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists (any value) or Equal (the value below); empty means Equal."""
    value: str | None = None
    """Taint value to match with operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches every effect."""
    toleration_seconds: int | None = Field(default=None, ge=0, le=MAX_INTEGER)
    """With effect NoExecute: how long the pod stays bound after the taint appears; empty means forever."""


class KeyRef(Spec):
    """One key of a Secret or ConfigMap in the run's namespace."""

    name: str = Field(max_length=253, pattern=DNS1123_SUBDOMAIN)
    """Name of the Secret or ConfigMap."""
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    """The key whose value is taken."""


class EnvSource(Spec):
    """Where an environment variable's value comes from: exactly one of the two."""

    secret_key_ref: KeyRef | None = None
    """A key of a Secret (the kubelet reads it; the operator never does)."""
    config_map_key_ref: KeyRef | None = None
    """A key of a ConfigMap."""

    @model_validator(mode="after")
    def _one(self) -> EnvSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise FieldProblem(("secretKeyRef",), "set exactly one of secretKeyRef and configMapKeyRef")
        return self


ENV_SOURCE_RULES = [
    {
        "rule": "has(self.secretKeyRef) != has(self.configMapKeyRef)",
        "message": "set exactly one of secretKeyRef and configMapKeyRef",
    }
]


class EnvVar(Spec):
    """An extra environment variable of a step's container: a value, or a reference (valueFrom)."""

    name: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    """Variable name."""
    value: str | None = None
    """Its value."""
    value_from: EnvSource | None = None
    """Or where its value comes from."""

    @model_validator(mode="after")
    def _one(self) -> EnvVar:
        if (self.value is None) == (self.value_from is None):
            raise FieldProblem(("value",), "set exactly one of value and valueFrom")
        return self


ENV_VAR_RULES = [
    {"rule": "has(self.value) != has(self.valueFrom)", "message": "set exactly one of value and valueFrom"}
]


class ExtraVolume(Spec):
    """An extra volume mounted into a step's container: exactly one source (no hostPath or other node access)."""

    name: str = Field(max_length=63, pattern=DNS1123_LABEL)
    """Volume name (unique in the pod; spec, dshm and scratch are taken)."""
    mount_path: str = Field(pattern=r"^/.*$")
    """Absolute path in the container."""
    read_only: bool = False
    """Mount read-only."""
    persistent_volume_claim: str | None = Field(default=None, max_length=253, pattern=DNS1123_SUBDOMAIN)
    """Name of a PersistentVolumeClaim in the run's namespace."""
    config_map: str | None = Field(default=None, max_length=253, pattern=DNS1123_SUBDOMAIN)
    """Name of a ConfigMap in the run's namespace."""
    secret: str | None = Field(default=None, max_length=253, pattern=DNS1123_SUBDOMAIN)
    """Name of a Secret in the run's namespace."""

    @model_validator(mode="after")
    def _one(self) -> ExtraVolume:
        if sum(x is not None for x in (self.persistent_volume_claim, self.config_map, self.secret)) != 1:
            raise FieldProblem(
                ("persistentVolumeClaim",), "set exactly one of persistentVolumeClaim, configMap and secret"
            )
        if self.name in ("spec", "dshm", "scratch"):
            raise FieldProblem(("name",), "the volume names spec, dshm and scratch are the operator's")
        return self


VOLUME_RULES = [
    {
        "rule": "[has(self.persistentVolumeClaim), has(self.configMap), has(self.secret)].filter(x, x).size() == 1",
        "message": "set exactly one of persistentVolumeClaim, configMap and secret",
    },
    {
        "rule": "!(self.name in ['spec', 'dshm', 'scratch'])",
        "message": "the volume names spec, dshm and scratch are the operator's",
        "fieldPath": ".name",
    },
]


class PodSettings(Spec):
    """Identity and placement of pods: set operator-wide (the chart's podDefaults), for a whole run (spec.pods) or
    per step (spec.generation, spec.training). The most specific level that sets a field wins; maps (nodeSelector,
    podLabels, podAnnotations) are merged key by key, the most specific value winning. Ignored by `spin run`."""

    service_account_name: str | None = Field(default=None, max_length=253, pattern=DNS1123_SUBDOMAIN)
    """ServiceAccount of the pods (e.g. one carrying a cloud workload identity for S3: then storage.credentialsSecret
    can stay empty). The pods never get an API token mounted."""
    image_pull_secrets: list[str] = Field(default_factory=list)
    """Secrets for pulling the images, in the run's namespace."""
    priority_class_name: str | None = Field(default=None, max_length=253, pattern=DNS1123_SUBDOMAIN)
    """PriorityClass of the pods (preemption order)."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the pods must match."""
    affinity: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """A Kubernetes Affinity (nodeAffinity, podAffinity, podAntiAffinity), checked by the API server when the
    step's Job is created."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Taints the pods tolerate."""
    pod_labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels of the pods."""
    pod_annotations: dict[str, str] = Field(default_factory=dict)
    """Extra annotations of the pods (e.g. sidecar.istio.io/inject: "false")."""
    env: list[EnvVar] = Field(default_factory=list)
    """Extra environment variables of the container."""
    volumes: list[ExtraVolume] = Field(default_factory=list)
    """Extra volumes of the container (PersistentVolumeClaim, ConfigMap or Secret)."""
    scratch_size: Quantity | None = None
    """Size limit of each pod's /scratch volume (an emptyDir on the node's disk), where model downloads, caches and
    per-rank training states go; also requested as ephemeral-storage so that pods land on nodes with room. Empty:
    no limit (a 7B run needs tens of GiB per pod)."""
    scratch_claim: str | None = Field(default=None, max_length=253, pattern=DNS1123_SUBDOMAIN)
    """A PersistentVolumeClaim to use as /scratch instead of an emptyDir (must be ReadWriteMany when several pods
    run at once)."""
    active_deadline_seconds: int | None = Field(default=None, ge=1, le=MAX_INTEGER)
    """Fail the step's Job or PyTorchJob when it has been active this long (e.g. pods stuck pending); the operator
    then retries it like any failure. Empty: no deadline."""


class Placement(PodSettings):
    """Where and how the pods of a step run in a cluster (ignored by `spin run`)."""

    image: str | None = None
    """Container image; empty means the operator's default for this step."""
    resources: Resources = Field(default_factory=Resources, json_schema_extra={"default": {}})
    """CPU and memory requests/limits of each pod."""


DEF_RULES = {"EnvSource": ENV_SOURCE_RULES, "EnvVar": ENV_VAR_RULES, "ExtraVolume": VOLUME_RULES}
"""CEL rules of nested models, attached wherever the model appears in the CRD (mirrors of their validators)."""


class ModelSource(Spec):
    """The supervised fine-tuned model SPIN starts from."""

    uri: str = Field(pattern=STORE_URI)
    """HF-format model directory: s3://bucket/path or file://path."""


class Dataset(Spec):
    """The SFT dataset whose prompts are answered by the model and whose answers are the 'real' side."""

    uri: str = Field(pattern=STORE_URI)
    """A .jsonl or .parquet file: s3://bucket/key or file://path."""
    format: Literal["messages", "prompt-response"] = "messages"
    """messages: a list of {role, content} turns (UltraChat style); prompt-response: two string fields."""
    messages_field: str = Field(default="messages", min_length=1)
    """Column holding the chat turns (format: messages)."""
    prompt_field: str = Field(default="prompt", min_length=1)
    """Column holding the prompt (format: prompt-response)."""
    response_field: str = Field(default="response", min_length=1)
    """Column holding the human answer (format: prompt-response)."""
    max_samples: int = Field(default=0, ge=0, le=MAX_INTEGER)
    """Use only the first N rows; 0 means all."""
    on_bad_row: Literal["fail", "skip"] = "fail"
    """fail: stop with the file and line of the first bad row; skip: drop and count bad rows."""


class Storage(Spec):
    """Where everything the run writes lives (see the store layout in README)."""

    uri: str = Field(pattern=STORE_URI)
    """Run root: s3://bucket/prefix or file://path."""
    endpoint: str | None = Field(default=None, pattern=HTTP_URL)
    """S3-compatible endpoint URL (MinIO, SeaweedFS, Ceph...); empty means AWS."""
    region: str | None = None
    """S3 region; empty means the SDK default."""
    credentials_secret: str | None = Field(default=None, max_length=253, pattern=DNS1123_SUBDOMAIN)
    """Cluster only: name of a Secret whose keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) become the pods' env."""


class Generation(Placement):
    """Step 1 of each iteration: the current model answers every prompt."""

    backend: Literal["vllm", "hf"] = "vllm"
    """vllm: the offline vLLM engine; hf: transformers generate (no vLLM needed)."""
    shards: int = Field(default=1, ge=1, le=1024)
    """Number of parallel shards (pods of the Indexed Job / processes of spin run)."""
    temperature: float = Field(default=1.0, ge=0.0)
    """Sampling temperature; 0 is greedy."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling threshold."""
    max_new_tokens: int = Field(default=256, ge=1, le=1_048_576)
    """Longest generated answer, in tokens."""
    seed: int = Field(default=0, ge=0, le=SEED_MAX)
    """Base sampling seed; shard i of iteration t uses a seed derived from it, so reruns are reproducible."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Engine dtype; auto is bfloat16 on GPU, float32 on CPU."""
    batch_size: int = Field(default=32, ge=1, le=65_536)
    """Prompts per batch for the hf backend (vLLM schedules all prompts of a shard itself)."""
    opponent_logprobs: bool | None = None
    """Also store the generating model's log-probs of both answers; empty means on when
    training.referenceLogprobs is precompute and the engine runs in float32."""
    gpus_per_shard: int = Field(default=1, ge=0, le=64)
    """GPUs per shard pod (nvidia.com/gpu); also vLLM's tensor parallel size."""
    backoff_limit_per_index: int = Field(default=2, ge=0, le=1000)
    """Retries of one failed shard before the Job fails."""


LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


class Lora(Spec):
    """Train LoRA adapters (peft) instead of all weights; the published model has them merged."""

    r: int = Field(default=16, ge=1, le=65_536)
    """Rank of the adapter matrices."""
    alpha: int = Field(default=32, ge=1, le=MAX_INTEGER)
    """Scaling numerator: the adapter's update is multiplied by alpha / r."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGET_MODULES), json_schema_extra={"default": LORA_TARGET_MODULES}
    )
    """Names of the linear modules that get adapters."""


class OpponentMixture(Spec):
    """The opponent as a geometric mixture of recent iterates (training.opponent: mixture).

    At iteration t the iterates M_{t-1}, ..., M_{t-K} take part, K = min(history, t) (M_0 is spec.model.uri);
    iterate k steps back (k = 0 is M_{t-1}) has weight alpha^k / sum_{j<K} alpha^j, and the opponent's
    log-prob of an answer is sum_k w_k log p_k (the mixture's normaliser cancels in the SPIN loss)."""

    alpha: float = Field(default=0.5, gt=0.0, le=1.0)
    """Weight ratio of each older iterate to the next newer one: weights are alpha^k, normalised to sum 1
    (k = 0 is M_{t-1}); 1 is a uniform mixture."""
    history: int = Field(default=2, ge=1, le=MAX_ITERATIONS)
    """How many of the latest iterates are mixed (fewer while fewer exist); 1 is the plain opponent M_{t-1}."""


class Training(Placement):
    """Step 2 of each iteration: the model learns to prefer the real answers over its own."""

    loss: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    """SPIN loss: sigmoid (logistic, the paper), hinge, or ipo."""
    beta: float = Field(default=0.1, gt=0.0)
    """Inverse temperature of the loss (the paper's lambda)."""
    learning_rate: float = Field(default=5e-7, gt=0.0)
    """Peak learning rate."""
    epochs: int = Field(default=2, ge=1, le=1000)
    """Passes over the iteration's pairs."""
    global_batch_size: int = Field(default=64, ge=1, le=1_048_576)
    """Pairs per optimizer step across all processes (reached by gradient accumulation); a multiple of
    microBatchSize x nodes x processesPerNode."""
    micro_batch_size: int = Field(default=8, ge=1, le=65_536)
    """Pairs per forward pass on one process."""
    max_length: int = Field(default=1024, ge=2, le=1_048_576)
    """Longest prompt+answer sequence, in tokens."""
    max_prompt_length: int = Field(default=512, ge=1, le=1_048_576)
    """Prompts are truncated (from the left) to this many tokens; smaller than maxLength."""
    optimizer: Literal["rmsprop", "adamw"] = "rmsprop"
    """rmsprop is the official recipe's."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """Decoupled weight decay of the optimizer."""
    warmup_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """Share of steps with a linear learning-rate warm-up; the rest decays linearly to 0."""
    zero_stage: Literal[0, 2, 3] = 3
    """DeepSpeed ZeRO stage."""
    reference_logprobs: Literal["precompute", "online"] = "precompute"
    """precompute: score all pairs with the opponent once, then train without it in memory;
    online: keep the frozen opponent and score each batch."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    shared_prompt: bool = True
    """Run each pair's prompt through the model once: prompt, real and generated answer in one row, a 4D
    attention mask keeping the answers apart (same log-probs as two rows). Used where the model's attention
    takes such a mask (sdpa, eager); false, or flash-attention: two rows per pair."""
    attention: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """transformers' attention implementation of the trained and frozen models. flash_attention_2 needs a CUDA GPU
    and the flash-attn package (not in the images; add it to yours), and trains two rows per pair (no shared-prompt
    mask)."""
    lora: Lora | None = None
    """Train LoRA adapters instead of all weights."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto is bfloat16 on GPU, float32 on CPU."""
    seed: int = Field(default=42, ge=0, le=SEED_MAX)
    """Shuffling and initialisation seed."""
    checkpoint_every_steps: int = Field(default=50, ge=1, le=MAX_INTEGER)
    """Save a resumable training state to the store every N optimizer steps."""
    nodes: int = Field(default=1, ge=1, le=1024)
    """Nodes of the PyTorchJob (one Master, nodes-1 Workers)."""
    processes_per_node: int = Field(default=8, ge=1, le=256)
    """Training processes per node (GPUs per node on a GPU cluster)."""
    gpus_per_node: int = Field(default=8, ge=0, le=64)
    """GPUs requested per training pod (nvidia.com/gpu)."""
    backoff_limit: int = Field(default=2, ge=0, le=1000)
    """Retries of a failed training job before the iteration fails."""
    runtime: str | None = Field(default=None, max_length=253, pattern=DNS1123_SUBDOMAIN)
    """Cluster only: train with Kubeflow Trainer v2 instead of a PyTorchJob: the name of a ClusterTrainingRuntime
    (e.g. torch-distributed); each training step is then a TrainJob (trainer.kubeflow.org/v1alpha1). Empty: a
    PyTorchJob (Kubeflow Training Operator v1)."""
    # Regularised SPIN variants (opt-in; the defaults are the paper's method). See README and spin_core/losses.py.
    objective: Literal["spin", "sft"] = "spin"
    """spin: the SPIN loss (plus the opt-in terms below); sft: continued SFT through the same trainer, optimizer and
    data: the real answer's mean per-token NLL only (plus klToBase when set; loss, beta and sftWeight unused).
    The control arm that says what self-play adds over more SFT."""
    sft_weight: float = Field(default=0.0, ge=0.0)
    """Adds sftWeight x the mean per-token NLL of the real answer to each pair's loss (RPO-style anchoring);
    0 is the paper's SPIN."""
    opponent: Literal["previous", "mixture"] = "previous"
    """previous: M_{t-1} is the opponent (the paper); mixture: a geometric mixture of the latest iterates
    (opponentMixture)."""
    opponent_mixture: OpponentMixture | None = None
    """With opponent mixture: its alpha and history; empty means alpha 0.5, history 2. Ignored otherwise."""
    kl_to_base: float = Field(default=0.0, ge=0.0)
    """Adds klToBase x a divergence of the policy from the base model (spec.model.uri) on the real answer's
    tokens: the mean over them of exp(r) - 1 - r, r = log p_base - log p_policy (k3 estimator); 0 is off."""
    drop_identical_pairs: bool = False
    """Drop pairs whose generated answer equals the real one (they carry no SPIN gradient); they are counted
    and reported either way."""
    truncated_answers: Literal["keep", "drop"] = "keep"
    """Generated answers cut at generation.maxNewTokens: keep them as sampled (no end-of-turn token is
    invented), or drop their pairs; counted either way (pairs/truncated)."""
    collapse_warn_nats: float = Field(default=1.0, gt=0.0)
    """Warn (log, metrics.json, status) when the mean log p(real answer) under the policy falls by more than
    this many nats during an iteration (last quarter of steps vs M_{t-1} on the same pairs)."""

    @model_validator(mode="after")
    def _consistent(self) -> Training:
        if self.max_prompt_length >= self.max_length:
            raise FieldProblem(
                ("maxPromptLength",),
                f"must be smaller than maxLength ({self.max_length}), got {self.max_prompt_length}",
            )
        if self.gpus_per_node and self.processes_per_node > self.gpus_per_node:
            raise FieldProblem(
                ("processesPerNode",),
                f"must be at most gpusPerNode ({self.gpus_per_node}): one process per GPU, got "
                f"{self.processes_per_node}",
            )
        per_step = self.micro_batch_size * self.nodes * self.processes_per_node
        if self.global_batch_size % per_step:
            raise FieldProblem(
                ("globalBatchSize",),
                f"must be a multiple of microBatchSize x nodes x processesPerNode "
                f"({self.micro_batch_size} x {self.nodes} x {self.processes_per_node} = {per_step}), "
                f"got {self.global_batch_size}",
            )
        return self


TRAINING_RULES = [
    {
        "rule": "self.gpusPerNode == 0 || self.processesPerNode <= self.gpusPerNode",
        "message": "processesPerNode must be at most gpusPerNode (one process per GPU)",
        "fieldPath": ".processesPerNode",
    },
    {
        "rule": "self.maxPromptLength < self.maxLength",
        "message": "maxPromptLength must be smaller than maxLength",
        "fieldPath": ".maxPromptLength",
    },
    {
        "rule": "self.globalBatchSize % (self.microBatchSize * self.nodes * self.processesPerNode) == 0",
        "message": "globalBatchSize must be a multiple of microBatchSize x nodes x processesPerNode",
        "fieldPath": ".globalBatchSize",
    },
]


class ScheduleEntry(Spec):
    """Overrides for one iteration (the official recipe lowers the learning rate after iteration 1)."""

    iteration: int = Field(ge=1, le=MAX_ITERATIONS)
    """Iteration the overrides apply to (1-based, at most spec.iterations)."""
    beta: float | None = Field(default=None, gt=0.0)
    """training.beta for this iteration."""
    learning_rate: float | None = Field(default=None, gt=0.0)
    """training.learningRate for this iteration."""
    epochs: int | None = Field(default=None, ge=1, le=1000)
    """training.epochs for this iteration."""


class StopWhen(Spec):
    """When to end a run early (after an iteration's evaluation). Every rule is off by default."""

    patience: int = Field(default=0, ge=0, le=MAX_ITERATIONS)
    """Stop when evaluation.metric has not improved by more than minDelta for this many iterations; 0 is off."""
    min_delta: float = Field(default=0.0, ge=0.0)
    """Smallest improvement that counts."""
    margin_below: float | None = None
    """Stop when the held-out reward margin of the new model against its opponent falls below this."""
    collapse: bool = False
    """Stop when an iteration's evaluation warns of a collapse: its held-out score fell below M_{t-1}'s by more than
    2 standard errors of the paired change, or its held-out log p(real answer) fell by more than
    training.collapseWarnNats. The evaluation warns either way; this makes the warning end the run."""


class Evaluation(Spec):
    """Evaluate every iteration on held-out prompts (`iter-<t>/eval.json`); pick the best; stop early."""

    heldout_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Share of the dataset held out (chosen by a hash of each prompt id; never generated for nor trained on)."""
    dataset: Dataset | None = None
    """A separate held-out dataset instead of heldoutFraction."""
    max_samples: int = Field(default=256, ge=1, le=MAX_INTEGER)
    """Evaluate at most this many held-out prompts."""
    scorer: str | None = Field(default=None, pattern=SCORER)
    """Task scorer as module:function(prompt, reference, generated) -> number, e.g. spin_core.demo:score."""
    metric: Literal["score", "rewards/margins", "rewards/accuracies"] = "score"
    """What bestIteration and stopWhen.patience look at; score needs a scorer."""
    backend: Literal["vllm", "hf"] | None = None
    """Engine for the held-out answers; empty means generation.backend."""
    max_new_tokens: int | None = Field(default=None, ge=1, le=1_048_576)
    """Longest held-out answer; empty means generation.maxNewTokens."""
    stop_when: StopWhen = Field(default_factory=StopWhen, json_schema_extra={"default": {}})

    @model_validator(mode="after")
    def _source(self) -> Evaluation:
        if (self.heldout_fraction > 0) == (self.dataset is not None):
            where = "dataset" if self.dataset is not None else "heldoutFraction"
            raise FieldProblem((where,), "set exactly one of heldoutFraction (> 0) and dataset")
        if self.metric == "score" and not self.scorer:
            raise FieldProblem(
                ("scorer",), "metric score needs a scorer (module:function); or use metric rewards/margins"
            )
        return self


EVALUATION_RULES = [
    {
        "rule": "(self.heldoutFraction > 0.0) != has(self.dataset)",
        "message": "set exactly one of heldoutFraction (> 0) and dataset",
        "fieldPath": ".heldoutFraction",
    },
    {
        "rule": "self.metric != 'score' || has(self.scorer)",
        "message": "metric score needs a scorer (module:function)",
        "fieldPath": ".scorer",
    },
]


class SpinRunSpec(Spec):
    """What a SpinRun does: start from model, answer dataset prompts, train against itself, repeat."""

    model: ModelSource
    """The SFT model of iteration 1's opponent."""
    dataset: Dataset
    """The SFT data: prompts and real answers."""
    storage: Storage
    """Where every artefact of the run is written."""
    iterations: int = Field(default=3, ge=1, le=MAX_ITERATIONS)
    """Number of SPIN iterations (generate + train)."""
    mix_previous_iterations: int = Field(default=1, ge=0, le=MAX_ITERATIONS)
    """Iteration t also trains on the pairs generated in the N iterations before it."""
    generation: Generation = Field(default_factory=Generation, json_schema_extra={"default": {}})
    """Step 1 of each iteration: the current model answers every prompt."""
    training: Training = Field(default_factory=Training, json_schema_extra={"default": {}})
    """Step 2 of each iteration: the model learns to prefer the real answers over its own."""
    schedule: list[ScheduleEntry] = Field(
        default_factory=list,
        max_length=MAX_ITERATIONS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["iteration"]},
    )
    """Per-iteration overrides of beta, learningRate and epochs; at most one entry per iteration."""
    suspend: bool = False
    """Cluster only: true suspends the running step's pods; false resumes."""
    pods: PodSettings = Field(default_factory=PodSettings, json_schema_extra={"default": {}})
    """Cluster only: identity and placement of every pod of the run; spec.generation and spec.training override
    them per step (see PodSettings for the merge rule)."""
    queue_name: str | None = Field(default=None, max_length=253, pattern=DNS1123_SUBDOMAIN)
    """Cluster only: the Kueue LocalQueue (in the run's namespace) every step is submitted to: children are created
    suspended with the label kueue.x-k8s.io/queue-name and start when Kueue admits them."""
    workload_priority_class: str | None = Field(default=None, max_length=253, pattern=DNS1123_SUBDOMAIN)
    """Cluster only, with queueName: the Kueue WorkloadPriorityClass of every step (kueue.x-k8s.io/priority-class)."""
    evaluation: Evaluation | None = None
    """Held-out evaluation after every iteration, early stopping and the best checkpoint; off when empty."""

    @model_validator(mode="after")
    def _schedule(self) -> SpinRunSpec:
        if self.workload_priority_class and not self.queue_name:
            raise FieldProblem(("workloadPriorityClass",), "needs queueName (a Kueue priority applies to a queue)")
        seen: set[int] = set()
        for i, entry in enumerate(self.schedule):
            if entry.iteration > self.iterations:
                raise FieldProblem(
                    ("schedule", i, "iteration"),
                    f"iteration {entry.iteration} does not exist: the run has {self.iterations} iterations "
                    f"(spec.iterations); allowed is 1 to {self.iterations}",
                )
            if entry.iteration in seen:
                raise FieldProblem(
                    ("schedule", i, "iteration"), f"iteration {entry.iteration} appears more than once in schedule"
                )
            seen.add(entry.iteration)
        return self


SPEC_RULES = [
    {
        "rule": "!has(self.workloadPriorityClass) || has(self.queueName)",
        "message": "workloadPriorityClass needs queueName (a Kueue priority applies to a queue)",
        "fieldPath": ".workloadPriorityClass",
    },
    {
        "rule": "!has(self.schedule) || self.schedule.all(s, s.iteration <= self.iterations)",
        "message": "every schedule entry must name an iteration between 1 and spec.iterations",
        "fieldPath": ".schedule",
    },
]


class Condition(Spec):
    """A Kubernetes-style condition."""

    model_config = ConfigDict(extra="allow", strict=False, allow_inf_nan=True)
    type: str
    """Kind of condition, e.g. Ready or Degraded."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = ""
    """One CamelCase word saying why."""
    message: str = ""
    """Human-readable details."""
    last_transition_time: str | None = None
    """When status last changed (RFC 3339)."""
    observed_generation: int | None = None
    """metadata.generation the condition was computed from."""


class IterationRecord(Spec):
    """What happened in one iteration."""

    model_config = ConfigDict(extra="allow", strict=False, allow_inf_nan=True)
    iteration: int
    """The iteration (1-based)."""
    phase: str = "Pending"
    """Pending, Generating, Training, Suspended, Succeeded (the model is trained) or Failed."""
    generation_job: str | None = None
    """Name of the generation Job."""
    training_job: str | None = None
    """Name of the training job."""
    evaluation_job: str | None = None
    """Name of the evaluation Job (spec.evaluation set)."""
    evaluation: dict[str, float] = Field(default_factory=dict)
    """The iteration's evaluation (iter-<t>/eval.json's numbers), once evaluated."""
    shards_done: int = 0
    """Generation shards finished."""
    shards: int = 0
    """Generation shards in all."""
    started_at: str | None = None
    """When the iteration started (RFC 3339)."""
    finished_at: str | None = None
    """When the iteration ended (RFC 3339)."""
    retries: int = 0
    """Failed attempts retried so far."""
    checkpoint: str | None = None
    """URI of the model this iteration trained."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Training and evaluation metrics of the iteration."""
    message: str | None = None
    """Human-readable details."""


class SpinRunStatus(Spec):
    """Filled by the operator (and mirrored by `spin run` in its summary)."""

    model_config = ConfigDict(extra="allow", strict=False, allow_inf_nan=True)
    phase: Literal["Pending", "Generating", "Training", "Evaluating", "Succeeded", "Failed", "Suspended"] | None = None
    """Where the run is: Pending, Generating, Training, Evaluating, Suspended, Succeeded or Failed."""
    iteration: int | None = None
    """Iteration in progress (1-based)."""
    progress: str | None = None
    """Human-readable progress, e.g. 2/3."""
    observed_generation: int | None = None
    """metadata.generation the status was computed from."""
    latest_checkpoint: str | None = None
    """URI of the newest trained model."""
    best_iteration: int | None = None
    """Iteration whose model scored best on evaluation.metric."""
    best_checkpoint: str | None = None
    """URI of that model: the one to deploy."""
    best_metric: float | None = None
    """Its value of evaluation.metric."""
    stop_reason: str | None = None
    """Why the run ended before spec.iterations, when it did."""
    iterations: list[IterationRecord] = Field(default_factory=list)
    """One record per iteration started."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Ready, Degraded and the other conditions of the run."""
    message: str | None = None
    """Human-readable state of the run."""


class ObjectMeta(BaseModel):
    """The parts of Kubernetes metadata SpinRun cares about; the API server's own fields pass through."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(max_length=MAX_NAME_LENGTH, pattern=DNS1035_LABEL)
    namespace: str | None = Field(default=None, max_length=63, pattern=DNS1123_LABEL)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class SpinRun(BaseModel):
    """A SpinRun custom resource."""

    model_config = ConfigDict(extra="forbid", serialize_by_alias=True, validate_by_alias=True)
    api_version: Literal["selfplay.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["SpinRun"]
    metadata: ObjectMeta
    spec: SpinRunSpec
    status: SpinRunStatus | None = None

    def iteration_settings(self, iteration: int) -> tuple[float, float, int]:
        """(beta, learning rate, epochs) for an iteration, with the schedule applied."""
        training = self.spec.training
        beta, lr, epochs = training.beta, training.learning_rate, training.epochs
        for entry in self.spec.schedule:
            if entry.iteration == iteration:
                beta = entry.beta if entry.beta is not None else beta
                lr = entry.learning_rate if entry.learning_rate is not None else lr
                epochs = entry.epochs if entry.epochs is not None else epochs
        return beta, lr, epochs

    def to_document(self) -> dict[str, Any]:
        """The resource as a plain dict, defaults filled in (what `run.json` and the ConfigMap hold)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})

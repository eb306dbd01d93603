"""The SpinRun resource: the one source of truth for the CRD, the operator, the local runner and the jobs.

Field names are the Kubernetes (camelCase) names; Python code uses the snake_case attribute names.
Defaults are the official SPIN recipe's (alignment-handbook zephyr-7b-sft-full, 3 iterations).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

GROUP = "selfplay.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "SpinRun"
PLURAL = "spinruns"
SHORT_NAME = "spin"

# Children are named "<run>-i<t>-gen" / "<run>-i<t>-train"; Kubernetes adds pod suffixes. 40 leaves room.
MAX_NAME_LENGTH = 40
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
S3_URI = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$"
STORE_URI = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|file://.+)$"
QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


class Spec(BaseModel):
    """Base for every part of the spec: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_alias=True,
        validate_by_name=False,
        serialize_by_alias=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )


Quantity = Annotated[
    int | str,
    Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY}),
]


class Resources(Spec):
    """Kubernetes resource requests and limits for a container (GPUs are set by the GPU fields)."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    """Minimum resources, e.g. {cpu: 8, memory: 64Gi}."""
    limits: dict[str, Quantity] = Field(default_factory=dict)
    """Maximum resources, e.g. {memory: 64Gi}."""

    @field_validator("requests", "limits")
    @classmethod
    def _quantities(cls, value: dict[str, int | str]) -> dict[str, int | str]:
        for name, quantity in value.items():
            if isinstance(quantity, str) and not re.match(QUANTITY, quantity):
                raise ValueError(f"{name}: {quantity!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
        return value


class Toleration(Spec):
    """A Kubernetes toleration for the pods of a step."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Placement(Spec):
    """Where and how the pods of a step run in a cluster (ignored by `spin run`)."""

    image: str | None = None
    """Container image; empty means the operator's default for this step."""
    resources: Resources = Field(default_factory=Resources)
    """CPU and memory requests/limits of each pod."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the pods must match."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Taints the pods tolerate."""


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
    max_samples: int = Field(default=0, ge=0)
    """Use only the first N rows; 0 means all."""
    on_bad_row: Literal["fail", "skip"] = "fail"
    """fail: stop with the file and line of the first bad row; skip: drop and count bad rows."""


class Storage(Spec):
    """Where everything the run writes lives (see the store layout in README)."""

    uri: str = Field(pattern=STORE_URI)
    """Run root: s3://bucket/prefix or file://path."""
    endpoint: str | None = Field(default=None, pattern=r"^https?://.+")
    """S3-compatible endpoint URL (MinIO, SeaweedFS, Ceph...); empty means AWS."""
    region: str | None = None
    """S3 region; empty means the SDK default."""
    credentials_secret: str | None = Field(default=None, pattern=DNS1123_LABEL.replace("^[a-z0-9]", "^[a-z0-9.]"))
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
    max_new_tokens: int = Field(default=256, ge=1)
    """Longest generated answer, in tokens."""
    seed: int = Field(default=0, ge=0)
    """Base sampling seed; shard i of iteration t uses a seed derived from it, so reruns are reproducible."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Engine dtype; auto is bfloat16 on GPU, float32 on CPU."""
    batch_size: int = Field(default=32, ge=1)
    """Prompts per batch for the hf backend (vLLM schedules all prompts of a shard itself)."""
    opponent_logprobs: bool | None = None
    """Also store the generating model's log-probs of both answers; empty means on when
    training.referenceLogprobs is precompute and the engine runs in float32."""
    gpus_per_shard: int = Field(default=1, ge=0)
    """GPUs per shard pod (nvidia.com/gpu); also vLLM's tensor parallel size."""
    backoff_limit_per_index: int = Field(default=2, ge=0)
    """Retries of one failed shard before the Job fails."""


class Lora(Spec):
    """Train LoRA adapters (peft) instead of all weights; the published model has them merged."""

    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class Training(Placement):
    """Step 2 of each iteration: the model learns to prefer the real answers over its own."""

    loss: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    """SPIN loss: sigmoid (logistic, the paper), hinge, or ipo."""
    beta: float = Field(default=0.1, gt=0.0)
    """Inverse temperature of the loss (the paper's lambda)."""
    learning_rate: float = Field(default=5e-7, gt=0.0)
    """Peak learning rate."""
    epochs: int = Field(default=2, ge=1)
    """Passes over the iteration's pairs."""
    global_batch_size: int = Field(default=64, ge=1)
    """Pairs per optimizer step across all processes (reached by gradient accumulation)."""
    micro_batch_size: int = Field(default=8, ge=1)
    """Pairs per forward pass on one process."""
    max_length: int = Field(default=1024, ge=2)
    """Longest prompt+answer sequence, in tokens."""
    max_prompt_length: int = Field(default=512, ge=1)
    """Prompts are truncated (from the left) to this many tokens."""
    optimizer: Literal["rmsprop", "adamw"] = "rmsprop"
    """rmsprop is the official recipe's."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    warmup_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """Share of steps with a linear learning-rate warm-up; the rest decays linearly to 0."""
    zero_stage: Literal[0, 2, 3] = 3
    """DeepSpeed ZeRO stage."""
    reference_logprobs: Literal["precompute", "online"] = "precompute"
    """precompute: score all pairs with the opponent once, then train without it in memory;
    online: keep the frozen opponent and score each batch."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora: Lora | None = None
    """Train LoRA adapters instead of all weights."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto is bfloat16 on GPU, float32 on CPU."""
    seed: int = Field(default=42, ge=0)
    """Shuffling and initialisation seed."""
    checkpoint_every_steps: int = Field(default=50, ge=1)
    """Save a resumable training state to the store every N optimizer steps."""
    nodes: int = Field(default=1, ge=1)
    """Nodes of the PyTorchJob (one Master, nodes-1 Workers)."""
    processes_per_node: int = Field(default=8, ge=1)
    """Training processes per node (GPUs per node on a GPU cluster)."""
    gpus_per_node: int = Field(default=8, ge=0)
    """GPUs requested per training pod (nvidia.com/gpu)."""
    backoff_limit: int = Field(default=2, ge=0)
    """Retries of a failed training job before the iteration fails."""

    @model_validator(mode="after")
    def _consistent(self) -> Training:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"maxPromptLength ({self.max_prompt_length}) must be smaller than maxLength ({self.max_length})"
            )
        per_step = self.micro_batch_size * self.nodes * self.processes_per_node
        if self.global_batch_size % per_step:
            raise ValueError(
                f"globalBatchSize ({self.global_batch_size}) must be a multiple of microBatchSize x nodes x "
                f"processesPerNode ({self.micro_batch_size} x {self.nodes} x {self.processes_per_node} = {per_step})"
            )
        return self


TRAINING_RULES = [
    {"rule": "self.maxPromptLength < self.maxLength", "message": "maxPromptLength must be smaller than maxLength"},
    {
        "rule": "self.globalBatchSize % (self.microBatchSize * self.nodes * self.processesPerNode) == 0",
        "message": "globalBatchSize must be a multiple of microBatchSize x nodes x processesPerNode",
    },
]


class ScheduleEntry(Spec):
    """Overrides for one iteration (the official recipe lowers the learning rate after iteration 1)."""

    iteration: int = Field(ge=1)
    """Iteration the overrides apply to (1-based)."""
    beta: float | None = Field(default=None, gt=0.0)
    learning_rate: float | None = Field(default=None, gt=0.0)
    epochs: int | None = Field(default=None, ge=1)


class StopWhen(Spec):
    """When to end a run early (after an iteration's evaluation). Both rules are off by default."""

    patience: int = Field(default=0, ge=0)
    """Stop when evaluation.metric has not improved by more than minDelta for this many iterations; 0 is off."""
    min_delta: float = Field(default=0.0, ge=0.0)
    """Smallest improvement that counts."""
    margin_below: float | None = None
    """Stop when the held-out reward margin of the new model against its opponent falls below this."""


class Evaluation(Spec):
    """Evaluate every iteration on held-out prompts (`iter-<t>/eval.json`); pick the best; stop early."""

    heldout_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Share of the dataset held out (chosen by a hash of each prompt id; never generated for nor trained on)."""
    dataset: Dataset | None = None
    """A separate held-out dataset instead of heldoutFraction."""
    max_samples: int = Field(default=256, ge=1)
    """Evaluate at most this many held-out prompts."""
    scorer: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    """Task scorer as module:function(prompt, reference, generated) -> number, e.g. spin_core.demo:score."""
    metric: Literal["score", "rewards/margins", "rewards/accuracies"] = "score"
    """What bestIteration and stopWhen.patience look at; score needs a scorer."""
    backend: Literal["vllm", "hf"] | None = None
    """Engine for the held-out answers; empty means generation.backend."""
    max_new_tokens: int | None = Field(default=None, ge=1)
    """Longest held-out answer; empty means generation.maxNewTokens."""
    stop_when: StopWhen = Field(default_factory=StopWhen)

    @model_validator(mode="after")
    def _source(self) -> Evaluation:
        if (self.heldout_fraction > 0) == (self.dataset is not None):
            raise ValueError("set exactly one of heldoutFraction (> 0) and dataset")
        if self.metric == "score" and not self.scorer:
            raise ValueError("metric score needs a scorer (module:function); or use metric rewards/margins")
        return self


EVALUATION_RULES = [
    {
        "rule": "(self.heldoutFraction > 0.0) != has(self.dataset)",
        "message": "set exactly one of heldoutFraction (> 0) and dataset",
    },
    {"rule": "self.metric != 'score' || has(self.scorer)", "message": "metric score needs a scorer"},
]


class SpinRunSpec(Spec):
    """What a SpinRun does: start from model, answer dataset prompts, train against itself, repeat."""

    model: ModelSource
    """The SFT model of iteration 1's opponent."""
    dataset: Dataset
    """The SFT data: prompts and real answers."""
    storage: Storage
    """Where every artefact of the run is written."""
    iterations: int = Field(default=3, ge=1, le=100)
    """Number of SPIN iterations (generate + train)."""
    mix_previous_iterations: int = Field(default=1, ge=0)
    """Iteration t also trains on the pairs generated in the N iterations before it."""
    generation: Generation = Field(default_factory=Generation)
    training: Training = Field(default_factory=Training)
    schedule: list[ScheduleEntry] = Field(default_factory=list)
    """Per-iteration overrides of beta, learningRate and epochs."""
    suspend: bool = False
    """Cluster only: true suspends the running step's pods; false resumes."""
    evaluation: Evaluation | None = None
    """Held-out evaluation after every iteration, early stopping and the best checkpoint; off when empty."""

    @model_validator(mode="after")
    def _schedule(self) -> SpinRunSpec:
        seen: set[int] = set()
        for i, entry in enumerate(self.schedule):
            if entry.iteration > self.iterations:
                raise ValueError(
                    f"schedule[{i}].iteration is {entry.iteration} but the run has only {self.iterations} iterations"
                )
            if entry.iteration in seen:
                raise ValueError(f"schedule[{i}]: iteration {entry.iteration} appears more than once")
            seen.add(entry.iteration)
        return self


SPEC_RULES = [
    {
        "rule": "self.schedule.all(s, s.iteration <= self.iterations)",
        "message": "every schedule entry must name an iteration between 1 and spec.iterations",
    },
]


class Condition(Spec):
    """A Kubernetes-style condition."""

    model_config = ConfigDict(extra="allow")
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class IterationRecord(Spec):
    """What happened in one iteration."""

    model_config = ConfigDict(extra="allow")
    iteration: int
    phase: str = "Pending"
    generation_job: str | None = None
    training_job: str | None = None
    shards_done: int = 0
    shards: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    retries: int = 0
    checkpoint: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    message: str | None = None


class SpinRunStatus(Spec):
    """Filled by the operator (and mirrored by `spin run` in its summary)."""

    model_config = ConfigDict(extra="allow")
    phase: Literal["Pending", "Generating", "Training", "Succeeded", "Failed", "Suspended"] | None = None
    iteration: int | None = None
    """Iteration in progress (1-based)."""
    progress: str | None = None
    """Human-readable progress, e.g. 2/3."""
    observed_generation: int | None = None
    latest_checkpoint: str | None = None
    best_iteration: int | None = None
    """Iteration whose model scored best on evaluation.metric."""
    best_checkpoint: str | None = None
    """URI of that model: the one to deploy."""
    stop_reason: str | None = None
    """Why the run ended before spec.iterations, when it did."""
    iterations: list[IterationRecord] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
    message: str | None = None


class ObjectMeta(BaseModel):
    """The parts of Kubernetes metadata SpinRun cares about; the API server's own fields pass through."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(max_length=MAX_NAME_LENGTH, pattern=DNS1123_LABEL)
    namespace: str | None = Field(default=None, pattern=DNS1123_LABEL)
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

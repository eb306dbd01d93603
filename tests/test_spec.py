"""The SpinRun models: recipe defaults, schedule, to_document, and property tests against the generated CRD.

Random valid documents must round-trip through YAML and be accepted by pydantic AND the CRD (schema + CEL);
random one-field mutations of them must be refused by BOTH, with a message naming the field.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spin_core import spec as s
from spin_core.resource import SpecError, dump_yaml, load_all, load_documents, parse
from tests.spin_schema import api_server_errors

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("SPIN_HYPOTHESIS_EXAMPLES", "60"))
# CI replays the same examples every run (a landing must not hinge on the draw); elsewhere every run explores anew.
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)
MUTATION = settings(PROPERTY, max_examples=max(EXAMPLES // 4, 5))  # per kind of mistake

# -- strategies ---------------------------------------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20)
NAMES = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?", fullmatch=True)
RUN_NAMES = st.from_regex(rf"[a-z]([-a-z0-9]{{0,{s.MAX_NAME_LENGTH - 2}}}[a-z0-9])?", fullmatch=True)
BUCKETS = st.from_regex(r"[a-z0-9][a-z0-9.\-]{1,20}[a-z0-9]", fullmatch=True)
KEYS = st.from_regex(r"[A-Za-z0-9_./\-]{1,30}", fullmatch=True)
URIS = st.one_of(
    st.builds(lambda b: f"s3://{b}", BUCKETS),
    st.builds(lambda b, k: f"s3://{b}/{k}", BUCKETS, KEYS),
    st.builds(lambda k: f"file://{k}", KEYS),
)
SUBDOMAINS = st.from_regex(
    r"[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?){0,3}", fullmatch=True
)
QUANTITIES = st.one_of(
    st.integers(0, 10**6), st.from_regex(r"[0-9]{1,4}(\.[0-9]{1,2})?(m|Ki|Mi|Gi|Ti|k|M|G)?", fullmatch=True)
)


def floats(low: float, high: float, **kw: Any) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_infinity=False, **kw)


def optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A mapping where each field may be left out (then the default applies)."""
    return st.fixed_dictionaries({}, optional=fields)


RESOURCES = optional(
    requests=st.dictionaries(st.sampled_from(["cpu", "memory", "ephemeral-storage"]), QUANTITIES, max_size=3),
    limits=st.dictionaries(st.sampled_from(["cpu", "memory"]), QUANTITIES, max_size=2),
)
TOLERATIONS = st.lists(
    optional(
        key=TEXT,
        operator=st.sampled_from(["Exists", "Equal"]),
        value=TEXT,
        effect=st.sampled_from(["NoSchedule", "PreferNoSchedule", "NoExecute"]),
        tolerationSeconds=st.integers(0, 10**6),
    ),
    max_size=2,
)
KEY_REFS = st.fixed_dictionaries({"name": SUBDOMAINS, "key": st.from_regex(r"[-._a-zA-Z0-9]{1,12}", fullmatch=True)})
ENV = st.lists(
    st.fixed_dictionaries(
        {"name": st.from_regex(r"[A-Z_][A-Z0-9_]{0,12}", fullmatch=True)},
        optional={"value": TEXT},
    ).map(lambda e: e if "value" in e else {**e, "valueFrom": {"secretKeyRef": {"name": "s3", "key": "token"}}}),
    max_size=2,
)
VOLUMES = st.lists(
    st.builds(
        lambda name, path, source, ref: {"name": f"v-{name}", "mountPath": f"/{path}", source: ref},
        NAMES.filter(lambda n: len(n) < 60),
        KEYS,
        st.sampled_from(["persistentVolumeClaim", "configMap", "secret"]),
        SUBDOMAINS,
    ),
    max_size=2,
    unique_by=lambda v: v["name"],
)
POD_SETTINGS = {
    "serviceAccountName": SUBDOMAINS,
    "imagePullSecrets": st.lists(SUBDOMAINS, max_size=2),
    "priorityClassName": SUBDOMAINS,
    "nodeSelector": st.dictionaries(TEXT, TEXT, max_size=2),
    "affinity": st.just(
        {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}
    ),
    "tolerations": TOLERATIONS,
    "podLabels": st.dictionaries(NAMES, NAMES, max_size=2),
    "podAnnotations": st.dictionaries(NAMES, TEXT, max_size=2),
    "env": ENV,
    "volumes": VOLUMES,
    "scratchSize": QUANTITIES,
    "scratchClaim": SUBDOMAINS,
    "activeDeadlineSeconds": st.integers(1, 10**6),
}
PLACEMENT = {"image": TEXT, "resources": RESOURCES, **POD_SETTINGS}
GENERATION = optional(
    backend=st.sampled_from(["vllm", "hf"]),
    shards=st.integers(1, 1024),
    temperature=floats(0.0, 5.0),
    topP=floats(0.0, 1.0, exclude_min=True),
    maxNewTokens=st.integers(1, 4096),
    seed=st.integers(0, s.SEED_MAX),
    dtype=st.sampled_from(["auto", "float32", "bfloat16", "float16"]),
    batchSize=st.integers(1, 512),
    opponentLogprobs=st.booleans(),
    gpusPerShard=st.integers(0, 8),
    backoffLimitPerIndex=st.integers(0, 10),
    **PLACEMENT,
)
LORA = optional(
    r=st.integers(1, 256),
    alpha=st.integers(1, 512),
    dropout=floats(0.0, 1.0, exclude_max=True),
    targetModules=st.lists(st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]), max_size=5),
)


@st.composite
def batches(draw: st.DrawFn) -> dict[str, int]:
    """globalBatchSize, microBatchSize, nodes, processesPerNode that fit together (or all left to the defaults)."""
    if draw(st.booleans()):
        return {}
    micro, nodes, procs = draw(st.integers(1, 16)), draw(st.integers(1, 4)), draw(st.integers(1, 8))
    return {
        "microBatchSize": micro,
        "nodes": nodes,
        "processesPerNode": procs,
        "globalBatchSize": micro * nodes * procs * draw(st.integers(1, 8)),
    }


@st.composite
def lengths(draw: st.DrawFn) -> dict[str, int]:
    if draw(st.booleans()):
        return {}
    max_length = draw(st.integers(2, 8192))
    return {"maxLength": max_length, "maxPromptLength": draw(st.integers(1, max_length - 1))}


@st.composite
def trainings(draw: st.DrawFn) -> dict[str, Any]:
    fields = draw(
        optional(
            loss=st.sampled_from(["sigmoid", "hinge", "ipo"]),
            beta=floats(0.0, 10.0, exclude_min=True),
            learningRate=floats(0.0, 1e-2, exclude_min=True),
            epochs=st.integers(1, 10),
            optimizer=st.sampled_from(["rmsprop", "adamw"]),
            weightDecay=floats(0.0, 1.0),
            warmupRatio=floats(0.0, 1.0),
            zeroStage=st.sampled_from([0, 2, 3]),
            referenceLogprobs=st.sampled_from(["precompute", "online"]),
            gradientCheckpointing=st.booleans(),
            lora=LORA,
            dtype=st.sampled_from(["auto", "float32", "bfloat16"]),
            seed=st.integers(0, s.SEED_MAX),
            checkpointEverySteps=st.integers(1, 10**6),
            gpusPerNode=st.sampled_from([0, 8]),  # batches() draws processesPerNode <= 8
            backoffLimit=st.integers(0, 10),
            **PLACEMENT,
        )
    )
    return fields | draw(batches()) | draw(lengths())


DATASETS = st.builds(
    lambda uri, rest: {"uri": uri, **rest},
    URIS,
    optional(
        format=st.sampled_from(["messages", "prompt-response"]),
        messagesField=TEXT.filter(bool),
        promptField=TEXT.filter(bool),
        responseField=TEXT.filter(bool),
        maxSamples=st.integers(0, 10**9),
        onBadRow=st.sampled_from(["fail", "skip"]),
    ),
)


@st.composite
def evaluations(draw: st.DrawFn) -> dict[str, Any]:
    out = draw(
        optional(
            maxSamples=st.integers(1, 10**6),
            backend=st.sampled_from(["vllm", "hf"]),
            maxNewTokens=st.integers(1, 4096),
            stopWhen=optional(patience=st.integers(0, 10), minDelta=floats(0.0, 1.0), marginBelow=floats(-10.0, 10.0)),
        )
    )
    if draw(st.booleans()):
        out["heldoutFraction"] = draw(floats(0.0, 1.0, exclude_min=True, exclude_max=True))
    else:
        out["dataset"] = draw(DATASETS)
    out["metric"] = draw(st.sampled_from(["score", "rewards/margins", "rewards/accuracies"]))
    if out["metric"] == "score" or draw(st.booleans()):
        out["scorer"] = draw(st.from_regex(r"[a-z_][a-z0-9_.]{0,10}:[a-z_][a-z0-9_]{0,10}", fullmatch=True))
    return out


@st.composite
def schedules(draw: st.DrawFn, iterations: int) -> list[dict[str, Any]]:
    chosen = draw(st.lists(st.integers(1, iterations), unique=True, max_size=iterations))
    return [
        {"iteration": t}
        | draw(
            optional(
                beta=floats(0.0, 10.0, exclude_min=True),
                learningRate=floats(0.0, 1e-2, exclude_min=True),
                epochs=st.integers(1, 10),
            )
        )
        for t in chosen
    ]


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """A random valid SpinRun document (as a user would write it: any subset of the optional fields)."""
    iterations = draw(st.integers(1, 12))
    storage = {"uri": draw(URIS)} | draw(
        optional(
            endpoint=st.builds(lambda h: f"http://{h}:9000", SUBDOMAINS),
            region=TEXT,
            credentialsSecret=SUBDOMAINS,
        )
    )
    spec: dict[str, Any] = {
        "model": {"uri": draw(URIS)},
        "dataset": draw(DATASETS),
        "storage": storage,
        "iterations": iterations,
    }
    spec |= draw(
        optional(
            mixPreviousIterations=st.integers(0, 5),
            generation=GENERATION,
            training=trainings(),
            schedule=schedules(iterations),
            suspend=st.booleans(),
            evaluation=evaluations(),
            pods=optional(**POD_SETTINGS),
            queueName=SUBDOMAINS,
        )
    )
    if "queueName" in spec and draw(st.booleans()):
        spec["workloadPriorityClass"] = draw(SUBDOMAINS)
    metadata = {"name": draw(RUN_NAMES)} | draw(
        optional(namespace=NAMES, labels=st.dictionaries(NAMES, NAMES, max_size=2))
    )
    return {"apiVersion": s.API_VERSION, "kind": s.KIND, "metadata": metadata, "spec": spec}


# -- mutations that make a valid document invalid -----------------------------------------------------------------


def _get(doc: dict[str, Any], path: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        node = node.setdefault(part, {})
    return node


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    (_get(doc, ".".join(parents)) if parents else doc)[last] = value


OUT_OF_RANGE = {
    "spec.iterations": st.one_of(st.integers(max_value=0), st.integers(min_value=101)),
    "spec.mixPreviousIterations": st.integers(max_value=-1),
    "spec.generation.shards": st.one_of(st.integers(max_value=0), st.integers(1025, 10**6)),
    "spec.generation.topP": st.one_of(floats(-10.0, 0.0), floats(1.0, 10.0, exclude_min=True)),
    "spec.generation.temperature": floats(-10.0, 0.0, exclude_max=True),
    "spec.generation.maxNewTokens": st.integers(max_value=0),
    "spec.generation.seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=s.SEED_MAX + 1)),
    "spec.training.beta": floats(-10.0, 0.0),
    "spec.training.learningRate": floats(-1.0, 0.0),
    "spec.training.warmupRatio": st.one_of(floats(-1.0, 0.0, exclude_max=True), floats(1.0, 9.0, exclude_min=True)),
    "spec.training.epochs": st.integers(max_value=0),
    "spec.training.nodes": st.integers(max_value=0),
    "spec.dataset.maxSamples": st.integers(max_value=-1),
}
ENUMS = {
    "spec.training.loss": ["sigmoid", "hinge", "ipo"],
    "spec.training.optimizer": ["rmsprop", "adamw"],
    "spec.training.referenceLogprobs": ["precompute", "online"],
    "spec.generation.backend": ["vllm", "hf"],
    "spec.dataset.format": ["messages", "prompt-response"],
    "spec.dataset.onBadRow": ["fail", "skip"],
}
OBJECTS = {
    "": ["apiVersion", "kind", "metadata", "spec", "status"],
    "spec": list(s.SpinRunSpec.model_json_schema(by_alias=True)["properties"]),
    "spec.training": list(s.Training.model_json_schema(by_alias=True)["properties"]),
    "spec.generation": list(s.Generation.model_json_schema(by_alias=True)["properties"]),
    "spec.dataset": list(s.Dataset.model_json_schema(by_alias=True)["properties"]),
    "spec.storage": list(s.Storage.model_json_schema(by_alias=True)["properties"]),
    "spec.model": ["uri"],
}
BAD_NAMES = st.one_of(
    st.from_regex(r"[a-z0-9-]{0,10}[A-Z_.:/ ][a-z0-9-]{0,10}", fullmatch=True),
    st.from_regex(r"(?:-[a-z0-9-]{0,10}|[a-z0-9-]{0,10}-)", fullmatch=True),
    st.from_regex(rf"[a-z]{{{s.MAX_NAME_LENGTH + 1},60}}", fullmatch=True),
    st.from_regex(r"[0-9][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True),  # PyTorchJob names must start with a letter
    st.just(""),
)
BAD_SECRETS = st.one_of(
    st.from_regex(r"[a-z0-9-]{0,10}[A-Z_:/ ][a-z0-9-]{0,10}", fullmatch=True),
    st.from_regex(r"(?:-[a-z0-9.-]{0,10}|[a-z0-9.-]{0,10}[-.]|[a-z0-9]{1,5}\.\.[a-z0-9]{1,5})", fullmatch=True),
    st.from_regex(r"[a-z]{254,260}", fullmatch=True),
    st.just(""),
)
BAD_URIS = st.one_of(
    st.builds(lambda scheme, k: f"{scheme}://{k}", st.sampled_from(["http", "https", "gs", "S3", "hdfs", "s4"]), KEYS),
    KEYS.filter(lambda k: not k.startswith(("s3://", "file://"))),
    st.just("s3://"),
    st.just("file://"),
)


MUTATIONS = [
    "range", "enum", "zero-stage", "unknown", "uri", "name", "secret", "schedule-missing", "schedule-twice", "type",
    "prompt-length", "batch", "required", "env", "volume", "gpus", "priority-without-queue",
]  # fmt: skip


@st.composite
def mutations(draw: st.DrawFn, kind: str) -> tuple[dict[str, Any], str, str]:
    """(a valid document with one `kind` of mistake, field pydantic must name, field the CRD errors must name)."""
    doc = copy.deepcopy(draw(documents()))
    spec = doc["spec"]
    if kind == "range":
        path = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
        _set(doc, path, draw(OUT_OF_RANGE[path]))
        return doc, path, path
    if kind == "enum":
        path = draw(st.sampled_from(sorted(ENUMS)))
        _set(doc, path, draw(TEXT.filter(lambda v: v not in ENUMS[path])))
        return doc, path, path
    if kind == "zero-stage":
        _set(doc, "spec.training.zeroStage", draw(st.integers(-5, 10).filter(lambda v: v not in (0, 2, 3))))
        return doc, "spec.training.zeroStage", "spec.training.zeroStage"
    if kind == "unknown":
        where = draw(st.sampled_from(sorted(OBJECTS)))
        key = draw(
            st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,15}", fullmatch=True).filter(lambda k: k not in OBJECTS[where])
        )
        (_get(doc, where) if where else doc)[key] = draw(st.one_of(st.integers(), TEXT, st.booleans()))
        return doc, f"{where}.{key}".lstrip("."), where or "(object)"
    if kind == "uri":
        path = draw(st.sampled_from(["spec.model.uri", "spec.dataset.uri", "spec.storage.uri"]))
        _set(doc, path, draw(BAD_URIS))
        return doc, path, path
    if kind == "name":
        doc["metadata"]["name"] = draw(BAD_NAMES)
        return doc, "metadata.name", "metadata.name"
    if kind == "secret":
        spec["storage"]["credentialsSecret"] = draw(
            # A bad DNS-1123 label may still be a good subdomain (Secret names may hold dots: "0.0").
            st.one_of(
                BAD_NAMES.filter(lambda n: len(n) <= 40 and not re.fullmatch(s.DNS1123_SUBDOMAIN, n)),
                st.just("a..b"),
            )
        )
        return doc, "spec.storage.credentialsSecret", "spec.storage.credentialsSecret"
    if kind == "schedule-missing":
        iterations = spec["iterations"]
        entry = {"iteration": draw(st.integers(iterations + 1, s.MAX_ITERATIONS))}
        schedule = [e for e in spec.get("schedule", []) if e["iteration"] != entry["iteration"]]
        spec["schedule"] = [*schedule, entry]
        return doc, f"spec.schedule[{len(schedule)}].iteration", "spec.schedule"
    if kind == "schedule-twice":
        t = draw(st.integers(1, spec["iterations"]))
        spec["schedule"] = [{"iteration": t}, {"iteration": t, "epochs": 1}]
        return doc, "spec.schedule[1].iteration", "spec.schedule[1]"
    if kind == "type":
        path, value = draw(
            st.sampled_from(
                [
                    ("spec.iterations", "3"),
                    ("spec.iterations", True),
                    ("spec.iterations", 2.5),
                    ("spec.generation.temperature", "1.0"),
                    ("spec.suspend", "yes"),
                    ("spec.training.epochs", False),
                    ("spec.generation.shards", [1]),
                    ("spec.dataset", "file://d"),
                ]
            )
        )
        _set(doc, path, value)
        return doc, path, path
    if kind == "prompt-length":
        training = spec.setdefault("training", {})
        max_length = training.get("maxLength", 1024)
        training["maxPromptLength"] = draw(st.integers(max_length, max_length + 1000))
        return doc, "spec.training.maxPromptLength", "spec.training.maxPromptLength"
    if kind == "batch":
        micro, procs = draw(st.integers(2, 16)), draw(st.integers(1, 8))
        per_step = micro * procs
        total = per_step * draw(st.integers(0, 8)) + draw(st.integers(1, per_step - 1))
        spec["training"] = spec.get("training", {}) | {
            "microBatchSize": micro,
            "nodes": 1,
            "processesPerNode": procs,
            "globalBatchSize": total,
        }
        return doc, "spec.training.globalBatchSize", "spec.training.globalBatchSize"
    if kind == "env":
        where = draw(st.sampled_from(["pods", "generation", "training"]))
        spec.setdefault(where, {})["env"] = [
            {"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
        ]
        return doc, f"spec.{where}.env[0].value", f"spec.{where}.env[0]"
    if kind == "volume":
        where = draw(st.sampled_from(["pods", "generation", "training"]))
        spec.setdefault(where, {})["volumes"] = [
            {"name": "data", "mountPath": "/data", "secret": "s", "persistentVolumeClaim": "c"}
        ]
        return doc, f"spec.{where}.volumes[0].persistentVolumeClaim", f"spec.{where}.volumes[0]"
    if kind == "gpus":
        gpus = draw(st.integers(1, 7))
        procs = draw(st.integers(gpus + 1, 8))
        spec["training"] = spec.get("training", {}) | {
            "gpusPerNode": gpus,
            "processesPerNode": procs,
            "microBatchSize": 1,
            "nodes": 1,
            "globalBatchSize": procs,
        }
        return doc, "spec.training.processesPerNode", "spec.training.processesPerNode"
    if kind == "priority-without-queue":
        spec.pop("queueName", None)
        spec["workloadPriorityClass"] = "high"
        return doc, "spec.workloadPriorityClass", "spec.workloadPriorityClass"
    assert kind == "required"
    path = draw(st.sampled_from(REQUIRED))
    *parents, last = path.split(".")
    (_get(doc, ".".join(parents)) if parents else doc).pop(last)
    return doc, path, ".".join(parents) or "(object)"


REQUIRED = ["spec", "spec.model", "spec.dataset", "spec.storage", "spec.model.uri", "spec.storage.uri", "metadata.name"]


# -- properties ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spec")


@PROPERTY
@given(doc=documents())
def test_valid_documents_round_trip_through_yaml_and_are_accepted_by_the_crd(doc, scratch):
    run = parse(doc)
    assert api_server_errors(doc) == []
    document = run.to_document()
    path = scratch / "run.yaml"
    path.write_text(dump_yaml(document))  # allow_unicode=True would mangle U+0085
    (again,) = load_all(path)
    assert again == run
    assert again.to_document() == document
    # What the operator puts in the ConfigMap (defaults filled in) is itself a valid object for the CRD.
    assert api_server_errors(document) == []


@pytest.mark.parametrize("kind", MUTATIONS)
@MUTATION
@given(data=st.data())
def test_invalid_documents_are_refused_by_pydantic_and_the_crd(kind, data):
    doc, field, api_field = data.draw(mutations(kind))
    with pytest.raises(SpecError) as refused:
        parse(doc)
    problems = refused.value.problems
    assert any(p.startswith(f"{field}:") for p in problems), f"{kind}: no problem names {field}: {problems}"
    assert all(": " in p and "\n" not in p for p in problems)
    errors = api_server_errors(doc)
    assert errors, f"{kind}: the CRD accepts what pydantic refuses: {doc}"
    assert any(e.startswith(api_field) for e in errors), f"{kind}: no CRD error names {api_field}: {errors}"


# -- defaults, schedule, to_document ------------------------------------------------------------------------------

MINIMAL = {
    "apiVersion": s.API_VERSION,
    "kind": s.KIND,
    "metadata": {"name": "run"},
    "spec": {
        "model": {"uri": "s3://models/sft"},
        "dataset": {"uri": "s3://data/train.jsonl"},
        "storage": {"uri": "s3://runs"},
    },
}


def test_defaults_are_the_official_recipe():
    run = parse(MINIMAL)
    spec = run.spec
    assert (spec.iterations, spec.mix_previous_iterations, spec.suspend, spec.schedule) == (3, 1, False, [])
    assert (spec.dataset.format, spec.dataset.max_samples, spec.dataset.on_bad_row) == ("messages", 0, "fail")
    assert spec.storage.endpoint is None and spec.storage.credentials_secret is None
    g = spec.generation
    assert (g.backend, g.shards, g.temperature, g.top_p, g.max_new_tokens) == ("vllm", 1, 1.0, 1.0, 256)
    t = spec.training
    assert (t.loss, t.beta, t.learning_rate, t.epochs) == ("sigmoid", 0.1, 5e-7, 2)
    assert (t.global_batch_size, t.micro_batch_size, t.max_length, t.max_prompt_length) == (64, 8, 1024, 512)
    assert (t.optimizer, t.warmup_ratio, t.zero_stage, t.reference_logprobs) == ("rmsprop", 0.1, 3, "precompute")
    assert (t.nodes, t.processes_per_node) == (1, 8)
    assert spec.evaluation is None and run.status is None


def test_iteration_settings_apply_the_schedule():
    doc = copy.deepcopy(MINIMAL)
    doc["spec"]["training"] = {"beta": 0.1, "learningRate": 5e-7, "epochs": 2}
    doc["spec"]["schedule"] = [{"iteration": 2, "learningRate": 1e-7}, {"iteration": 3, "beta": 5.0, "epochs": 6}]
    run = parse(doc)
    assert run.iteration_settings(1) == (0.1, 5e-7, 2)
    assert run.iteration_settings(2) == (0.1, 1e-7, 2)
    assert run.iteration_settings(3) == (5.0, 5e-7, 6)


def test_zephyr_example_is_the_recipe_schedule():
    (run,) = load_all(ROOT / "manifests" / "examples" / "spinrun-zephyr-7b.yaml")
    # uclaml/SPIN scripts/finetune*.sh: lr 5e-7 for the first two trainings, 1e-7 from the third, beta 5 at the fourth.
    assert [run.iteration_settings(t) for t in (1, 2, 3, 4)] == [
        (0.1, 5e-7, 6),
        (0.1, 5e-7, 6),
        (0.1, 1e-7, 6),
        (5.0, 1e-7, 6),
    ]


def test_to_document_is_stable_and_reparses():
    run = parse(MINIMAL)
    document = run.to_document()
    assert document == run.to_document()
    assert parse(document) == run
    assert parse(document).to_document() == document
    assert "status" not in document and "region" not in document["spec"]["storage"]  # no nulls
    assert document["spec"]["training"]["learningRate"] == 5e-7
    # Order is the models' order, so ConfigMaps and run.json diff cleanly.
    assert list(document) == ["apiVersion", "kind", "metadata", "spec"]
    assert list(document["spec"])[:4] == ["model", "dataset", "storage", "iterations"]


def test_to_document_leaves_status_out_but_parse_keeps_it():
    doc = MINIMAL | {"status": {"phase": "Training", "iteration": 2, "somethingNew": {"x": 1}}}
    run = parse(doc)
    assert run.status is not None and run.status.phase == "Training"
    assert "status" not in run.to_document()


def test_kopf_style_mappings_are_accepted():
    """The operator hands over read-only mapping views and tuples, not plain dicts and lists."""
    from types import MappingProxyType

    def freeze(value: Any) -> Any:
        if isinstance(value, dict):
            return MappingProxyType({k: freeze(v) for k, v in value.items()})
        if isinstance(value, list):
            return tuple(freeze(v) for v in value)
        return value

    doc = copy.deepcopy(MINIMAL)
    doc["spec"]["schedule"] = [{"iteration": 1, "beta": 0.2}]
    assert parse(freeze(doc)) == parse(doc)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"training": {"maxPromptLength": 1024}},
            "spec.training.maxPromptLength: must be smaller than maxLength (1024)",
        ),
        ({"training": {"globalBatchSize": 60}}, "spec.training.globalBatchSize: must be a multiple of microBatchSize"),
        ({"schedule": [{"iteration": 4}]}, "spec.schedule[0].iteration: iteration 4 does not exist"),
        ({"schedule": [{"iteration": 1}, {"iteration": 1}]}, "spec.schedule[1].iteration: iteration 1 appears more"),
        ({"training": {"lerningRate": 1e-5}}, "spec.training.lerningRate: unknown field (did you mean learningRate?)"),
        ({"training": {"zzz": 1}}, "spec.training.zzz: unknown field; allowed fields: serviceAccountName,"),
        ({"training": {"loss": "dpo"}}, "spec.training.loss: must be 'sigmoid', 'hinge' or 'ipo' (got 'dpo')"),
        (
            {"model": {"uri": "gs://m"}},
            "spec.model.uri: must be s3://bucket/path (bucket: 3-63 lowercase letters, digits, '.' or '-') or file://path"
            " (got 'gs://m')",
        ),
        (
            {"storage": {"uri": "s3://runs", "credentialsSecret": "S3"}},
            "spec.storage.credentialsSecret: must be a DNS-1123 subdomain",
        ),
        (
            {"storage": {"uri": "s3://runs", "endpoint": "minio:9000"}},
            "spec.storage.endpoint: must be an http:// or https:// URL",
        ),
        ({"iterations": 0}, "spec.iterations: must be greater than or equal to 1 (got 0)"),
        ({"iterations": "3"}, "spec.iterations: must be a valid integer (got '3')"),
        ({"generation": {"temperature": float("nan")}}, "spec.generation.temperature: must be a finite number"),
        (
            {"generation": {"resources": {"limits": {"cpu": 0.5}}}},
            "spec.generation.resources.limits.cpu: must be a Kubernetes quantity",
        ),
        (
            {"generation": {"resources": {"limits": {"memory": "2GB"}}}},
            "spec.generation.resources.limits.memory: must be a Kubernetes quantity",
        ),
        ({"evaluation": {"heldoutFraction": 0.1}}, "spec.evaluation.scorer: metric score needs a scorer"),
        ({"evaluation": {"metric": "rewards/margins"}}, "spec.evaluation.heldoutFraction: set exactly one of"),
        (
            {"evaluation": {"heldoutFraction": 0.1, "scorer": "not a function"}},
            "spec.evaluation.scorer: must be module:function",
        ),
        ({"training": "fast"}, "spec.training: must be a mapping (key: value fields), got str"),
        ({"schedule": {"iteration": 1}}, "spec.schedule: must be a list, got dict"),
    ],
)
def test_messages_name_the_field_and_what_is_allowed(changes, expected):
    doc = copy.deepcopy(MINIMAL)
    doc["spec"] |= changes
    with pytest.raises(SpecError) as refused:
        parse(doc)
    assert any(p.startswith(expected) for p in refused.value.problems), refused.value.problems


def test_bad_metadata_messages():
    for name, expected in [
        ("Run_1", "metadata.name: must be a DNS-1035 label"),
        ("7b-spin", "metadata.name: must be a DNS-1035 label: lowercase letters, digits and '-', starting with a"),
        ("a" * 38, "metadata.name: must have at most 37 characters"),
    ]:
        with pytest.raises(SpecError) as refused:
            parse(MINIMAL | {"metadata": {"name": name}})
        assert refused.value.problems[0].startswith(expected), refused.value.problems
    with pytest.raises(SpecError) as refused:
        parse(MINIMAL | {"apiVersion": "selfplay.dev/v1"})
    assert refused.value.problems == ["apiVersion: must be 'selfplay.dev/v1alpha1' (got 'selfplay.dev/v1')"]
    with pytest.raises(SpecError) as refused:
        parse(MINIMAL | {"extra": 1})
    assert refused.value.problems == ["extra: unknown field; allowed fields: apiVersion, kind, metadata, spec, status"]


@pytest.mark.parametrize("text", ["0e0", "1e5", "-2E-3", ".5e1", "1.5", "true", "null", "0x1F"])
def test_strings_that_read_as_numbers_are_quoted_when_written(tmp_path, text):
    """Found by the round-trip property: PyYAML writes "0e0" bare, which a YAML 1.2 reader (kubectl, and our
    loader) reads as the number 0.0; a SpinRun named "0e0" would not have read back as itself."""
    doc = {"metadata": {"name": text}, "spec": {"value": text}}
    path = tmp_path / "doc.yaml"
    path.write_text(dump_yaml(doc))
    assert load_documents(path) == [doc]

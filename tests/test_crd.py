"""The generated SpinRun CRD: committed copies are current, the schema is structural, schema and CEL rules work."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from spin_core import spec as s
from spin_core.crd import crd, crd_yaml, spec_schema
from tests.spin_schema import (
    api_server_errors,
    apply_defaults,
    cel_errors,
    cel_program,
    openapi_schema,
    validator_schema,
)

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = [
    ROOT / "manifests" / "crd" / "spinruns.selfplay.dev.yaml",
    ROOT / "charts" / "spin-operator" / "crds" / "spinruns.selfplay.dev.yaml",
]
TINY = ROOT / "manifests" / "examples" / "spinrun-tiny.yaml"
ZEPHYR = ROOT / "manifests" / "examples" / "spinrun-zephyr-7b.yaml"

# What apiextensions.k8s.io/v1 JSONSchemaProps holds, less what a structural schema may not use.
ALLOWED_KEYS = {
    "type", "format", "description", "default", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "maxItems", "minItems", "multipleOf", "enum", "maxProperties",
    "minProperties", "required", "items", "properties", "additionalProperties", "example",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-validations",
}  # fmt: skip
# Forbidden in structural schemas, not OpenAPI 3.0, or pydantic leftovers that would surprise the API server.
FORBIDDEN_KEYS = {
    "$ref", "$defs", "definitions", "$schema", "id", "$id", "title", "const", "nullable", "anyOf", "allOf",
    "oneOf", "not", "uniqueItems", "patternProperties", "dependencies", "additionalItems", "readOnly", "writeOnly",
    "examples", "discriminator",
}  # fmt: skip
TYPES = {"object", "array", "string", "integer", "number", "boolean"}
RULE_KEYS = {"rule", "message", "messageExpression", "reason", "fieldPath", "optionalOldSelf"}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def nodes(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node below (and including) `node`, with a readable path."""
    out = [(path or "(root)", node)]
    for name, prop in node.get("properties", {}).items():
        out += nodes(prop, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        out += nodes(node["additionalProperties"], f"{path}.*")
    if isinstance(node.get("items"), dict):
        out += nodes(node["items"], f"{path}[]")
    return out


def matches_type(value: Any, node: dict[str, Any]) -> bool:
    if node.get("x-kubernetes-int-or-string"):
        return isinstance(value, int | str) and not isinstance(value, bool)
    kind = node["type"]
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
    }[kind]


def structural_problems(schema: dict[str, Any]) -> list[str]:
    """Violations of the rules Kubernetes applies to a CRD's openAPIV3Schema (structural schema, v1 API)."""
    problems = []
    for path, node in nodes(schema):
        for key in set(node) - ALLOWED_KEYS:
            problems.append(f"{path}: key {key!r} is not allowed in a structural schema")
        for key in set(node) & FORBIDDEN_KEYS:
            problems.append(f"{path}: forbidden key {key!r}")
        if node.get("x-kubernetes-int-or-string"):
            if "type" in node:
                problems.append(f"{path}: an int-or-string node must not have a type")
        elif node.get("type") not in TYPES:
            problems.append(f"{path}: no valid type ({node.get('type')!r})")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties and additionalProperties are mutually exclusive")
        if isinstance(node.get("additionalProperties"), bool):
            problems.append(f"{path}: additionalProperties must be a schema, not a boolean")
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if key in node and (node[key] is not True or key.replace("exclusiveM", "m") not in node):
                problems.append(f"{path}: {key} must be true beside {key.replace('exclusiveM', 'm')} (OpenAPI 3.0)")
        if node.get("type") in ("object", "array") and any(k in node for k in ("minimum", "maximum", "pattern")):
            problems.append(f"{path}: numeric/string bounds on a {node['type']}")
        if "enum" in node and not all(matches_type(v, node) for v in node["enum"]):
            problems.append(f"{path}: enum values {node['enum']} do not match type {node.get('type')}")
        for name in node.get("required", []):
            if name not in node.get("properties", {}):
                problems.append(f"{path}: required field {name!r} is not a property")
        described = path.startswith(".status") or path.endswith(("[]", ".*")) or path == ".metadata"
        if not described and not node.get("description"):
            problems.append(f"{path}: no description (kubectl explain shows nothing)")
        if node.get("x-kubernetes-list-type") == "map":
            item = node.get("items", {})
            for key in node.get("x-kubernetes-list-map-keys", []):
                prop = item.get("properties", {}).get(key)
                if prop is None or (key not in item.get("required", []) and "default" not in prop):
                    problems.append(f"{path}: list-map key {key!r} must be a required or defaulted item field")
        for rule in node.get("x-kubernetes-validations", []):
            if set(rule) - RULE_KEYS or "rule" not in rule:
                problems.append(f"{path}: bad x-kubernetes-validations entry {rule}")
            field = rule.get("fieldPath")
            if field and not _resolves(node, field):
                problems.append(f"{path}: fieldPath {field} names no field of this node")
        if "default" in node:
            problems += [f"{path}: default: {p}" for p in default_problems(node)]
    metadata = schema["properties"]["metadata"]
    if set(metadata.get("properties", {})) - {"name", "generateName"}:
        problems.append(".metadata: only name and generateName may be restricted")
    return problems


def _resolves(node: dict[str, Any], field_path: str) -> bool:
    for part in field_path.lstrip(".").split("."):
        node = node.get("properties", {}).get(part)
        if node is None:
            return False
    return True


def default_problems(node: dict[str, Any]) -> list[str]:
    """A default must validate against its own node once its nested defaults are applied, and hold no unknown
    field (the API server prunes defaults and refuses the CRD if that changes them)."""
    from openapi_schema_validator import OAS30Validator

    value = apply_defaults({"x": node["default"]}, {"type": "object", "properties": {"x": node}})["x"]
    errors = [e.message for e in OAS30Validator(validator_schema(node)).iter_errors(value)]
    errors += cel_errors(value, node)
    return errors


# -- the committed files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_crd_is_current(path):
    assert path.read_text() == crd_yaml(), (
        f"{path.relative_to(ROOT)} is stale: the models in spin_core/spec.py changed. Regenerate it with `make crd`."
    )


def test_crd_yaml_is_the_crd():
    text = crd_yaml()
    assert text.startswith("# Generated by `spin crd`")
    assert yaml.safe_load(text) == crd()


# -- the CRD object -----------------------------------------------------------------------------------------------


def test_crd_names_scope_and_version():
    obj = crd()
    assert obj["apiVersion"] == "apiextensions.k8s.io/v1"
    assert obj["metadata"]["name"] == f"{s.PLURAL}.{s.GROUP}"
    names = obj["spec"]["names"]
    assert names == {
        "kind": "SpinRun",
        "listKind": "SpinRunList",
        "plural": "spinruns",
        "singular": "spinrun",
        "shortNames": ["spin"],
        "categories": ["all"],
    }
    assert obj["spec"]["scope"] == "Namespaced"
    (version,) = obj["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert f"{obj['spec']['group']}/{version['name']}" == s.API_VERSION


def test_status_subresource_and_printer_columns():
    (version,) = crd()["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Iteration", "Latest checkpoint", "Age"]
    assert columns["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    schema = version["schema"]["openAPIV3Schema"]
    for name in ("Phase", "Iteration", "Latest checkpoint"):
        assert columns[name]["type"] == "string"
        assert _resolves(schema, columns[name]["jsonPath"]), f"column {name}: {columns[name]['jsonPath']} not in schema"


def test_schema_is_structural():
    problems = structural_problems(spec_schema())
    assert not problems, "\n".join(problems)


def test_structural_check_catches_what_kubernetes_refuses():
    """The checker itself: each of these schemas breaks one structural rule."""
    bad = [
        {"type": "object", "properties": {"a": {"description": "untyped"}}},
        {"type": "object", "properties": {"a": {"type": "string", "title": "A", "description": "x"}}},
        {"type": "object", "properties": {"a": {"$ref": "#/x", "description": "x"}}},
        {"type": "object", "properties": {"a": {"type": "string", "nullable": True, "description": "x"}}},
        {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}], "description": "x"}}},
        {"type": "object", "properties": {"a": {"type": "object", "additionalProperties": False, "description": "x"}}},
        {"type": "object", "properties": {"a": {"type": "integer", "default": "3", "description": "x"}}},
        {"type": "object", "properties": {"a": {"type": "integer", "minimum": 1, "default": 0, "description": "x"}}},
        {"type": "object", "properties": {"a": {"type": "number", "exclusiveMinimum": 0, "description": "x"}}},
        {"type": "object", "properties": {"a": {"type": "string"}}},
        {"type": "object", "properties": {"a": {"type": "string", "enum": [1], "description": "x"}}},
    ]
    for schema in bad:
        schema["properties"]["metadata"] = {"type": "object"}
        assert structural_problems(schema), schema


def test_every_spec_field_is_described_for_kubectl_explain():
    training = spec_schema()["properties"]["spec"]["properties"]["training"]
    assert "prefer the real answers" in training["description"]
    assert all(p.get("description") for p in training["properties"].values())
    assert all("\n" not in node.get("description", "") for _, node in nodes(spec_schema()))


def test_ranges_defaults_and_enums_are_in_the_schema():
    spec = spec_schema()["properties"]["spec"]["properties"]
    top_p = spec["generation"]["properties"]["topP"]
    assert top_p == top_p | {"type": "number", "minimum": 0.0, "exclusiveMinimum": True, "maximum": 1.0, "default": 1.0}
    beta = spec["training"]["properties"]["beta"]
    assert (beta["minimum"], beta["exclusiveMinimum"], beta["default"]) == (0.0, True, 0.1)
    assert spec["training"]["properties"]["zeroStage"]["enum"] == [0, 2, 3]
    assert spec["training"]["properties"]["zeroStage"]["type"] == "integer"
    assert spec["training"]["properties"]["optimizer"]["enum"] == ["rmsprop", "adamw"]
    assert spec["dataset"]["properties"]["onBadRow"]["enum"] == ["fail", "skip"]
    # Object defaults are spelled out (the API server validates a default, CEL rules included, without applying
    # the nested defaults first), and they are exactly what the models default to.
    assert s.Generation.model_validate(spec["generation"]["default"]) == s.Generation()
    assert s.Training.model_validate(spec["training"]["default"]) == s.Training()
    assert set(spec["training"]["default"]) >= {"maxLength", "maxPromptLength", "globalBatchSize", "microBatchSize"}
    assert spec["schedule"]["x-kubernetes-list-type"] == "map"
    assert spec["schedule"]["maxItems"] == s.MAX_ITERATIONS
    secret = spec["storage"]["properties"]["credentialsSecret"]
    assert secret["pattern"] == s.DNS1123_SUBDOMAIN and secret["maxLength"] == 253
    requests = spec["generation"]["properties"]["resources"]["properties"]["requests"]["additionalProperties"]
    assert requests == {"x-kubernetes-int-or-string": True, "pattern": s.QUANTITY}


def test_status_keeps_what_the_operator_writes():
    status = spec_schema()["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert {"phase", "iteration", "progress", "latestCheckpoint", "iterations", "conditions"} <= set(
        status["properties"]
    )
    assert status["properties"]["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    written = {
        "phase": "Training",
        "iteration": 2,
        "progress": "2/3",
        "latestCheckpoint": "s3://b/runs/x/iter-1/model",
        "iterations": [{"iteration": 1, "phase": "Succeeded", "metrics": {"loss": 0.3}, "somethingNew": 1}],
        "conditions": [{"type": "Ready", "status": "False", "reason": "Training", "lastTransitionTime": "t"}],
        "handlerOutput": {"anything": True},
    }
    doc = load(TINY) | {"status": written}
    assert api_server_errors(doc) == []


def test_cel_rules_compile():
    rules = [r["rule"] for _, node in nodes(spec_schema()) for r in node.get("x-kubernetes-validations", [])]
    assert len(rules) == 21  # 9 of the resource's, plus the 4 of env and volumes at each of pods, generation, training
    for rule in rules:
        cel_program(rule)


# -- good and bad objects -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [TINY, ZEPHYR], ids=lambda p: p.name)
def test_examples_are_accepted(path):
    assert api_server_errors(load(path)) == []


def test_minimal_object_is_accepted_and_defaults_agree_with_pydantic():
    from spin_core.resource import parse

    minimal = {
        "apiVersion": s.API_VERSION,
        "kind": s.KIND,
        "metadata": {"name": "m"},
        "spec": {"model": {"uri": "s3://models/m"}, "dataset": {"uri": "file://d"}, "storage": {"uri": "file://s"}},
    }
    assert api_server_errors(minimal) == []
    defaulted = apply_defaults(minimal)
    assert defaulted["spec"]["training"]["learningRate"] == 5e-7
    assert defaulted["spec"]["generation"]["resources"] == {}
    # What the API server stores means the same run as what pydantic reads from the bare object ...
    assert parse(defaulted) == parse(minimal)
    # ... and every value the API server fills in is the value pydantic fills in.
    document = parse(minimal).to_document()
    _assert_subset(defaulted, document)


def _assert_subset(small: Any, big: Any, path: str = "") -> None:
    if isinstance(small, dict):
        for key, value in small.items():
            if value in ({}, []) and key not in big:
                continue  # empty collections: to_document leaves no trace of them either way
            assert key in big, f"{path}.{key} missing from to_document()"
            _assert_subset(value, big[key], f"{path}.{key}")
    else:
        assert small == big, f"{path}: {small!r} != {big!r}"


def _tiny(**changes: Any) -> dict[str, Any]:
    """The tiny example with `changes` applied: keys are dotted paths, a value of ... deletes the field."""
    doc = copy.deepcopy(load(TINY))
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = doc
        for part in parents:
            node = node.setdefault(part, {})
        if value is ...:
            node.pop(last, None)
        else:
            node[last] = value
    return doc


BAD = {
    # CEL rules
    "maxPromptLength >= maxLength": (
        {"spec.training.maxPromptLength": 64},
        "spec.training.maxPromptLength: maxPromptLength must be smaller than maxLength",
    ),
    "globalBatchSize not a multiple": (
        {"spec.training.globalBatchSize": 48},
        "spec.training.globalBatchSize: globalBatchSize must be a multiple",
    ),
    "schedule iteration > iterations": (
        {"spec.schedule": [{"iteration": 3, "beta": 0.2}]},
        "spec.schedule: every schedule entry must name an iteration",
    ),
    "name too long": ({"metadata.name": "a" * 38}, "metadata.name: metadata.name must be at most 37 characters"),
    "name starting with a digit": ({"metadata.name": "7b-spin"}, "metadata.name: '7b-spin' does not match"),
    "evaluation with neither source": (
        {"spec.evaluation": {"scorer": "m:f"}},
        "spec.evaluation.heldoutFraction: set exactly one of",
    ),
    "evaluation with both sources": (
        {"spec.evaluation": {"heldoutFraction": 0.1, "dataset": {"uri": "file://h"}, "metric": "rewards/margins"}},
        "spec.evaluation.heldoutFraction: set exactly one of",
    ),
    "metric score without scorer": (
        {"spec.evaluation": {"heldoutFraction": 0.1}},
        "spec.evaluation.scorer: metric score needs a scorer",
    ),
    # list-map keys
    "schedule iteration twice": (
        {"spec.schedule": [{"iteration": 1}, {"iteration": 1}]},
        "spec.schedule[1]: Duplicate value",
    ),
    # the schema
    "bad name": ({"metadata.name": "Tiny_Run"}, "metadata.name: 'Tiny_Run' does not match"),
    "bad URI scheme": ({"spec.model.uri": "https://models/m"}, "spec.model.uri: 'https://models/m' does not match"),
    "unknown field": ({"spec.training.lerningRate": 1e-4}, "'lerningRate' was unexpected"),
    "wrong enum": ({"spec.training.loss": "dpo"}, "spec.training.loss: 'dpo' is not one of"),
    "zero stage 1": ({"spec.training.zeroStage": 1}, "spec.training.zeroStage: 1 is not one of"),
    "out of range": ({"spec.generation.topP": 0.0}, "spec.generation.topP: 0.0 is less than or equal to"),
    "above maximum": ({"spec.iterations": 101}, "spec.iterations: 101 is greater than the maximum"),
    "string for integer": ({"spec.iterations": "3"}, "spec.iterations: '3' is not of type 'integer'"),
    "missing required": ({"spec.storage": ...}, "'storage' is a required property"),
    "bad secret name": ({"spec.storage.credentialsSecret": "S3_creds"}, "spec.storage.credentialsSecret"),
    "bad quantity": ({"spec.training.resources": {"limits": {"memory": "lots"}}}, "spec.training.resources.limits"),
    "float quantity": ({"spec.training.resources": {"limits": {"cpu": 0.5}}}, "spec.training.resources.limits.cpu"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_objects_are_refused_by_the_api_server_checks(name):
    changes, expected = BAD[name]
    errors = api_server_errors(_tiny(**changes))
    assert any(expected in e for e in errors), f"expected {expected!r} in {errors}"


@pytest.mark.parametrize("name", list(BAD))
def test_bad_objects_are_refused_by_pydantic_too(name):
    from spin_core.resource import SpecError, parse

    changes, _ = BAD[name]
    with pytest.raises(SpecError):
        parse(_tiny(**changes))


GOOD = {
    "schedule within iterations": {"spec.schedule": [{"iteration": 1, "beta": 0.5}, {"iteration": 2, "epochs": 3}]},
    "name of 37 characters": {"metadata.name": "a" * 37},
    "secret with dots": {"spec.storage.credentialsSecret": "s3.credentials-1"},
    "quantities": {"spec.training.resources": {"requests": {"cpu": 4, "memory": "16Gi"}, "limits": {"cpu": "500m"}}},
    "heldout fraction": {"spec.evaluation": {"heldoutFraction": 0.1, "metric": "rewards/margins"}},
    "integer where a number is expected": {"spec.training.beta": 1, "spec.generation.temperature": 0},
    "null optional": {"spec.storage.endpoint": None},
    "s3 everything": {
        "spec.model.uri": "s3://models/m",
        "spec.dataset.uri": "s3://data/train.jsonl",
        "spec.storage.uri": "s3://runs",
        "spec.storage.endpoint": "http://minio.minio:9000",
    },
}


@pytest.mark.parametrize("name", list(GOOD))
def test_good_objects_are_accepted_by_both(name):
    from spin_core.resource import parse

    doc = _tiny(**GOOD[name])
    assert api_server_errors(doc) == []
    parse(doc)


def test_cel_sees_integers_in_number_fields_as_doubles():
    """`heldoutFraction: 0` (an integer in YAML) must not break `self.heldoutFraction > 0.0`."""
    doc = _tiny(**{"spec.evaluation": {"heldoutFraction": 0, "dataset": {"uri": "file://h"}, "scorer": "m:f"}})
    assert api_server_errors(doc) == []


def test_schema_copy_is_independent():
    schema = openapi_schema()
    schema["properties"].clear()
    assert openapi_schema()["properties"]


def test_spin_crd_prints_and_writes_the_crd(tmp_path):
    spin = Path(sys.executable).with_name("spin")
    done = subprocess.run([str(spin), "crd"], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout == crd_yaml()
    out = tmp_path / "crd.yaml"
    subprocess.run([str(spin), "crd", "-o", str(out)], capture_output=True, text=True, timeout=60, check=True)
    assert out.read_text() == crd_yaml()

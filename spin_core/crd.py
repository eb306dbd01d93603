"""Generate the SpinRun CustomResourceDefinition from the pydantic models in `spin_core.spec`.

Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3.0 schema. This module
inlines `$ref`s, turns `Optional[X]` into plain `X`, rewrites numeric exclusive bounds, drops titles,
spells out object defaults, and attaches the cross-field CEL rules (`x-kubernetes-validations`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from spin_core import spec as s
from spin_core.resource import dump_yaml

_DROP = {"title", "$defs"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        target = copy.deepcopy(defs[name])
        if name in s.DEF_RULES:
            target["x-kubernetes-validations"] = s.DEF_RULES[name]
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _structural({**target, **extra}, defs)
    node = dict(node)
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if node.get("x-kubernetes-int-or-string"):
            options = []  # int-or-string carries no type of its own
        if len(options) == 1:
            merged = {**options[0], **node}
            if merged.get("default", 0) is None:
                merged.pop("default")
            return _structural(merged, defs)
        if options:
            raise ValueError(f"cannot express anyOf {options} in a structural schema")
    if node.get("default", 0) is None:
        node.pop("default")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or (key == "additionalProperties" and isinstance(value, bool)):
            # additionalProperties: false is forbidden (the API server prunes unknown fields, or rejects them
            # under strict field validation); true cannot sit beside properties: extra="allow" models become
            # x-kubernetes-preserve-unknown-fields instead.
            if key == "additionalProperties" and value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out[key.replace("exclusiveM", "m")] = value
            out[key] = True
        elif key == "const":
            out["enum"] = [value]
        elif key == "properties":
            out[key] = {name: _structural(prop, defs) for name, prop in value.items()}
        elif key == "description":
            out[key] = " ".join(value.split())  # docstrings wrap lines; kubectl explain re-wraps them
        else:
            out[key] = _structural(value, defs)
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    if "enum" in out and "type" not in out:
        kinds = {type(v) for v in out["enum"]}
        out["type"] = "integer" if kinds == {int} else "string"
    return out


def _defaulted(node: dict[str, Any], value: Any) -> Any:
    """`value` with the defaults of `node`'s properties filled in, recursively, as the API server defaults it."""
    if not isinstance(value, dict):
        return value
    out = dict(value)
    for name, prop in node.get("properties", {}).items():
        if name not in out and "default" in prop:
            out[name] = copy.deepcopy(prop["default"])
        if name in out:
            out[name] = _defaulted(prop, out[name])
    return out


def _spell_out_defaults(node: Any) -> None:
    """Replace each object default (e.g. `{}`) by the object it defaults to.

    kube-apiserver validates every default when the CRD is created, CEL rules included, and does not apply the
    nested defaults first: a rule reading `self.maxLength` fails on a `default: {}` with "no such key".
    """
    if isinstance(node, list):
        for item in node:
            _spell_out_defaults(item)
    elif isinstance(node, dict):
        for value in node.values():
            _spell_out_defaults(value)
        if isinstance(node.get("default"), dict):
            node["default"] = _defaulted(node, node["default"])


def _with_rules(schema: dict[str, Any], path: list[str], rules: list[dict[str, str]]) -> None:
    node = schema
    for part in path:
        node = node["properties"][part]
    node["x-kubernetes-validations"] = rules


NAME_RULES = [
    {
        "rule": f"size(self.metadata.name) <= {s.MAX_NAME_LENGTH}",
        "message": (
            f"metadata.name must be at most {s.MAX_NAME_LENGTH} characters: the names of the run's Jobs, "
            "PyTorchJobs, Services and pods add suffixes and must stay within 63"
        ),
        "fieldPath": ".metadata.name",
    },
    {
        "rule": "self.metadata.name.matches('^[a-z]')",
        "message": "metadata.name must start with a letter: it names the run's PyTorchJobs (DNS-1035 labels)",
        "fieldPath": ".metadata.name",
    },
]


def spec_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the SpinRun CRD."""
    spec_json = s.SpinRunSpec.model_json_schema(by_alias=True, mode="validation")
    status_json = s.SpinRunStatus.model_json_schema(by_alias=True, mode="validation")
    spec = _structural(spec_json, spec_json.get("$defs", {}))
    status = _structural(status_json, status_json.get("$defs", {}))
    _with_rules(spec, ["training"], s.TRAINING_RULES)
    _with_rules(spec, ["evaluation"], s.EVALUATION_RULES)
    spec["x-kubernetes-validations"] = s.SPEC_RULES
    _spell_out_defaults(spec)
    return {
        "type": "object",
        "description": s.SpinRun.__doc__ + " Self-Play Fine-Tuning (Chen et al., 2024) of a language model.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": f"APIVersion of the object: {s.API_VERSION}.",
            },
            "kind": {"type": "string", "description": f"Kind of the object: {s.KIND}."},
            # Kubernetes allows a CRD to restrict only metadata.name and metadata.generateName.
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {
                        "type": "string",
                        "pattern": s.DNS1035_LABEL,
                        "description": (
                            "Name of the run: a DNS-1035 label (starting with a letter) of at most "
                            f"{s.MAX_NAME_LENGTH} characters: its PyTorchJobs, Services and pods add suffixes."
                        ),
                    }
                },
            },
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": NAME_RULES,
    }


def crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{s.PLURAL}.{s.GROUP}"},
        "spec": {
            "group": s.GROUP,
            "names": {
                "kind": s.KIND,
                "listKind": f"{s.KIND}List",
                "plural": s.PLURAL,
                "singular": s.KIND.lower(),
                "shortNames": [s.SHORT_NAME],
                "categories": ["all"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": s.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": spec_schema()},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {
                            "name": "Phase",
                            "type": "string",
                            "jsonPath": ".status.phase",
                            "description": "Where the run is.",
                        },
                        {
                            "name": "Iteration",
                            "type": "string",
                            "jsonPath": ".status.progress",
                            "description": "Iteration in progress / iterations.",
                        },
                        {
                            "name": "Latest checkpoint",
                            "type": "string",
                            "jsonPath": ".status.latestCheckpoint",
                            "description": "URI of the newest trained model.",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                }
            ],
        },
    }


def crd_yaml() -> str:
    """The CRD as the YAML committed under manifests/crd and charts/spin-operator/crds."""
    header = "# Generated by `spin crd` from spin_core/spec.py. Do not edit: change the models and regenerate.\n"
    return header + dump_yaml(crd(), width=120)


CHART_VALUES_SCHEMA = Path(__file__).resolve().parent.parent / "charts" / "spin-operator" / "values.schema.json"


def pod_settings_schema() -> dict[str, Any]:
    """The schema of spec.pods (PodSettings), which the chart's `podDefaults` value shares."""
    pods = copy.deepcopy(spec_schema()["properties"]["spec"]["properties"]["pods"])
    pods.pop("default", None)

    def closed(node: Any) -> None:  # JSON Schema (helm) accepts unknown keys unless told not to; the API prunes them
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                closed(value)
        elif isinstance(node, list):
            for value in node:
                closed(value)

    closed(pods)
    pods["description"] = "Operator-wide defaults of every run's pod settings (the SpinRun's spec.pods schema)."
    return pods


def write_chart_values_schema() -> None:
    """Refresh the chart's values.schema.json `podDefaults` from the spec models (`make crd`)."""
    schema = json.loads(CHART_VALUES_SCHEMA.read_text())
    schema["properties"]["podDefaults"] = pod_settings_schema()
    CHART_VALUES_SCHEMA.write_text(json.dumps(schema, indent=2) + "\n")

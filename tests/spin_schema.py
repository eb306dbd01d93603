"""Check an object the way the API server would with the generated SpinRun CRD, offline.

The API server, on create/update of a custom resource, (1) drops `null`s of non-nullable fields and applies
the schema's defaults, (2) validates against the structural `openAPIV3Schema` (unknown fields are errors under
the strict field validation kubectl asks for by default), (3) checks `x-kubernetes-list-type: map` keys are
unique, and (4) evaluates the `x-kubernetes-validations` CEL rules. `api_server_errors` does the same steps
with `openapi-schema-validator` (OpenAPI 3.0) and `cel-python`, so tests can check objects against the real
generated CRD without a cluster. Reusable by the operator tests.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import celpy
from celpy import celtypes
from openapi_schema_validator import OAS30Validator

from spin_core.crd import crd


@functools.cache
def _schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def openapi_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the generated CRD (a fresh copy)."""
    return copy.deepcopy(_schema())


# -- 1. pruning of nulls and defaulting --------------------------------------------------------------------------


def apply_defaults(obj: Any, schema: dict[str, Any] | None = None) -> Any:
    """A copy of `obj` with nulls of non-nullable fields dropped and defaults applied, top-down, like the API server."""
    schema = _schema() if schema is None else schema
    obj = copy.deepcopy(obj)
    _default(obj, schema)
    return obj


def _default(value: Any, node: dict[str, Any]) -> None:
    if isinstance(value, dict):
        props = node.get("properties", {})
        for key in [k for k, v in value.items() if v is None and k in props and not props[k].get("nullable")]:
            del value[key]
        for key, prop in props.items():
            if key not in value and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
        extra = node.get("additionalProperties")
        for key, item in value.items():
            if key in props:
                _default(item, props[key])
            elif isinstance(extra, dict):
                _default(item, extra)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for item in value:
            _default(item, node["items"])


# -- 2. the structural schema ------------------------------------------------------------------------------------


def validator_schema(node: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """The Kubernetes schema as plain OpenAPI 3.0 for a validator: int-or-string nodes become anyOf integer/string,
    and objects with properties reject unknown fields (strict field validation) unless they preserve them."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node:
        out["properties"] = {k: validator_schema(v, (*path, k)) for k, v in node["properties"].items()}
        # metadata: the CRD may only restrict name/generateName; the rest is ObjectMeta, checked elsewhere.
        if not node.get("x-kubernetes-preserve-unknown-fields") and path != ("metadata",):
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = validator_schema(node["additionalProperties"], (*path, "*"))
    if isinstance(node.get("items"), dict):
        out["items"] = validator_schema(node["items"], (*path, "[]"))
    return out


@functools.cache
def _validator() -> OAS30Validator:
    return OAS30Validator(validator_schema(_schema()))


def schema_errors(obj: Any) -> list[str]:
    """`path: message` for every openAPIV3Schema violation of an (already defaulted) object."""
    errors = sorted(_validator().iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_path(e.absolute_path)}: {e.message}" for e in errors]


def _path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "(object)"


# -- 3. list types -----------------------------------------------------------------------------------------------


def list_errors(value: Any, node: dict[str, Any], path: str = "") -> list[str]:
    """Duplicate keys in `x-kubernetes-list-type: map` lists and duplicates in `set` lists."""
    errors: list[str] = []
    if isinstance(value, list):
        kind = node.get("x-kubernetes-list-type")
        if kind == "map":
            keys = [tuple(item.get(k) for k in node["x-kubernetes-list-map-keys"]) for item in value]
            errors += [f"{path}[{i}]: Duplicate value: {k}" for i, k in enumerate(keys) if k in keys[:i]]
        elif kind == "set":
            errors += [f"{path}[{i}]: Duplicate value: {v!r}" for i, v in enumerate(value) if v in value[:i]]
        for i, item in enumerate(value):
            errors += list_errors(item, node.get("items", {}), f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            sub = node.get("properties", {}).get(key)
            if sub is None and isinstance(node.get("additionalProperties"), dict):
                sub = node["additionalProperties"]
            if sub is not None:
                errors += list_errors(item, sub, f"{path}.{key}" if path else key)
    return errors


# -- 4. CEL ------------------------------------------------------------------------------------------------------


# Created at import: celpy raises the recursion limit when an environment is made, which hypothesis warns about
# when it happens inside a test.
_ENV = celpy.Environment()


@functools.cache
def cel_program(rule: str) -> Any:
    """The compiled CEL rule (raises on a syntax error)."""
    return _ENV.program(_ENV.compile(rule))


def to_cel(value: Any, node: dict[str, Any]) -> Any:
    """A JSON value as CEL sees it under its schema node: numbers are doubles even when written as integers, and
    objects with declared properties show only those (the API server prunes the rest)."""
    if node.get("x-kubernetes-int-or-string") or "type" not in node:
        return celpy.json_to_cel(value)
    kind = node["type"]
    if kind == "object":
        props = node.get("properties")
        extra = node.get("additionalProperties")
        out = {}
        for key, item in value.items():
            if props is not None and key in props:
                out[celtypes.StringType(key)] = to_cel(item, props[key])
            elif isinstance(extra, dict):
                out[celtypes.StringType(key)] = to_cel(item, extra)
            elif props is None or node.get("x-kubernetes-preserve-unknown-fields"):
                out[celtypes.StringType(key)] = celpy.json_to_cel(item)
        return celtypes.MapType(out)
    if kind == "array":
        return celtypes.ListType([to_cel(item, node.get("items", {})) for item in value])
    if kind == "number":
        return celtypes.DoubleType(float(value))
    if kind == "integer":
        return celtypes.IntType(value)
    if kind == "boolean":
        return celtypes.BoolType(value)
    return celtypes.StringType(value)


def cel_errors(value: Any, node: dict[str, Any], path: str = "") -> list[str]:
    """`path: message` for every CEL rule that does not evaluate to true (an evaluation error fails the rule,
    as in the API server) anywhere in the object."""
    errors: list[str] = []
    for rule in node.get("x-kubernetes-validations", []):
        try:
            result = cel_program(rule["rule"]).evaluate({"self": to_cel(value, node)})
        except celpy.CELEvalError as e:
            result = e
        if not (isinstance(result, celtypes.BoolType) and bool(result)):
            where = (path or "") + rule.get("fieldPath", "")
            errors.append(f"{where.lstrip('.') or '(object)'}: {rule['message']}")
    if isinstance(value, dict):
        for key, item in value.items():
            sub = node.get("properties", {}).get(key)
            if sub is None and isinstance(node.get("additionalProperties"), dict):
                sub = node["additionalProperties"]
            if sub is not None:
                errors += cel_errors(item, sub, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            errors += cel_errors(item, node["items"], f"{path}[{i}]")
    return errors


# -- all steps ---------------------------------------------------------------------------------------------------


def api_server_errors(obj: Any) -> list[str]:
    """Why the API server would refuse `obj` (a SpinRun as a plain dict) with the generated CRD; [] if it would
    accept it. CEL runs only on objects that pass the schema, whose types it relies on."""
    schema = _schema()
    defaulted = apply_defaults(obj, schema)
    errors = schema_errors(defaulted)
    if errors:
        return errors
    return list_errors(defaulted, schema) + cel_errors(defaulted, schema)

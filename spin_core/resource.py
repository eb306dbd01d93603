"""Load SpinRun documents from YAML/JSON and turn every problem into one readable line."""

from __future__ import annotations

import difflib
import json
import re
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from spin_core.errors import SpinError
from spin_core.spec import API_VERSION, KIND, PATTERN_HINTS, FieldProblem, SpinRun


class SpecError(SpinError):
    """A SpinRun that cannot be used; `problems` holds one human-readable line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = [str(p).replace("\n", " ") for p in problems]  # one line per problem
        super().__init__("\n".join(f"{source}: {p}" for p in self.problems))


def _location(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before", "function-plain") or "[" in str(part):
            continue  # pydantic validator frames, not user-facing paths
        else:
            out += ("." if out else "") + str(part)
    return out


def _unwrap(annotation: Any) -> Any:
    """The model class inside Optional[...], list[...] and dict[str, ...] annotations, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _unwrap(arg)
        if found is not None:
            return found
    return None


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The field names (wire names) allowed in the object at `loc`, or [] when that is not a known model."""
    model: Any = SpinRun
    for part in loc:
        if isinstance(part, int):
            continue
        field = next((f for name, f in model.model_fields.items() if (f.alias or name) == part), None)
        model = _unwrap(field.annotation) if field else None
        if model is None:
            return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _unknown_field(loc: tuple[Any, ...]) -> str:
    allowed = _fields_at(loc[:-1])
    if not allowed:
        return "unknown field"
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    if close:
        return f"unknown field (did you mean {close[0]}?)"
    return "unknown field; allowed fields: " + ", ".join(allowed)


_SHOULD = re.compile(r"^(Input|String|Value|List|Dictionary|Object) should ")


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe(error: ValidationError) -> list[str]:
    """One line per pydantic error: `field.path: what is wrong, what is allowed (got ...)`."""
    lines = []
    for e in error.errors(include_url=False):
        loc = tuple(e["loc"])
        ctx = e.get("ctx") or {}
        if isinstance(ctx.get("error"), FieldProblem):
            loc += ctx["error"].loc  # a cross-field rule that knows which field is wrong
        where = _location(loc) or "(document)"
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        show_got = not isinstance(got, dict | list)
        if e["type"] == "extra_forbidden":
            msg, show_got = _unknown_field(loc), False
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "literal_error" and where in ("apiVersion", "kind"):
            msg = f"must be {API_VERSION!r}" if where == "apiVersion" else f"must be {KIND!r}"
        elif e["type"] == "string_pattern_mismatch" and ctx.get("pattern") in PATTERN_HINTS:
            msg = PATTERN_HINTS[ctx["pattern"]]
        elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            msg, show_got = f"must be a mapping (key: value fields), got {type(got).__name__}", False
        elif e["type"] == "list_type":
            msg, show_got = f"must be a list, got {type(got).__name__}", False
        msg = _SHOULD.sub("must ", msg)
        if show_got and e["type"] != "missing":
            msg += f" (got {_got(got)})"
        lines.append(f"{where}: {msg}")
    return lines


def plain(value: Any) -> Any:
    """Mappings and sequences of any kind (kopf's views, tuples) as the dicts and lists a JSON parser gives."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def parse(document: Any, source: str = "<spinrun>") -> SpinRun:
    """Validate one already-parsed document."""
    if not isinstance(document, Mapping):
        raise SpecError(source, [f"expected a mapping (a SpinRun object), got {type(document).__name__}"])
    try:
        return SpinRun.model_validate(plain(document))
    except ValidationError as e:
        raise SpecError(source, describe(e)) from None


class _Loader(yaml.SafeLoader):
    """Safe YAML that rejects duplicate keys (the API server's strict decoding does too; PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges may be overridden by explicit keys
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads `1e-4` as a string; YAML 1.2 and kubectl read it as a number. Read it as kubectl does.
_YAML12_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+.0123456789"))


class _Dumper(yaml.SafeDumper):
    """Safe YAML whose plain scalars read back as they were, here and in kubectl: with the same float rule as
    `_Loader`, a string such as "0e0" or "1e5" is written quoted (PyYAML alone writes it bare, and a YAML 1.2
    reader such as kubectl then sees a number)."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+.0123456789"))


def dump_yaml(document: Any, **options: Any) -> str:
    """YAML text of a document (key order kept) that `load_documents` and kubectl read back unchanged."""
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, **options)


def load_documents(path: str | Path) -> list[Any]:
    """All YAML documents in a file (a .json file is read as JSON); empty documents are dropped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(str(path), [f"cannot read file: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise SpecError(str(path), [f"cannot read file: not UTF-8 text (byte {e.start})"]) from None
    if path.suffix.lower() == ".json":
        try:
            return [json.loads(text)]
        except json.JSONDecodeError as e:
            raise SpecError(str(path), [f"line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}"]) from None
    try:
        return [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(str(path), [f"{where}invalid YAML: {problem}"]) from None
    except RecursionError:
        raise SpecError(str(path), ["invalid YAML: nested too deeply"]) from None


def load(path: str | Path) -> SpinRun:
    """The single SpinRun in a file."""
    documents = load_documents(path)
    if len(documents) != 1:
        raise SpecError(str(path), [f"expected exactly one SpinRun document, found {len(documents)}"])
    return parse(documents[0], str(path))


def load_all(path: str | Path) -> list[SpinRun]:
    """Every SpinRun in a (possibly multi-document) file; all problems of all documents are collected."""
    documents = load_documents(path)
    if not documents:
        raise SpecError(str(path), ["no document in file"])
    runs, problems = [], []
    for i, doc in enumerate(documents):
        label = f"document {i + 1}: " if len(documents) > 1 else ""
        try:
            runs.append(parse(doc, str(path)))
        except SpecError as e:
            problems += [label + p for p in e.problems]
    if problems:
        raise SpecError(str(path), problems)
    return runs

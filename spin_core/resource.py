"""Load SpinRun documents from YAML/JSON and turn every problem into one readable line."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from spin_core.errors import SpinError
from spin_core.spec import API_VERSION, KIND, SpinRun


class SpecError(SpinError):
    """A SpinRun that cannot be used; `problems` holds one human-readable line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def _location(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or "[" in str(part):
            continue  # pydantic validator frames, not user-facing paths
        else:
            out += ("." if out else "") + str(part)
    return out


def describe(error: ValidationError) -> list[str]:
    """One line per pydantic error: `field.path: what is wrong (got ...)`."""
    lines = []
    for e in error.errors(include_url=False):
        where = _location(e["loc"]) or "(document)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "literal_error" and where in ("apiVersion", "kind"):
            msg = f"must be {API_VERSION!r}" if where == "apiVersion" else f"must be {KIND!r}"
        got = e.get("input")
        if e["type"] not in ("missing", "model_type") and not isinstance(got, dict | list):
            msg += f" (got {got!r})"
        lines.append(f"{where}: {msg}")
    return lines


def parse(document: Any, source: str = "<spinrun>") -> SpinRun:
    """Validate one already-parsed document."""
    if not isinstance(document, dict):
        raise SpecError(source, [f"expected a mapping (a SpinRun object), got {type(document).__name__}"])
    try:
        return SpinRun.model_validate(document)
    except ValidationError as e:
        raise SpecError(source, describe(e)) from None


def load_documents(path: str | Path) -> list[Any]:
    """All YAML documents in a file (JSON is YAML too); empty documents are dropped."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(str(path), [f"cannot read file: {e.strerror}"]) from None
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(str(path), [f"{where}invalid YAML: {problem}"]) from None


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

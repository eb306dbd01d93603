"""The SFT dataset: prompts and their human ('real') answers, read from JSONL or Parquet.

Every problem is reported as `FILE:N: what is wrong`, N being the 1-based line (JSONL; blank lines count but are
ignored) or row (Parquet). With `onBadRow: fail` the first bad row stops the load; with `skip` bad rows are dropped
and listed in `LoadResult.skipped`.

Formats (`spec.dataset.format`):
- messages: a column of chat turns [{role, content}, ...] (UltraChat style). As in the official SPIN recipe, a row
  gives one example: the prompt is the conversation up to and including the first user turn (a leading system turn
  is kept), the real answer is the assistant turn right after it;
- prompt-response: two string columns; the prompt becomes [{"role": "user", "content": prompt}].
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spin_core.errors import SpinError
from spin_core.spec import Dataset

ROLES = ("system", "user", "assistant")
ID_FIELD = "prompt_id"
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
# (1-based line or row number, the row or what is wrong with it)
Rows = Generator[tuple[int, "dict[str, Any] | BadRow"], None, None]


@dataclass(frozen=True)
class Example:
    id: str
    """The row's `prompt_id` if it has one, else `row-N` (N: 1-based line or row number)."""
    prompt: list[dict[str, str]]
    """Chat turns up to and including the first user turn."""
    real: str
    """The human answer: the assistant turn right after the first user turn."""
    history: list[dict[str, str]]
    """The full conversation (role and content of every turn; prompt-response: the prompt and the answer)."""


@dataclass
class LoadResult:
    examples: list[Example]
    skipped: list[str] = field(default_factory=list)
    """One `FILE:N: problem` message per dropped row (onBadRow: skip)."""


class DatasetError(SpinError):
    """The dataset cannot be used; the message names the file and, for a bad row, its 1-based line or row."""


class BadRow(Exception):
    """Internal: what is wrong with one row (the caller adds the file and line)."""


class ShardError(SpinError, ValueError):
    """A shard index or count out of range."""


def load_examples(path: Path, dataset: Dataset, source: str | None = None) -> LoadResult:
    """Examples of the dataset file at `path`, read as `dataset` says; `source` names the file in messages."""
    path = Path(path)
    where = source or str(path)
    suffix = path.suffix.lower()
    if suffix not in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        raise DatasetError(
            f"{where}: unknown dataset file type {path.suffix or '(no extension)'!r}: "
            "use .jsonl (or .json with one object per line) or .parquet"
        )
    if path.is_dir():
        raise DatasetError(f"{where}: is a folder, not a {suffix[1:]} file: give the file's URI")
    if not path.is_file():
        raise DatasetError(f"{where}: no such file")
    if suffix in JSONL_SUFFIXES:
        rows, unit = _jsonl_rows(path, where), "line"
    else:
        rows, unit = _parquet_rows(path, where, dataset), "row"

    examples: list[Example] = []
    skipped: list[str] = []
    first_seen: dict[str, int] = {}
    total = 0
    try:
        for n, row in rows:
            total += 1
            try:
                if isinstance(row, BadRow):
                    raise row
                example = _example(row, n, dataset)
                if example.id in first_seen:
                    raise BadRow(f"duplicate id {example.id!r} (first seen on {unit} {first_seen[example.id]})")
            except BadRow as e:
                message = f"{where}:{n}: {e}"
                if dataset.on_bad_row == "fail":
                    raise DatasetError(f"{message} (dataset.onBadRow: skip drops bad rows)") from None
                skipped.append(message)
                continue
            first_seen[example.id] = n
            examples.append(example)
            if dataset.max_samples and len(examples) >= dataset.max_samples:
                break
    finally:
        rows.close()
    if not examples:
        if total == 0:
            raise DatasetError(f"{where}: the dataset is empty (no rows)")
        raise DatasetError(f"{where}: no usable examples: all {total} rows are bad (first: {skipped[0]})")
    return LoadResult(examples=examples, skipped=skipped)


def shard_examples(examples: list[Example], index: int, count: int) -> list[Example]:
    """Shard `index` of `count` (0-based): examples[index::count]. The shards partition the input, in order."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ShardError(f"shard count must be a positive integer, got {count!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ShardError(f"shard index must be in 0..{count - 1}, got {index!r}")
    return examples[index::count]


# -- reading ------------------------------------------------------------------------------------------------------


def _jsonl_rows(path: Path, where: str) -> Rows:
    """(line number, object or what is wrong) for every non-blank line."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; a generator so big files stream
    except FileNotFoundError:
        raise DatasetError(f"{where}: no such file") from None
    except OSError as e:
        raise DatasetError(f"{where}: cannot read: {e.strerror or e}") from None
    return _jsonl_lines(f)


def _jsonl_lines(f: Any) -> Rows:
    with f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, BadRow(f"not UTF-8 text ({e.reason} at byte {e.start})")
                continue
            if n == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                hint = " (a JSON array? write one object per line)" if line.strip() == "[" else ""
                yield n, BadRow(f"invalid JSON: {e.msg} at column {e.colno}{hint}")
                continue
            if not isinstance(row, dict):
                yield n, BadRow(f"expected a JSON object, got {_kind(row)}")
                continue
            yield n, row


def _parquet_rows(path: Path, where: str, dataset: Dataset) -> Rows:
    """(row number, row) for every row; only the columns the format needs are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except FileNotFoundError:
        raise DatasetError(f"{where}: no such file") from None
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(f"{where}: not a readable Parquet file: {e}") from None
    names = parquet.schema_arrow.names
    wanted = (
        [dataset.messages_field] if dataset.format == "messages" else [dataset.prompt_field, dataset.response_field]
    )
    missing = [c for c in wanted if c not in names]
    problem = None
    if missing:
        problem = f"missing column {missing[0]!r} (columns: {', '.join(names) or 'none'})"
    columns = [c for c in (ID_FIELD, *wanted) if c in names]
    return _parquet_batches(parquet, columns, where, problem)


def _parquet_batches(parquet: Any, columns: list[str], where: str, problem: str | None) -> Rows:
    import pyarrow as pa

    n = 0
    try:
        if problem:  # a needed column is missing: every row is bad (fail: row 1; skip: all dropped)
            for n in range(1, parquet.metadata.num_rows + 1):
                yield n, BadRow(problem)
            return
        for batch in parquet.iter_batches(batch_size=1024, columns=columns):
            for row in batch.to_pylist():
                n += 1
                yield n, row
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(f"{where}: cannot read Parquet data after row {n}: {e}") from None


# -- parsing ------------------------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _field(row: dict[str, Any], name: str) -> Any:
    if name not in row:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise BadRow(f"missing field {name!r} (fields: {present})")
    return row[name]


def _row_id(row: dict[str, Any], n: int) -> str:
    value = row.get(ID_FIELD)
    if value is None:
        return f"row-{n}"
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadRow(f"{ID_FIELD!r} must be a string, got {_kind(value)}")
    value = str(value)
    if not value.strip():
        raise BadRow(f"{ID_FIELD!r} is empty")
    return value


def _example(row: dict[str, Any], n: int, dataset: Dataset) -> Example:
    example_id = _row_id(row, n)
    if dataset.format == "messages":
        prompt, real, history = _from_messages(_field(row, dataset.messages_field), dataset.messages_field)
    else:
        question = _text(_field(row, dataset.prompt_field), dataset.prompt_field)
        real = _text(_field(row, dataset.response_field), dataset.response_field)
        prompt = [{"role": "user", "content": question}]
        history = [*prompt, {"role": "assistant", "content": real}]
    return Example(id=example_id, prompt=prompt, real=real, history=history)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadRow(f"{name!r} must be a string, got {_kind(value)}")
    if not value.strip():
        raise BadRow(f"{name!r} is empty")
    return value


def _from_messages(value: Any, name: str) -> tuple[list[dict[str, str]], str, list[dict[str, str]]]:
    if not isinstance(value, list):
        raise BadRow(f"{name!r} must be a list of {{role, content}} turns, got {_kind(value)}")
    turns: list[dict[str, str]] = []
    for i, turn in enumerate(value):
        at = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise BadRow(f"{at} must be an object with role and content, got {_kind(turn)}")
        role, content = turn.get("role"), turn.get("content")
        if not isinstance(role, str):
            raise BadRow(f"{at}.role must be a string, got {_kind(role)}")
        if role not in ROLES:
            raise BadRow(f"{at}.role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise BadRow(f"{at}.content must be a string, got {_kind(content)}")
        turns.append({"role": role, "content": content})
    first_user = next((i for i, t in enumerate(turns) if t["role"] == "user"), None)
    if first_user is None:
        raise BadRow(f"{name!r} has no user turn")
    if not turns[first_user]["content"].strip():
        raise BadRow(f"{name}[{first_user}] (the first user turn) is empty")
    if first_user + 1 >= len(turns):
        raise BadRow(f"{name!r} has no assistant turn after the first user turn")
    answer = turns[first_user + 1]
    if answer["role"] != "assistant":
        raise BadRow(
            f"{name}[{first_user + 1}] follows the first user turn but is a {answer['role']!r} turn, not 'assistant'"
        )
    if not answer["content"].strip():
        raise BadRow(f"{name}[{first_user + 1}] (the answer to the first user turn) is empty")
    return turns[: first_user + 1], answer["content"], turns

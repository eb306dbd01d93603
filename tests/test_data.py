"""Dataset loading: both formats, JSONL and Parquet, every kind of bad row, maxSamples, sharding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic.alias_generators import to_camel

from spin_core.data import DatasetError, Example, LoadResult, load_examples, shard_examples
from spin_core.errors import SpinError
from spin_core.spec import Dataset
from tests.fixtures.models import TINY_DATASET_ROWS, make_chat_rows, write_jsonl, write_parquet


def dataset(**fields: Any) -> Dataset:
    return Dataset.model_validate({"uri": "file:///data/train.jsonl", **{to_camel(k): v for k, v in fields.items()}})


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


GOOD = {"prompt_id": "good", "messages": [turn("user", "Hi?"), turn("assistant", "Hello.")]}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# -- good data ----------------------------------------------------------------------------------------------------


def test_messages_jsonl(tiny_dataset: Path) -> None:
    result = load_examples(tiny_dataset, dataset())
    rows = make_chat_rows(TINY_DATASET_ROWS)
    assert isinstance(result, LoadResult)
    assert result.skipped == []
    assert [e.id for e in result.examples] == [r["prompt_id"] for r in rows]
    first = result.examples[0]
    assert first.prompt == rows[0]["messages"][:1]
    assert first.real == rows[0]["messages"][1]["content"]
    assert first.history == rows[0]["messages"]


def test_messages_takes_first_user_turn_and_its_answer_keeping_system(tmp_path: Path) -> None:
    conversation = [
        turn("system", "Be brief."),
        turn("user", "What is 2+2?"),
        turn("assistant", "4"),
        turn("user", "And 3+3?"),
        turn("assistant", "6"),
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": conversation}])
    (example,) = load_examples(path, dataset()).examples
    assert example == Example(id="row-1", prompt=conversation[:2], real="4", history=conversation)


def test_ids_default_to_line_numbers_counting_blank_lines(tmp_path: Path) -> None:
    row = json.dumps({"messages": GOOD["messages"]})
    path = write_lines(tmp_path / "d.jsonl", [row, "", "   ", row, json.dumps({**GOOD, "prompt_id": 7})])
    result = load_examples(path, dataset())
    assert [e.id for e in result.examples] == ["row-1", "row-4", "7"]


def test_prompt_response_jsonl_with_custom_fields(tmp_path: Path) -> None:
    rows = [{"q": "Capital of France?", "a": "Paris"}, {"q": "2*3?", "a": "6", "prompt_id": "p2"}]
    path = write_jsonl(tmp_path / "d.json", rows)
    result = load_examples(path, dataset(format="prompt-response", prompt_field="q", response_field="a"))
    assert [(e.id, e.prompt, e.real) for e in result.examples] == [
        ("row-1", [turn("user", "Capital of France?")], "Paris"),
        ("p2", [turn("user", "2*3?")], "6"),
    ]
    assert result.examples[0].history == [turn("user", "Capital of France?"), turn("assistant", "Paris")]


def test_parquet_messages_matches_jsonl(tmp_path: Path) -> None:
    rows = make_chat_rows(10, seed=3, system="Answer briefly.")
    from_jsonl = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), dataset())
    from_parquet = load_examples(write_parquet(tmp_path / "d.parquet", rows), dataset())
    assert from_parquet.examples == from_jsonl.examples
    assert from_parquet.examples[0].prompt[0] == turn("system", "Answer briefly.")


def test_parquet_prompt_response_without_ids(tmp_path: Path) -> None:
    rows = [{"prompt": f"Say {i}", "response": str(i), "other": i} for i in range(5)]
    result = load_examples(write_parquet(tmp_path / "d.parquet", rows), dataset(format="prompt-response"))
    assert [(e.id, e.real) for e in result.examples] == [(f"row-{i + 1}", str(i)) for i in range(5)]


def test_source_names_the_file_in_messages(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD), "{oops"])
    with pytest.raises(DatasetError, match=r"^s3://bucket/train\.jsonl:2: invalid JSON"):
        load_examples(path, dataset(), source="s3://bucket/train.jsonl")


# -- bad rows -----------------------------------------------------------------------------------------------------

BAD_ROWS = {
    "invalid json": ('{"messages": [', "invalid JSON"),
    "json array file": ("[", "a JSON array?"),
    "not an object": ("[1, 2]", "expected a JSON object, got a list"),
    "missing column": (json.dumps({"turns": []}), "missing field 'messages' (fields: turns)"),
    "messages not a list": (json.dumps({"messages": "hi"}), "must be a list"),
    "turn not an object": (json.dumps({"messages": ["hi"]}), "messages[0] must be an object"),
    "content not a string": (json.dumps({"messages": [{"role": "user", "content": 3}]}), "messages[0].content"),
    "role missing": (json.dumps({"messages": [{"content": "x"}]}), "messages[0].role must be a string, got null"),
    "unknown role": (json.dumps({"messages": [turn("human", "x")]}), "role 'human' is not one of"),
    "no user turn": (json.dumps({"messages": [turn("system", "s"), turn("assistant", "a")]}), "no user turn"),
    "no answer": (json.dumps({"messages": [turn("user", "q")]}), "no assistant turn after the first user turn"),
    "user then user": (
        json.dumps({"messages": [turn("user", "q"), turn("user", "q2"), turn("assistant", "a")]}),
        "is a 'user' turn, not 'assistant'",
    ),
    "empty answer": (json.dumps({"messages": [turn("user", "q"), turn("assistant", "  ")]}), "is empty"),
    "empty prompt": (json.dumps({"messages": [turn("user", ""), turn("assistant", "a")]}), "first user turn) is empty"),
    "bad id type": (json.dumps({**GOOD, "prompt_id": [1]}), "'prompt_id' must be a string"),
    "duplicate id": (json.dumps(GOOD), "duplicate id 'good' (first seen on line 1)"),
}


@pytest.mark.parametrize("case", BAD_ROWS, ids=list(BAD_ROWS))
def test_bad_row_fails_with_file_and_line(tmp_path: Path, case: str) -> None:
    bad, problem = BAD_ROWS[case]
    # line 1 good, line 2 blank, line 3 bad: the number must count the blank line
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(GOOD), "", bad, json.dumps({**GOOD, "prompt_id": "z"})])
    with pytest.raises(DatasetError) as info:
        load_examples(path, dataset(on_bad_row="fail"))
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert problem in message


@pytest.mark.parametrize("case", BAD_ROWS, ids=list(BAD_ROWS))
def test_bad_row_is_skipped_and_recorded(tmp_path: Path, case: str) -> None:
    bad, problem = BAD_ROWS[case]
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(GOOD), "", bad, json.dumps({**GOOD, "prompt_id": "z"})])
    result = load_examples(path, dataset(on_bad_row="skip"))
    assert [e.id for e in result.examples] == ["good", "z"]
    assert len(result.skipped) == 1
    assert result.skipped[0].startswith(f"{path}:3: ")
    assert problem in result.skipped[0]


def test_non_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: not UTF-8"):
        load_examples(path, dataset())
    assert len(load_examples(path, dataset(on_bad_row="skip")).skipped) == 1


def test_bad_parquet_rows_name_the_row(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"prompt": "a?", "response": "A"},
        {"prompt": "b?", "response": None},
        {"prompt": "c?", "response": "C"},
        {"prompt": "", "response": "D"},
    ]
    path = write_parquet(tmp_path / "d.parquet", rows)
    with pytest.raises(DatasetError, match=r"d\.parquet:2: 'response' must be a string, got null"):
        load_examples(path, dataset(format="prompt-response"))
    result = load_examples(path, dataset(format="prompt-response", on_bad_row="skip"))
    assert [e.real for e in result.examples] == ["A", "C"]
    assert [m.split(": ", 1)[0] for m in result.skipped] == [f"{path}:2", f"{path}:4"]


def test_parquet_missing_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", [{"prompt_id": "x", "conversation": "c"}])
    with pytest.raises(
        DatasetError, match=r"d\.parquet:1: missing column 'messages' \(columns: prompt_id, conversation"
    ):
        load_examples(path, dataset())
    with pytest.raises(DatasetError, match=r"no usable examples: all 1 rows are bad"):
        load_examples(path, dataset(on_bad_row="skip"))


def test_every_row_bad_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ["1", "2", "3"])
    with pytest.raises(DatasetError, match=r"no usable examples: all 3 rows are bad \(first: .*d\.jsonl:1: "):
        load_examples(path, dataset(on_bad_row="skip"))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match="is empty"):
        load_examples(path, dataset())


def test_empty_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())}), path)
    with pytest.raises(DatasetError, match="is empty"):
        load_examples(path, dataset(format="prompt-response"))


def test_unknown_extension_missing_file_and_corrupt_parquet(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DatasetError, match=r"d\.csv: unknown dataset file type '\.csv'"):
        load_examples(csv, dataset())
    with pytest.raises(DatasetError, match=r"nope\.jsonl: no such file"):
        load_examples(tmp_path / "nope.jsonl", dataset())
    broken = tmp_path / "d.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=r"d\.parquet: not a readable Parquet file"):
        load_examples(broken, dataset())
    assert issubclass(DatasetError, SpinError)


# -- maxSamples ---------------------------------------------------------------------------------------------------


def test_max_samples_keeps_first_good_examples(tmp_path: Path) -> None:
    rows: list[Any] = make_chat_rows(10)
    rows.insert(1, {"messages": []})  # a bad row among the first ones (line 2)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    result = load_examples(path, dataset(max_samples=4, on_bad_row="skip"))
    assert [e.id for e in result.examples] == ["task-00000", "task-00001", "task-00002", "task-00003"]
    assert len(result.skipped) == 1
    assert len(load_examples(path, dataset(max_samples=100, on_bad_row="skip")).examples) == 10
    assert len(load_examples(path, dataset(max_samples=0, on_bad_row="skip")).examples) == 10


def test_max_samples_stops_reading(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in make_chat_rows(3)] + ["{broken"])
    assert len(load_examples(path, dataset(max_samples=3)).examples) == 3
    with pytest.raises(DatasetError, match=":4: invalid JSON"):
        load_examples(path, dataset(max_samples=4))


def test_max_samples_parquet(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", make_chat_rows(3000, seed=5))  # several record batches
    assert [e.id for e in load_examples(path, dataset(max_samples=1500)).examples][-1] == "task-01499"
    assert len(load_examples(path, dataset()).examples) == 3000


# -- sharding -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 24, 30])
def test_shards_partition_the_examples(tiny_dataset: Path, count: int) -> None:
    examples = load_examples(tiny_dataset, dataset()).examples
    shards = [shard_examples(examples, i, count) for i in range(count)]
    ids = [e.id for shard in shards for e in shard]
    assert sorted(ids) == sorted(e.id for e in examples)
    assert len(ids) == len(set(ids)) == len(examples)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert shards[0][0] is examples[0]
    if count > len(examples):
        assert shards[-1] == []


@pytest.mark.parametrize(("index", "count"), [(-1, 2), (2, 2), (0, 0), (0, -3), (1.0, 2), (True, 2)])
def test_bad_shard_index(index: Any, count: int) -> None:
    with pytest.raises((ValueError, SpinError), match="shard"):
        shard_examples([], index, count)

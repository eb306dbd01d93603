"""Bad input fails fast and clearly (issue 16, items 3, 4, 5, 9, 10 and the job side of the operator path), with the
real `spin` command, real tokenizers and real model folders; no engine may start before the input is checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from spin_core import layout
from spin_core.errors import SpinError
from spin_core.local import LocalRunner
from spin_core.resource import parse
from spin_core.store import Store
from tests.fixtures.models import make_chat_rows, write_jsonl, write_parquet

SPIN = [sys.executable, "-m", "spin_core"]
TIMES: dict[str, float] = {}


def spec_document(model_dir: Path, data: Path, storage_dir: Path, **spec) -> dict:
    document = {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SpinRun",
        "metadata": {"name": "faults"},
        "spec": {
            "model": {"uri": f"file://{model_dir}"},
            "dataset": {"uri": f"file://{data}", "format": "messages"},
            "storage": {"uri": f"file://{storage_dir}"},
            "iterations": 1,
            "generation": {"backend": "vllm", "shards": 1, "maxNewTokens": 8, "gpusPerShard": 0},
            "training": {
                "globalBatchSize": 8,
                "microBatchSize": 4,
                "processesPerNode": 2,
                "gpusPerNode": 0,
                "maxLength": 96,
                "maxPromptLength": 48,
            },
        },
    }
    for key, value in spec.items():
        document["spec"][key] = {**document["spec"].get(key, {}), **value} if isinstance(value, dict) else value
    return document


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# -- each bad-input class: how to make it, and the words of its one-line error ----------------------------------------
def bad_jsonl_line(tmp: Path, model: Path, data: Path) -> tuple[Path, Path, dict]:
    lines = data.read_text().splitlines()
    lines[-1] = lines[-1][:-5]  # the last line (24) cut short: the whole file must be read to find it
    (tmp / "train.jsonl").write_text("\n".join(lines) + "\n")
    return model, tmp / "train.jsonl", {}


def row_without_answer(tmp: Path, model: Path, data: Path) -> tuple[Path, Path, dict]:
    rows = make_chat_rows(24)
    rows[4]["messages"] = rows[4]["messages"][:1]
    return model, write_jsonl(tmp / "train.jsonl", rows), {}


def empty_file(tmp: Path, model: Path, data: Path) -> tuple[Path, Path, dict]:
    (tmp / "train.jsonl").write_text("")
    return model, tmp / "train.jsonl", {}


def prompt_response_rows() -> list[dict]:
    turns = [r["messages"] for r in make_chat_rows(24)]
    return [{"prompt": user["content"], "response": answer["content"]} for user, answer in turns]


def parquet_wrong_columns(tmp: Path, model: Path, data: Path) -> tuple[Path, Path, dict]:
    rows = [
        {"prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]} for r in make_chat_rows(24)
    ]
    return model, write_parquet(tmp / "train.parquet", rows), {}


def parquet_empty_answer(tmp: Path, model: Path, data: Path) -> tuple[Path, Path, dict]:
    rows = [
        {"prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]} for r in make_chat_rows(24)
    ]
    rows[20]["response"] = "  "
    path = write_parquet(tmp / "train.parquet", rows)
    return model, path, {"dataset": {"format": "prompt-response"}}


def wrong_format(tmp: Path, model: Path, data: Path) -> tuple[Path, Path, dict]:
    return model, data, {"dataset": {"format": "prompt-response"}}


def folder_named_jsonl(tmp: Path, model: Path, data: Path) -> tuple[Path, Path, dict]:
    (tmp / "x.jsonl").mkdir()
    return model, tmp / "x.jsonl", {}


def no_chat_template(tmp: Path, model: Path, data: Path) -> tuple[Path, Path, dict]:
    bare = copy_model(model, tmp / "model")
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    return bare, data, {}


def unsupported_head_dim(tmp: Path, model: Path, data: Path) -> tuple[Path, Path, dict]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=48,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    out = tmp / "model"
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out, data, {}


def truncated_weights(tmp: Path, model: Path, data: Path) -> tuple[Path, Path, dict]:
    broken = copy_model(model, tmp / "model")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return broken, data, {}


def config_without_tokenizer(tmp: Path, model: Path, data: Path) -> tuple[Path, Path, dict]:
    bare = tmp / "model"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copyfile(model / name, bare / name)
    return bare, data, {}


def foreign_tokenizer(tmp: Path, model: Path, data: Path) -> tuple[Path, Path, dict]:
    other = copy_model(model, tmp / "model")
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] = 100  # the tokenizer has more tokens than the model's embedding table
    (other / "config.json").write_text(json.dumps(config))
    return other, data, {}


def too_few_examples(tmp: Path, model: Path, data: Path) -> tuple[Path, Path, dict]:
    return model, data, {"training": {"globalBatchSize": 32}}


BAD_INPUTS: dict[str, tuple[Callable, str]] = {
    "jsonl line 24 malformed": (bad_jsonl_line, "train.jsonl:24: invalid JSON"),
    "row without an answer": (row_without_answer, "train.jsonl:5: 'messages' has no assistant turn"),
    "empty file": (empty_file, "the dataset is empty"),
    "parquet with other columns": (parquet_wrong_columns, "train.parquet:1: missing column 'messages'"),
    "parquet row 21 empty answer": (parquet_empty_answer, "train.parquet:21: 'response' is empty"),
    "wrong format": (wrong_format, "train.jsonl:1: missing field 'prompt'"),
    "folder named x.jsonl": (folder_named_jsonl, "x.jsonl: is a folder, not a jsonl file"),
    "tokenizer without chat template": (no_chat_template, "the tokenizer has no chat template"),
    "head dim vLLM cannot serve": (unsupported_head_dim, "attention head dim 48 is not one vLLM's CPU attention"),
    "truncated safetensors": (truncated_weights, "model.safetensors is truncated"),
    "config without tokenizer": (config_without_tokenizer, "the model folder has no tokenizer"),
    "tokenizer of another model": (foreign_tokenizer, "more than the model's vocab_size 100"),
    "fewer examples than a batch": (too_few_examples, "24 training examples, fewer than training.globalBatchSize 32"),
}


@pytest.fixture(scope="module", autouse=True)
def report_times():
    yield
    if TIMES:
        print("\ntime-to-fail of `spin run` per bad-input class (process start to exit, this machine):")
        for case, seconds in TIMES.items():
            print(f"  {seconds:5.2f} s  {case}")


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_before_any_engine_or_claim(case, tmp_path, tiny_model_dir, tiny_dataset):
    make, words = BAD_INPUTS[case]
    model, dataset, changes = make(tmp_path, tiny_model_dir, tiny_dataset)
    storage = tmp_path / "run"
    spec = tmp_path / "spinrun.yaml"
    spec.write_text(yaml.safe_dump(spec_document(model, dataset, storage, **changes)))
    started = time.perf_counter()
    result = subprocess.run([*SPIN, "run", str(spec), "--json"], capture_output=True, text=True, timeout=600)
    TIMES[case] = time.perf_counter() - started
    print(f"time-to-fail {case}: {TIMES[case]:.2f} s")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "run": "faults",
        "phase": "Failed",
        "exitCode": 2,
        "error": errors[0].removeprefix("error: "),
    }
    # No job (hence no engine) was started, and nothing claimed the storage.
    assert "spin_core generate" not in result.stderr and "torch.distributed.run" not in result.stderr
    assert not storage.exists()


def test_generation_job_fails_with_one_line_and_a_termination_message(tmp_path, tiny_model_dir, tiny_dataset):
    """The operator's side: the generation Job's container exits 2 with one line, which its termination message
    carries ({"error": "input", "message": ...}) for the operator to show in the SpinRun's conditions, and to tell
    bad input (not retried) from a failed step even under torchrun, whose own exit code is 1."""
    model, dataset, _ = truncated_weights(tmp_path, tiny_model_dir, tiny_dataset)
    spec = tmp_path / "spinrun.yaml"
    spec.write_text(yaml.safe_dump(spec_document(model, dataset, tmp_path / "run")))
    termination = tmp_path / "termination-log"
    env = {**os.environ, "SPIN_TERMINATION_LOG": str(termination)}
    result = subprocess.run(
        [*SPIN, "generate", "--spec", str(spec), "--iteration", "1"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    written = termination.read_text()
    assert "\n" not in written.strip()
    message = json.loads(written)
    assert message["error"] == "input" and "model.safetensors is truncated" in message["message"]
    assert message["message"] in result.stderr

    rows = make_chat_rows(24)
    rows[2] = {"prompt_id": "x", "messages": "not a list"}
    spec.write_text(yaml.safe_dump(spec_document(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path)))
    result = subprocess.run(
        [*SPIN, "generate", "--spec", str(spec), "--iteration", "1"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2
    message = json.loads(termination.read_text())
    assert message["error"] == "input" and "d.jsonl:3: 'messages' must be a list" in message["message"]


# -- model folders (item 5) ---------------------------------------------------------------------------------------
def test_safetensors_headers_are_checked_against_the_file(tmp_path, tiny_model_dir):
    from spin_core.inputs import ModelFolderError, check_safetensors

    weights = tmp_path / "model.safetensors"
    data = (tiny_model_dir / "model.safetensors").read_bytes()
    weights.write_bytes(data)
    check_safetensors(weights, "w")
    weights.write_bytes(data[:-1])
    with pytest.raises(ModelFolderError, match=r"w is truncated: \d+ bytes, its header describes \d+"):
        check_safetensors(weights, "w")
    weights.write_bytes(data + b"\0")
    with pytest.raises(ModelFolderError, match="longer than its header says"):
        check_safetensors(weights, "w")
    weights.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(ModelFolderError, match="header claims"):
        check_safetensors(weights, "w")
    weights.write_bytes(data[:5])
    with pytest.raises(ModelFolderError, match="too short"):
        check_safetensors(weights, "w")


def test_model_folder_checks(tmp_path, tiny_model_dir):
    from spin_core.inputs import ModelFolderError, check_model_folder

    assert check_model_folder(tiny_model_dir, "m")["model_type"] == "llama"
    sharded = copy_model(tiny_model_dir, tmp_path / "sharded")
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(ModelFolderError, match=r"names 2 missing weight file\(s\)"):
        check_model_folder(sharded, "m")
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelFolderError, match="has no weights"):
        check_model_folder(empty, "m")
    (empty / "config.json").write_text("{oops")
    with pytest.raises(ModelFolderError, match=r"config\.json is not valid JSON"):
        check_model_folder(empty, "m")


# -- storage reuse (items 4 and 9) ----------------------------------------------------------------------------------
def test_which_fields_may_differ_on_reuse(tmp_path):
    from spin_core.reuse import conflicts

    base = parse(spec_document(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "run")).to_document()

    def changed(**spec) -> list[str]:
        new = parse(spec_document(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "run", **spec))
        return conflicts(base, new.to_document(), {1})

    assert changed(iterations=3, training={"processesPerNode": 1, "checkpointEverySteps": 5}) == []
    assert changed(generation={"batchSize": 4, "image": "x"}, storage={"endpoint": "http://s3:9000"}) == []
    assert changed(schedule=[{"iteration": 2, "learningRate": 1e-7}], iterations=2) == []
    assert changed(training={"beta": 0.5}) == ["spec.training.beta: 0.1 -> 0.5"]
    assert changed(generation={"temperature": 0.7}) == ["spec.generation.temperature: 1.0 -> 0.7"]
    assert changed(schedule=[{"iteration": 1, "learningRate": 1e-7}])[0].startswith("spec.schedule (iteration 1")
    renamed = dict(base, metadata={"name": "other"})
    assert conflicts(base, renamed) == ["metadata.name: 'faults' -> 'other'"]


def test_a_claim_alone_is_replaced_by_corrected_inputs(tmp_path):
    """Item 4: a run that published nothing but run.json accepts corrected inputs; one that published refuses."""
    first = parse(spec_document(tmp_path / "m", tmp_path / "wrong.jsonl", tmp_path / "run"))
    LocalRunner(first).claim_storage()
    store = Store.open(f"file://{tmp_path}/run")
    store.backend.put_bytes("iter-1/generated/shard-0-of-1/a-20261207T000000-deadbeef/rows.jsonl", b"{}")  # orphan
    fixed = parse(spec_document(tmp_path / "m", tmp_path / "right.jsonl", tmp_path / "run"))
    LocalRunner(fixed).claim_storage()
    assert store.read_json(layout.RUN)["spec"]["dataset"]["uri"] == f"file://{tmp_path}/right.jsonl"

    (tmp_path / "rows.jsonl").write_text("{}\n")
    store.publish(layout.shard(1, 0, 1), {"rows.jsonl": tmp_path / "rows.jsonl"})
    renamed = parse(
        {**spec_document(tmp_path / "m", tmp_path / "x.jsonl", tmp_path / "run"), "metadata": {"name": "b"}}
    )
    with pytest.raises(SpinError) as info:
        LocalRunner(renamed).claim_storage()
    message = str(info.value)
    assert "belongs to run 'faults', which has published artefacts" in message
    assert "metadata.name: 'faults' -> 'b'" in message and "spec.dataset.uri" in message
    assert "new spec.storage.uri" in message and "\n" not in message
    assert info.value.exit_code == 2


def test_a_corrupt_claim_is_replaced_only_when_asked(tmp_path):
    from spin_core.store import IntegrityError

    run = parse(spec_document(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "run"))
    LocalRunner(run).claim_storage()
    store = Store.open(f"file://{tmp_path}/run")
    path = store.backend.local_path(layout.RUN)
    path.write_text(path.read_text().replace('"faults"', '"edited"'))
    with pytest.raises(IntegrityError, match=r"run\.json is corrupt") as info:
        LocalRunner(run, source="run.yaml").claim_storage()
    assert info.value.exit_code == 1
    assert (
        LocalRunner(run, source="run.yaml")
        .explain(info.value)
        .endswith("regenerate it with: spin run run.yaml --redo run.json")
    )
    LocalRunner(run).claim_storage(rewrite=True)
    assert store.read_json(layout.RUN)["metadata"]["name"] == "faults"


def test_tensor_parallel_size_must_fit_the_attention_heads():
    """generation.gpusPerShard is vLLM's tensor parallel size: refused before any engine when it does not divide the
    attention heads (or fit the key/value heads), with the sizes that would."""
    from spin_core.inputs import ModelFolderError, check_tensor_parallel

    llama = {"num_attention_heads": 32, "num_key_value_heads": 8}
    for gpus in (1, 2, 4, 8, 16, 32):
        check_tensor_parallel(llama, "s3://m", gpus)
    with pytest.raises(ModelFolderError) as refused:
        check_tensor_parallel(llama, "s3://models/m", 3)
    assert str(refused.value) == (
        "s3://models/m: generation.gpusPerShard 3 (vLLM's tensor parallel size) must divide the model's 32 attention "
        "heads and fit its 8 key/value heads; sizes that do: 1, 2, 4, 8, 16, 32"
    )
    with pytest.raises(ModelFolderError, match="fit its 4 key/value heads; sizes that do: 1, 2, 4, 8"):
        check_tensor_parallel({"num_attention_heads": 24, "num_key_value_heads": 4}, "m", 6)

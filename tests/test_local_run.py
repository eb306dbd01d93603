"""`spin run`: whole SpinRuns on this machine, with the real jobs (vLLM CPU, DeepSpeed on 2 gloo processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from spin_core import layout
from spin_core.rows import read_rows
from spin_core.store import Store
from tests.fixtures.models import CPU_TRAINING

SPIN = [sys.executable, "-m", "spin_core"]


def write_spec(
    folder: Path, model: str, dataset: str, storage: dict, training: dict | None = None, **generation
) -> Path:
    spec = {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SpinRun",
        "metadata": {"name": "e2e"},
        "spec": {
            "model": {"uri": model},
            "dataset": {"uri": dataset, "format": "messages"},
            "storage": storage,
            "iterations": 2,
            "generation": {"backend": "vllm", "shards": 2, "maxNewTokens": 12, "gpusPerShard": 0, **generation},
            "training": {**CPU_TRAINING, **(training or {})},
        },
    }
    path = folder / "spinrun.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def dataset_ids(path: Path) -> list[str]:
    return [json.loads(line)["prompt_id"] for line in path.read_text().splitlines() if line.strip()]


def published_view(store: Store, shards: int) -> dict[str, list[str]]:
    """Every published artefact (train-state scratch excluded) -> sorted row ids for shards, file names otherwise."""
    view = {}
    for key in store.published(""):
        if "/train-state/" in key:
            continue
        folder = store.fetch(key)
        if "/generated/" in key:
            view[key] = sorted(r.id for r in read_rows(folder / layout.SHARD_ROWS))
        else:
            view[key] = sorted(store.manifest(key).files)
    return view


def check_complete_run(store: Store, dataset: Path, iterations: int, shards: int) -> None:
    """Every iteration's shards cover the dataset exactly, every model and metrics document is published."""
    expected = sorted(dataset_ids(dataset))
    for t in range(1, iterations + 1):
        ids: list[str] = []
        for i in range(shards):
            manifest = store.manifest(layout.shard(t, i, shards))
            assert layout.SHARD_ROWS in manifest.files
            ids += [r.id for r in read_rows(store.fetch(layout.shard(t, i, shards)) / layout.SHARD_ROWS)]
        assert sorted(ids) == expected, f"iteration {t}: shards do not cover the dataset exactly once"
        files = store.manifest(layout.checkpoint(t)).files
        assert "model.safetensors" in files and "tokenizer_config.json" in files
        final = store.read_json(layout.metrics(t))["final"]
        assert final["pairs/total"] > 0 and "loss" in final


def run_spin(spec: Path, env: dict | None = None, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SPIN, "run", str(spec), "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def last_json_line(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_iterations_on_a_file_store_with_vllm_and_deepspeed(tmp_path, tiny_model_dir, tiny_dataset):
    run_dir = tmp_path / "run"
    spec = write_spec(tmp_path, f"file://{tiny_model_dir}", f"file://{tiny_dataset}", {"uri": f"file://{run_dir}"})
    summary = last_json_line(run_spin(spec))
    assert summary == {
        "run": "e2e",
        "phase": "Succeeded",
        "iterations": 2,
        "model": f"file://{run_dir}/iter-2/checkpoint",
    }
    store = Store.open(f"file://{run_dir}")
    check_complete_run(store, tiny_dataset, iterations=2, shards=2)
    assert store.read_json(layout.RUN)["spec"]["generation"]["shards"] == 2

    # The final model loads in transformers and in vLLM (a fresh engine in its own process).
    final = store.fetch(layout.checkpoint(2))
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(final).config.vocab_size > 0
    probe = (
        "import sys\nfrom vllm import LLM, SamplingParams\nif __name__ == '__main__':\n"
        "    llm = LLM(model=sys.argv[1], dtype='float32', max_model_len=256)\n"
        "    out = llm.generate(['<|user|>\\nhi'], SamplingParams(max_tokens=4, temperature=0))\n"
        "    print('VLLM-OK', len(out[0].outputs[0].token_ids))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", probe, str(final)], capture_output=True, text=True, timeout=600)
    assert "VLLM-OK" in loaded.stdout, loaded.stderr[-3000:]

    # Running again finds everything published: nothing to do, same answer, exit 0.
    again = run_spin(spec, timeout=120)
    assert last_json_line(again) == summary
    assert "nothing to do" in again.stderr


@pytest.mark.slow
def test_two_iterations_on_the_real_s3_server(tmp_path, tiny_model_dir, tiny_dataset, s3_env):
    endpoint, bucket = s3_env
    inputs = Store.open(f"s3://{bucket}/inputs", endpoint)
    for path in sorted(tiny_model_dir.iterdir()):
        inputs.backend.put_file(f"model/{path.name}", path)
    inputs.backend.put_file("data/train.jsonl", tiny_dataset)
    storage = {"uri": f"s3://{bucket}/runs/e2e", "endpoint": endpoint}
    spec = write_spec(
        tmp_path, f"s3://{bucket}/inputs/model", f"s3://{bucket}/inputs/data/train.jsonl", storage, shards=1
    )
    summary = last_json_line(run_spin(spec, env={"AWS_ENDPOINT_URL": endpoint}))
    assert summary["model"] == f"s3://{bucket}/runs/e2e/iter-2/checkpoint"
    check_complete_run(Store.open(storage["uri"], endpoint), tiny_dataset, iterations=2, shards=1)


def _wait_for(condition, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"spin run ended (exit {proc.returncode}) before the kill point")
        if time.monotonic() > deadline:
            raise AssertionError("kill point not reached in time")
        time.sleep(0.2)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `spin run` alone: its children must go too (PR_SET_PDEATHSIG), leaving no orphan jobs."""
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    _, alive = psutil.wait_procs(children, timeout=60)
    for p in alive:
        p.kill()
    assert not alive, f"children survived spin run: {[p.pid for p in alive]}"


@pytest.mark.slow
def test_killed_mid_generation_and_mid_training_then_rerun_matches_uninterrupted(
    tmp_path, tiny_model_dir, tiny_dataset
):
    """hf backend here (the vLLM path is covered above); SIGKILL spin run at two points, rerun, compare stores."""
    # Several epochs with a train state every step: a wide window to kill training in.
    common = dict(backend="hf", shards=2, seed=7, training={"epochs": 4})
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir()
    killed_dir.mkdir()
    reference = write_spec(
        reference_dir,
        f"file://{tiny_model_dir}",
        f"file://{tiny_dataset}",
        {"uri": f"file://{reference_dir}/run"},
        **common,
    )
    last_json_line(run_spin(reference))
    expected = published_view(Store.open(f"file://{reference_dir}/run"), 2)

    spec = write_spec(
        killed_dir, f"file://{tiny_model_dir}", f"file://{tiny_dataset}", {"uri": f"file://{killed_dir}/run"}, **common
    )
    store = Store.open(f"file://{killed_dir}/run")

    # 1. Kill while generating: shard 0 of iteration 1 is published, shard 1 is not.
    proc = subprocess.Popen([*SPIN, "run", str(spec)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: store.is_published(layout.shard(1, 0, 2)), proc, 600)
    _kill_tree(proc)
    assert not store.is_published(layout.checkpoint(1))

    # 2. Kill while training: a resumable train state exists, the model does not.
    proc = subprocess.Popen([*SPIN, "run", str(spec)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: bool(store.published(layout.train_state_prefix(1))), proc, 900)
    _kill_tree(proc)
    assert not store.is_published(layout.checkpoint(1))

    # 3. Run to the end.
    last_json_line(run_spin(spec))
    assert published_view(store, 2) == expected

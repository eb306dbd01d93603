"""`spin train` for real: DeepSpeed on CPU (gloo), 1 and 2 processes, ZeRO 2 and 3, kill and resume."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spin_core import layout
from spin_core.rows import GeneratedRow, write_rows
from spin_core.store import Store
from tests.fixtures.models import make_chat_rows

ROWS = 32


def make_run(root: Path, model_dir: Path, *, zero: int = 2, procs: int = 2, **training) -> Path:
    """A file:// run with one published generation shard of iteration 1 (answers sampled from a fixed RNG)."""
    root.mkdir(parents=True, exist_ok=True)
    spec = {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SpinRun",
        "metadata": {"name": "train"},
        "spec": {
            "model": {"uri": f"file://{model_dir}"},
            "dataset": {"uri": f"file://{root}/unused.jsonl"},
            "storage": {"uri": f"file://{root}/run"},
            "iterations": 2,
            "generation": {"shards": 1, "backend": "hf"},
            "training": {
                "learningRate": 1e-3,
                "optimizer": "adamw",
                "epochs": 2,
                "globalBatchSize": 8,
                "microBatchSize": 4,
                "maxLength": 96,
                "maxPromptLength": 48,
                "zeroStage": zero,
                "processesPerNode": procs,
                "gpusPerNode": 0,
                "checkpointEverySteps": 2,
                **training,
            },
        },
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    rng = random.Random(0)
    rows = [
        GeneratedRow(
            id=f"row-{i}",
            prompt=r["messages"][:1],
            real=r["messages"][1]["content"],
            generated="".join(rng.choice("abc xyz") for _ in range(rng.randint(3, 12))),
            finish_reason="stop",
            prompt_tokens=0,
            generated_tokens=0,
            iteration=1,
            shard=0,
        )
        for i, r in enumerate(make_chat_rows(ROWS, seed=0))
    ]
    write_rows(root / "rows.jsonl", rows)
    Store.open(f"file://{root}/run").publish(layout.shard(1, 0, 1), {"rows.jsonl": root / "rows.jsonl"})
    return root / "spec.yaml"


def train(spec: Path, procs: int, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    job = ["-m", "spin_core", "train", "--spec", str(spec), "--iteration", "1"]
    if procs == 1:
        argv = [sys.executable, *job]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *job]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "SPIN_TERMINATION_LOG": str(spec.parent / "termination")}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**environ, **(env or {})})


def losses(spec: Path) -> list[float]:
    metrics = Store.open(f"file://{spec.parent}/run").read_json(layout.metrics(1))
    return [s["loss"] for s in metrics["steps"]]


@pytest.fixture(scope="module")
def two_process_zero2(tmp_path_factory, tiny_model_dir):
    spec = make_run(tmp_path_factory.mktemp("zero2"), tiny_model_dir, zero=2)
    result = train(spec, 2)
    assert result.returncode == 0, result.stderr[-5000:]
    return spec, result


@pytest.mark.slow
def test_training_publishes_a_model_and_learns_the_preference(two_process_zero2):
    spec, result = two_process_zero2
    store = Store.open(f"file://{spec.parent}/run")
    metrics = store.read_json(layout.metrics(1))
    steps = metrics["steps"]
    assert len(steps) == 2 * (ROWS // 8)  # 2 epochs of 4 steps of 8 pairs
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert metrics["epochs"][-1]["rewards/accuracies"] > metrics["epochs"][0]["rewards/accuracies"] - 1e-9
    assert metrics["final"]["rewards/accuracies"] > 0.5
    assert metrics["final"]["pairs/total"] == ROWS
    # Collapse diagnostics are published with the paper's defaults too (issue 9), and the method is named.
    assert metrics["variant"] == "SPIN (paper)" and isinstance(metrics["warnings"], list)
    for key in ("logps/real", "logps/generated", "logps/real_change", "pairs/identical_share", "loss/spin"):
        assert key in steps[0] and key in metrics["final"], key
    assert {"logps/real_change_end", "pairs/identical", "pairs/dropped", "pairs/trained"} <= set(metrics["final"])
    assert metrics["final"]["pairs/dropped"] == 0 and metrics["final"]["pairs/trained"] == ROWS
    files = store.manifest(layout.checkpoint(1)).files
    assert {"model.safetensors", "config.json", "tokenizer_config.json"} <= set(files)
    # Train states are scratch: gone once the model is published.
    assert store.published(layout.train_state_prefix(1)) == []
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["checkpoint"] == store.uri_of(layout.checkpoint(1))
    assert json.loads((spec.parent / "termination").read_text()) == summary
    assert (summary["variant"], summary["warnings"]) == ("SPIN (paper)", metrics["warnings"])
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(store.fetch(layout.checkpoint(1))).num_parameters() > 0
    # Idempotent: a rerun finds the model and does nothing.
    again = train(spec, 1, timeout=120)
    assert again.returncode == 0 and "already published" in again.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("zero", "procs"), [(2, 1), (3, 2)])
def test_same_loss_trajectory_for_one_and_two_processes_and_zero_stages(
    tmp_path, tiny_model_dir, two_process_zero2, zero, procs
):
    """Same global batch, same pairs: 1 process (gradient accumulation 2) and ZeRO-3 on 2 processes follow the
    2-process ZeRO-2 run step by step (fp32; tolerance 2e-4 absolute for reduction-order differences)."""
    reference = losses(two_process_zero2[0])
    spec = make_run(tmp_path, tiny_model_dir, zero=zero, procs=procs)
    result = train(spec, procs)
    assert result.returncode == 0, result.stderr[-5000:]
    assert losses(spec) == pytest.approx(reference, abs=2e-4)


@pytest.mark.slow
def test_killed_trainer_resumes_where_it_stopped_and_publishes_only_at_the_end(
    tmp_path, tiny_model_dir, two_process_zero2
):
    spec = make_run(tmp_path, tiny_model_dir, zero=2)
    store = Store.open(f"file://{tmp_path}/run")
    died = train(spec, 2, env={"SPIN_TEST_EXIT_AFTER_STATE": "6"})  # mid second epoch
    assert died.returncode != 0
    assert not store.is_published(layout.checkpoint(1))
    assert not store.exists(layout.metrics(1))
    # Each rank's part holds only its own ZeRO partition; what every rank reads (the model states) is `shared`, so a
    # resuming rank downloads its part and the shared one, never the other ranks' optimizer states.
    state = layout.train_state(1, 6)
    parts = {key.rsplit("/", 1)[1]: set(store.manifest(key).files) for key in store.published(state + "/")}
    assert set(parts) == {"rank-0", "rank-1", "shared"}
    for r in (0, 1):
        assert all(f"zero_pp_rank_{r}_" in name or name == f"rank-{r}.json" for name in parts[f"rank-{r}"])
        assert any("optim_states" in name for name in parts[f"rank-{r}"])
    assert parts["shared"] == {"mp_rank_00_model_states.pt"}
    resumed = train(spec, 2)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "resumed iteration 1 from the train state at step 6" in resumed.stderr
    # Same global step count and the same trajectory as the uninterrupted run.
    assert losses(spec) == pytest.approx(losses(two_process_zero2[0]), abs=2e-4)


@pytest.mark.slow
def test_precompute_and_online_reference_give_the_same_first_step(tmp_path, tiny_model_dir, two_process_zero2):
    spec = make_run(tmp_path, tiny_model_dir, zero=2, referenceLogprobs="online", epochs=1)
    result = train(spec, 2)
    assert result.returncode == 0, result.stderr[-5000:]
    assert losses(spec)[0] == pytest.approx(losses(two_process_zero2[0])[0], abs=1e-5)


def test_clear_errors_and_nothing_published(tmp_path, tiny_model_dir):
    spec = make_run(tmp_path, tiny_model_dir, procs=1)
    store = Store.open(f"file://{tmp_path}/run")
    # Iteration 2 mixes iteration 1 and 2: iteration 2's shards were never generated.
    result = subprocess.run(cmd_for(spec, 2), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the model of iteration 1" in result.stderr and "is not published" in result.stderr
    # A tokenizer with no chat template.
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    (broken / "chat_template.jinja").unlink(missing_ok=True)
    spec2 = make_run(tmp_path / "b", broken, procs=1)
    result = subprocess.run(cmd_for(spec2, 1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "no chat template" in result.stderr, result.stderr[-2000:]
    assert store.published("iter-1/checkpoint") == []
    # No generation shards for the iteration.
    spec3 = make_run(tmp_path / "c", tiny_model_dir, procs=1)
    Store.open(f"file://{tmp_path}/c/run").delete_artefact(layout.shard(1, 0, 1))
    result = subprocess.run(cmd_for(spec3, 1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "1 of its 1 generation shards are not published" in result.stderr


def cmd_for(spec: Path, iteration: int) -> list[str]:
    return [sys.executable, "-m", "spin_core", "train", "--spec", str(spec), "--iteration", str(iteration)]

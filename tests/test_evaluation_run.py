"""Evaluation inside `spin run`: the demo task, eval.json per iteration, early stop, best checkpoint, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spin_core import demo, layout
from spin_core.store import Store

SPIN = [sys.executable, "-m", "spin_core"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    summary = demo.prepare(out, train_size=64, heldout_size=24, sft_steps=20)
    assert 0.0 <= summary["heldout_accuracy"] <= 1.0
    return out


def spec_file(folder: Path, demo_dir: Path, evaluation: dict, iterations: int = 3) -> Path:
    spec = yaml.safe_load(Path("manifests/examples/spinrun-tiny.yaml").read_text())
    s = spec["spec"]
    s["model"]["uri"] = f"file://{demo_dir}/sft-model"
    s["dataset"]["uri"] = f"file://{demo_dir}/train.jsonl"
    s["storage"]["uri"] = f"file://{folder}/run"
    s["iterations"] = iterations
    s["generation"].update(backend="hf", shards=1)
    s["training"].update(globalBatchSize=16, microBatchSize=8)
    s["evaluation"] = {"dataset": {"uri": f"file://{demo_dir}/heldout.jsonl"}, "backend": "hf", **evaluation}
    if "heldoutFraction" in evaluation:
        del s["evaluation"]["dataset"]
    path = folder / "spinrun.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_demo_data_is_checkable_and_disjoint(demo_dir):
    train = [json.loads(line) for line in (demo_dir / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (demo_dir / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == 64 and len(heldout) == 24
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in heldout}
    for row in train + heldout:
        a, b = map(int, row["messages"][0]["content"].removeprefix("What is ").removesuffix("?").split(" + "))
        assert demo.score("", row["messages"][1]["content"], str(a + b)) == 1.0


@pytest.mark.slow
def test_run_evaluates_each_iteration_stops_early_and_names_the_best_model(tmp_path, demo_dir):
    # marginBelow far above any margin: the run must stop after its first evaluation, with the reason.
    spec = spec_file(tmp_path, demo_dir, {"scorer": "spin_core.demo:score", "stopWhen": {"marginBelow": 100.0}})
    result = subprocess.run([*SPIN, "run", str(spec), "--json"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    store = Store.open(f"file://{tmp_path}/run")
    evaluation = store.read_json(layout.evaluation(1))
    assert evaluation["heldout"] == 24
    assert 0.0 <= evaluation["score"] <= 1.0 and 0.0 <= evaluation["baseline_score"] <= 1.0
    assert 0.0 <= evaluation["rewards/accuracies"] <= 1.0
    # Both models' per-prompt scores, the start's as M_0 = baseline, each with its interval, and the paired change.
    assert len(evaluation["scores"]) == len(evaluation["scores_previous"]) == 24
    assert evaluation["score"] == sum(evaluation["scores"]) / 24
    assert evaluation["score_previous"] == evaluation["baseline_score"] == sum(evaluation["scores_previous"]) / 24
    for prefix in ("score", "score_previous"):
        assert evaluation[f"{prefix}_ci95_low"] <= evaluation[prefix] <= evaluation[f"{prefix}_ci95_high"]
        assert evaluation[f"{prefix}_ci95_high"] - evaluation[f"{prefix}_ci95_low"] > 0.1  # 24 prompts: wide
    assert evaluation["score_change"] == pytest.approx(evaluation["score"] - evaluation["score_previous"])
    assert evaluation["logps/real_change"] == pytest.approx(
        evaluation["logps/real"] - evaluation["logps/real_previous"]
    )
    assert evaluation["collapse"] == float(bool(evaluation["warnings"]))
    assert summary["iterations"] == 1 and "fell below 100.0" in summary["stopReason"]
    assert summary["bestIteration"] == 1
    assert summary["bestCheckpoint"] == store.uri_of(layout.checkpoint(1))
    assert store.is_published(layout.checkpoint(1))
    assert store.published("iter-2/") == []
    assert "stopped early" in result.stderr


@pytest.mark.slow
def test_stop_when_collapse_ends_the_run_when_the_heldout_evaluation_warns(tmp_path, demo_dir):
    """Bare SPIN at a high learning rate pushes the held-out log p(real answer) down in iteration 1; with a low
    collapseWarnNats the evaluation warns and stopWhen.collapse ends a 3-iteration run there, saying why."""
    spec = spec_file(tmp_path, demo_dir, {"scorer": "spin_core.demo:score", "stopWhen": {"collapse": True}})
    doc = yaml.safe_load(spec.read_text())
    doc["spec"]["training"].update(learningRate=3e-3, epochs=3, collapseWarnNats=0.05, sftWeight=0.0)
    spec.write_text(yaml.safe_dump(doc))
    result = subprocess.run([*SPIN, "run", str(spec), "--json"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    evaluation = Store.open(f"file://{tmp_path}/run").read_json(layout.evaluation(1))
    assert evaluation["logps/real_change"] < -0.05, "the setting no longer lowers held-out log p(real): pick another"
    assert evaluation["collapse"] == 1.0 and "held-out log p(real answer) fell by" in evaluation["warnings"][-1]
    assert summary["iterations"] == 1 and "evaluation of iteration 1 warned of a collapse" in summary["stopReason"]
    assert "warning: iteration 1: the held-out log p(real answer) fell" in result.stderr


@pytest.mark.parametrize(
    ("evaluation", "message"),
    [
        ({"scorer": "nosuchmodule:f"}, "cannot import module 'nosuchmodule'"),
        ({"scorer": "spin_core.demo:nothing"}, "has no 'nothing'"),
        ({"metric": "rewards/margins", "maxSamples": 5, "dataset": {"uri": "EMPTY"}}, "the dataset is empty"),
        ({"metric": "rewards/margins", "heldoutFraction": 1e-6}, "the held-out split is empty"),
    ],
)
def test_bad_evaluation_input_fails_before_any_step(tmp_path, demo_dir, evaluation, message):
    if evaluation.get("dataset", {}).get("uri") == "EMPTY":
        (tmp_path / "empty.jsonl").write_text("\n")
        evaluation["dataset"]["uri"] = f"file://{tmp_path}/empty.jsonl"
    spec = spec_file(tmp_path, demo_dir, evaluation)
    result = subprocess.run([*SPIN, "run", str(spec)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists(), "nothing may run or be written before the evaluation input is checked"

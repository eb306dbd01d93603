"""Fast checks of `spin report` and the local runner's bookkeeping (no model runs here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spin_core import layout
from spin_core.errors import SpinError
from spin_core.local import LocalRunner
from spin_core.resource import parse
from spin_core.store import Store

SPIN = [sys.executable, "-m", "spin_core"]


def document(tmp_path: Path, **spec) -> dict:
    return {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SpinRun",
        "metadata": {"name": "unit"},
        "spec": {
            "model": {"uri": f"file://{tmp_path}/model"},
            "dataset": {"uri": f"file://{tmp_path}/data.jsonl"},
            "storage": {"uri": f"file://{tmp_path}/run"},
            "iterations": 2,
            **spec,
        },
    }


def test_storage_is_claimed_by_one_run_only(tmp_path):
    LocalRunner(parse(document(tmp_path))).claim_storage()
    store = Store.open(f"file://{tmp_path}/run")
    (tmp_path / "rows.jsonl").write_text("{}\n")
    store.publish(layout.shard(1, 0, 1), {"rows.jsonl": tmp_path / "rows.jsonl"})
    # Same run again, with settings that only say where and how it runs: fine.
    LocalRunner(parse(document(tmp_path, training={"checkpointEverySteps": 7, "processesPerNode": 2}))).claim_storage()
    other = document(tmp_path, generation={"shards": 3})
    other["spec"]["dataset"]["uri"] = f"file://{tmp_path}/other.jsonl"
    with pytest.raises(SpinError, match=r"spec\.dataset\.uri: .*; spec\.generation\.shards: 1 -> 3"):
        LocalRunner(parse(other)).claim_storage()


def test_spin_run_rejects_bad_input_with_one_line(tmp_path):
    bad = document(tmp_path, training={"nodes": 2, "processesPerNode": 1, "microBatchSize": 8, "globalBatchSize": 64})
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(bad))
    result = subprocess.run([*SPIN, "run", str(spec)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "spec.training.nodes must be 1" in result.stderr
    assert "Traceback" not in result.stderr

    spec.write_text("kind: SpinRun\n")
    result = subprocess.run([*SPIN, "run", str(spec)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "spec: required field is missing" in result.stderr


def test_spin_run_reports_missing_model_before_starting(tmp_path):
    spec = tmp_path / "run.yaml"
    spec.write_text(yaml.safe_dump(document(tmp_path, generation={"backend": "hf"})))
    result = subprocess.run([*SPIN, "run", str(spec)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert f"spec.dataset.uri: file://{tmp_path}/data.jsonl does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "data.jsonl").write_text(json.dumps(row) + "\n")
    result = subprocess.run([*SPIN, "run", str(spec)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert f"spec.model.uri: file://{tmp_path}/model does not exist" in result.stderr
    assert not (tmp_path / "run").exists(), "nothing may be written before the inputs are checked"


def fake_metrics(t: int) -> dict:
    steps = [
        {
            "step": s,
            "loss": 0.7 - 0.1 * s,
            "rewards/margins": 0.1 * s,
            "rewards/accuracies": 0.5 + 0.1 * s,
            "logps/real": -10.0 - s,
        }
        for s in range(1, 4)
    ]
    final = {
        "loss": 0.4 - 0.01 * t,
        "rewards/accuracies": 0.8,
        "rewards/margins": 0.3,
        "logps/real": -12.0,
        "logps/generated": -15.0,
        "pairs/identical": 1,
        "pairs/total": 24,
    }
    return {"steps": steps, "epochs": [final], "final": final}


def test_report_writes_a_png_and_a_markdown_table(tmp_path):
    store = Store.open(f"file://{tmp_path}/run")
    store.publish_json(layout.RUN, parse(document(tmp_path)).to_document())
    for t in (1, 2):
        store.publish_json(layout.metrics(t), fake_metrics(t))
    out = tmp_path / "report"
    result = subprocess.run(
        [*SPIN, "report", store.uri, "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    png = (out / "unit-report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    md = (out / "unit-report.md").read_text()
    assert "| 1 | 0.3900 | 0.8000 |" in md and "| 2 | 0.3800 |" in md
    assert "![metrics](unit-report.png)" in md


def test_report_on_something_that_is_not_a_run(tmp_path):
    result = subprocess.run([*SPIN, "report", f"file://{tmp_path}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "holds no run" in result.stderr and "Traceback" not in result.stderr

"""Faults without a model (issue 16): checksummed documents, `spin verify`, `spin report` on edited numbers, no empty
folders after deletes, `--redo` keys, the janitor of a job's process group and stale build locks. Real processes,
real file stores, the real `spin` command."""

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

from spin_core import layout
from spin_core.errors import SpinError
from spin_core.resource import parse
from spin_core.stopping import call_scorer
from spin_core.store import IntegrityError, Store

SPIN = [sys.executable, "-m", "spin_core"]


def run_document(tmp_path: Path) -> dict:
    return parse(
        {
            "apiVersion": "selfplay.dev/v1alpha1",
            "kind": "SpinRun",
            "metadata": {"name": "unit"},
            "spec": {
                "model": {"uri": f"file://{tmp_path}/model"},
                "dataset": {"uri": f"file://{tmp_path}/data.jsonl"},
                "storage": {"uri": f"file://{tmp_path}/run"},
                "iterations": 1,
            },
        }
    ).to_document()


@pytest.fixture
def run_store(tmp_path) -> Store:
    return populate(Store.open(f"file://{tmp_path}/run"), tmp_path)


def populate(store: Store, tmp_path: Path) -> Store:
    """A small finished-looking run: run.json, a shard, a checkpoint, metrics.json."""
    store.publish_json(layout.RUN, run_document(tmp_path))
    files = tmp_path / "files"
    files.mkdir()
    (files / "rows.jsonl").write_text('{"id": "a"}\n')
    (files / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    store.publish(layout.shard(1, 0, 1), {"rows.jsonl": files / "rows.jsonl"})
    store.publish(layout.checkpoint(1), {"model.safetensors": files / "model.safetensors"})
    steps = [{"step": 1, "loss": 0.69, "rewards/margins": 0.01, "rewards/accuracies": 0.5, "logps/real": -9.0}]
    store.publish_json(layout.metrics(1), {"steps": steps, "epochs": [], "final": {"loss": 0.6931, "pairs/total": 8}})
    return store


def stored(store: Store, key: str) -> Path:
    """The folder holding a published artefact's files."""
    return store.backend.local_path(f"{key}/{store.manifest(key).attempt}")


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


# -- checksummed JSON documents ----------------------------------------------------------------------------------------
def test_documents_carry_a_checksum_and_edits_are_refused(run_store):
    assert run_store.read_json(layout.metrics(1))["final"]["loss"] == 0.6931
    path = run_store.backend.local_path(layout.metrics(1))
    assert '"checksum": "sha256:' in path.read_text()
    path.write_text(path.read_text().replace("0.6931", "0.1"))
    with pytest.raises(IntegrityError, match=r"metrics\.json is corrupt: changed after publishing") as info:
        run_store.read_json(layout.metrics(1))
    assert info.value.uri == run_store.uri_of(layout.metrics(1)) and info.value.exit_code == 1
    # Re-serialised differently (indentation, key order), the same values still verify.
    document = json.loads(path.read_text().replace("0.1", "0.6931"))
    path.write_text(json.dumps(document, indent=4))
    assert run_store.read_json(layout.metrics(1))["final"]["loss"] == 0.6931
    # A document written before checksums existed is still read.
    run_store.backend.put_bytes("iter-1/eval.json", b'{"score": 0.5}')
    assert run_store.read_json("iter-1/eval.json") == {"score": 0.5}


# -- spin verify ------------------------------------------------------------------------------------------------------
def verify(store: Store) -> subprocess.CompletedProcess:
    return subprocess.run([*SPIN, "verify", store.uri], capture_output=True, text=True, timeout=120)


def test_spin_verify_checks_every_byte_and_says_how_to_repair(run_store, tmp_path):
    result = verify(run_store)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "intact: 2 artefacts (2 files" in result.stdout and "2 documents" in result.stdout

    flip_byte(stored(run_store, layout.checkpoint(1)) / "model.safetensors")
    metrics = run_store.backend.local_path(layout.metrics(1))
    metrics.write_text(metrics.read_text().replace("0.6931", "0.0001"))
    (stored(run_store, layout.shard(1, 0, 1)) / "rows.jsonl").unlink()
    run_store.backend.put_bytes("iter-1/checkpoint/a-20260101T000000-0000/x.bin", b"left by a killed writer")
    result = verify(run_store)
    assert result.returncode == 1
    out = result.stdout
    assert f"CORRUPT {run_store.uri}/iter-1/checkpoint: model.safetensors does not match its sha256" in out
    assert f"CORRUPT {run_store.uri}/iter-1/metrics.json: is corrupt: changed after publishing" in out
    assert f"CORRUPT {run_store.uri}/iter-1/generated/shard-0-of-1: rows.jsonl listed in the manifest is missing" in out
    assert "1 attempt folder(s) no manifest names" in out
    for key in ("iter-1/checkpoint", "iter-1/metrics.json", "iter-1/generated/shard-0-of-1"):
        assert f"  spin run {run_store.uri} --redo {key}" in out

    result = subprocess.run([*SPIN, "verify", f"file://{tmp_path}/nothing"], capture_output=True, text=True)
    assert result.returncode == 2 and "holds no run" in result.stderr


def test_spin_verify_and_report_on_the_real_s3_server(s3_env, tmp_path):
    endpoint, bucket = s3_env
    store = populate(Store.open(f"s3://{bucket}/runs/x", endpoint), tmp_path)
    run = ["--endpoint", endpoint]
    result = subprocess.run([*SPIN, "verify", store.uri, *run], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    key = layout.checkpoint(1)
    weights = f"{key}/{store.manifest(key).attempt}/model.safetensors"
    data = bytearray(store.backend.get_bytes(weights))
    data[10] ^= 1
    store.backend.put_bytes(weights, bytes(data))  # the same size: only the bytes tell
    metrics = store.backend.get_bytes(layout.metrics(1)).replace(b"0.6931", b"0.0001")
    store.backend.put_bytes(layout.metrics(1), metrics)
    result = subprocess.run([*SPIN, "verify", store.uri, *run], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"CORRUPT {store.uri}/iter-1/checkpoint: model.safetensors does not match its sha256" in result.stdout
    assert f"  spin run {store.uri} --redo iter-1/checkpoint" in result.stdout
    assert f"  spin run {store.uri} --redo iter-1/metrics.json" in result.stdout
    report = [*SPIN, "report", store.uri, *run, "--out", str(tmp_path / "r")]
    result = subprocess.run(report, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "metrics.json is corrupt" in result.stderr


def test_spin_report_refuses_edited_numbers(run_store, tmp_path):
    # A run continued past run.json's iterations (iterations may grow): its later iterations are reported too.
    run_store.publish_json(layout.metrics(2), {"steps": [], "epochs": [], "final": {"loss": 0.5}})
    ok = subprocess.run([*SPIN, "report", run_store.uri, "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "| 2 | 0.5000 |" in (tmp_path / "r" / "unit-report.md").read_text()
    metrics = run_store.backend.local_path(layout.metrics(1))
    metrics.write_text(metrics.read_text().replace("0.6931", "0.0001"))
    result = subprocess.run(
        [*SPIN, "report", run_store.uri, "--out", str(tmp_path / "edited")], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "metrics.json is corrupt: changed after publishing" in result.stderr
    assert f"regenerate it with: spin run {run_store.uri} --redo iter-1/metrics.json" in result.stderr
    assert not (tmp_path / "edited").exists()


def test_deleting_leaves_no_empty_folders(run_store):
    key = layout.train_state(1, 3) + "/rank-0"
    files = run_store.backend.local_path("")
    run_store.backend.put_bytes("scratch/a.bin", b"x")
    run_store.publish(key, {"state.pt": run_store.backend.local_path("scratch/a.bin")})
    run_store.delete_artefact(key)
    assert not (files / "iter-1" / "train-state").exists()
    assert (files / "iter-1" / "checkpoint").is_dir()
    assert (files / layout.RUN).is_file()


def test_redo_keys():
    from spin_core.verify import redo_command, redo_target

    assert redo_target("iter-2/generated/shard-1-of-2/").kind == "shard"
    assert redo_target("iter-2/generated/shard-1-of-2/a-x/rows.jsonl").key == "iter-2/generated/shard-1-of-2"
    assert redo_target("iter-3/checkpoint").iteration == 3
    assert redo_target("iter-1/train-state/step-00000002/rank-1").key == "iter-1/train-state"
    assert redo_target("iter-1/metrics.json").kind == "metrics"
    assert redo_target("run.json").kind == "run"
    with pytest.raises(SpinError, match="not an artefact of a run"):
        redo_target("iter-1/somewhere")
    assert redo_command("s3://b/run", "run.json") == "spin run SPINRUN.yaml --redo run.json"
    assert redo_command("run.yaml", "iter-1/checkpoint/a-1/x") == "spin run run.yaml --redo iter-1/checkpoint"


def test_a_raising_scorer_is_a_failed_step_naming_the_row():
    from spin_core.errors import StepFailed

    def boom(prompt, reference, generated):
        raise KeyError("no digits")

    with pytest.raises(StepFailed, match=r"raised KeyError on row 'task-00007' \(prompt 'What is 2\+2\?'\)") as info:
        call_scorer(boom, "m:boom", "What is 2+2?", "4", "four", "task-00007")
    assert info.value.exit_code == 1


# -- process groups (item 2) -----------------------------------------------------------------------------------------
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
RUNNER = f"""
import subprocess, sys, time
from spin_core.procs import ChildGroup
group = ChildGroup.start()
job = ("import subprocess, sys, time\\n"  # its child ignores SIGTERM: only SIGKILL ends it
       "g = subprocess.Popen([sys.executable, '-c', {STUBBORN!r}])\\n"
       "print(g.pid, flush=True)\\n"
       "time.sleep(600)\\n")
child = subprocess.Popen([sys.executable, "-c", job], process_group=group.pgid, stdout=subprocess.PIPE, text=True)
grandchild = child.stdout.readline().strip()
print(group.pgid, child.pid, grandchild, flush=True)
time.sleep(600)
"""


def test_a_killed_runner_leaves_no_process_of_its_job(tmp_path):
    """kill -9 the process that started a job: the job's process group (the child, its own children, even ones that
    ignore SIGTERM) must end anyway."""
    runner = subprocess.Popen([sys.executable, "-c", RUNNER], stdout=subprocess.PIPE, text=True)
    janitor, child, grandchild = (int(x) for x in runner.stdout.readline().split())
    job = [psutil.Process(pid) for pid in (janitor, child, grandchild)]
    assert all(p.is_running() for p in job)
    runner.send_signal(signal.SIGKILL)
    runner.wait(10)
    _, alive = psutil.wait_procs(job, timeout=30)
    for p in alive:
        p.kill()
    assert not alive, f"survived the runner: {[p.pid for p in alive]}"


# -- stale build locks (item 1) ----------------------------------------------------------------------------------------
HOLD_LOCK = (
    "import os, sys, time; os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); print('held', flush=True); time.sleep(600)"
)


def test_only_locks_of_killed_builds_are_removed(tmp_path):
    from spin_core.procs import clear_stale_build_locks, stale_build_locks

    root = tmp_path / "torch_extensions"
    (root / "deepspeed_shm_comm").mkdir(parents=True)
    lock = root / "deepspeed_shm_comm" / "lock"
    builder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline().strip() == "held"
        assert stale_build_locks([root]) == []  # a live build: keep its lock
        builder.send_signal(signal.SIGKILL)  # killed mid-build: the lock stays behind
        builder.wait(10)
        assert lock.exists()
        assert clear_stale_build_locks([root]) == [lock]
        assert not lock.exists()
    finally:
        if builder.poll() is None:
            builder.kill()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root)}
    (root / "other" / "py311_cpu").mkdir(parents=True)
    (root / "other" / "py311_cpu" / "lock").write_text("")
    started = time.monotonic()
    result = subprocess.run(
        [*SPIN, "train", "--spec", str(tmp_path / "nope.yaml"), "--iteration", "1"],
        capture_output=True,
        text=True,
        env=env,
    )
    print(f"spin train startup with a stale lock: {time.monotonic() - started:.1f} s")
    assert f"removed a stale build lock {root}/other/py311_cpu/lock" in result.stderr
    assert result.returncode == 2  # and then the missing spec, as usual

"""`spin run` under faults (issue 16), on whole runs with the real jobs: transformers generation, DeepSpeed training on
2 gloo processes, evaluation with a user scorer, and a vLLM engine for the orphan test. One finished run is made per
module; each test works on its own copy of its storage folder (a run's folder may be copied: README)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from spin_core import layout
from spin_core.context import is_heldout
from spin_core.store import Store
from tests.fixtures.models import CPU_TRAINING, make_chat_rows

SPIN = [sys.executable, "-m", "spin_core"]
HELDOUT = 0.25
pytestmark = pytest.mark.slow


def spec_document(model: Path, data: Path, run_dir: Path, **changes) -> dict:
    spec = {
        "model": {"uri": f"file://{model}"},
        "dataset": {"uri": f"file://{data}", "format": "messages"},
        "storage": {"uri": f"file://{run_dir}"},
        "iterations": 1,
        "generation": {"backend": "hf", "shards": 2, "maxNewTokens": 8, "gpusPerShard": 0, "seed": 3},
        "training": dict(CPU_TRAINING),
        "evaluation": {
            "heldoutFraction": HELDOUT,
            "scorer": "tests.faulty_scorer:score",
            "backend": "hf",
            "maxNewTokens": 8,
        },
    }
    name = changes.pop("name", "faults")
    for key, value in changes.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    return {"apiVersion": "selfplay.dev/v1alpha1", "kind": "SpinRun", "metadata": {"name": name}, "spec": spec}


def write_spec(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


def spin(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SPIN, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def last_json(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def error_line(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-4000:]
    return errors[0]


def redo_argv(error: str) -> list[str]:
    """The command an error says regenerates a corrupt artefact, as argv."""
    found = re.search(r"regenerate it with: spin (run \S+ --redo \S+)", error)
    assert found, error
    return found[1].split()


class Run:
    """A finished run made once per module: its spec, its folder, its `--json` summary."""

    def __init__(self, root: Path, model: Path, data: Path):
        self.model, self.data = model, data
        self.dir = root / "run"
        self.spec = write_spec(root / "spinrun.yaml", spec_document(model, data, self.dir))
        started = time.monotonic()
        result = spin("run", str(self.spec), "--json")
        self.seconds = time.monotonic() - started
        assert result.returncode == 0, result.stderr[-6000:]
        self.summary = last_json(result)

    def copy(self, tmp_path: Path, drop: tuple[str, ...] = (), **changes) -> tuple[Path, Store]:
        """A copy of the run's folder without the artefacts and documents in `drop`, and a spec pointing at it."""
        target = tmp_path / "run"
        shutil.copytree(self.dir, target)
        store = Store.open(f"file://{target}")
        for key in drop:
            if key.endswith(".json"):
                store.backend.delete([key])
            else:
                store.delete_artefact(key)
        spec = write_spec(tmp_path / "spinrun.yaml", spec_document(self.model, self.data, target, **changes))
        return spec, store


TRAINED = (layout.checkpoint(1), layout.metrics(1), layout.evaluation(1))
GENERATED = (layout.shard(1, 0, 2), layout.shard(1, 1, 2))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, tiny_dataset) -> Run:
    run = Run(tmp_path_factory.mktemp("finished"), tiny_model_dir, tiny_dataset)
    print(f"the module's run took {run.seconds:.0f} s")
    return run


def folder(store: Store, key: str) -> Path:
    return store.backend.local_path(f"{key}/{store.manifest(key).attempt}")


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def wait_for(condition, proc: subprocess.Popen, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert proc.poll() is None, f"spin run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout} s"
        time.sleep(0.2)
    return found


def job_processes(proc: subprocess.Popen, marker: str) -> list[psutil.Process]:
    found = []
    for p in descendants(proc.pid):
        try:
            if marker in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def vllm_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    found = []
    for p in descendants(proc.pid):
        try:
            if p.name().startswith("VLLM::"):
                found.append(p)
        except psutil.Error:
            continue
    return found


def assert_no_survivors(processes: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(processes, timeout=60)
    for p in alive:
        p.kill()
    assert not alive, f"outlived spin run: {[(p.pid, p.name()) for p in alive]}"


# -- a finished run ------------------------------------------------------------------------------------------------
def test_a_finished_run_is_intact_and_leaves_no_scratch_folders(finished):
    assert finished.summary["phase"] == "Succeeded" and finished.summary["iterations"] == 1
    assert not (finished.dir / "iter-1" / "train-state").exists(), "empty train-state folders were left behind"
    result = spin("verify", f"file://{finished.dir}")
    assert result.returncode == 0 and "intact: " in result.stdout, result.stdout + result.stderr


def test_a_flipped_byte_in_the_final_model_fails_the_rerun_and_redo_repairs_it(finished, tmp_path):
    spec, store = finished.copy(tmp_path)
    flip_byte(folder(store, layout.checkpoint(1)) / "model.safetensors")
    result = spin("run", str(spec), "--json", timeout=300)
    assert result.returncode == 1
    error = error_line(result)
    assert "iter-1/checkpoint is corrupt: model.safetensors does not match its sha256" in error
    assert f"regenerate it with: spin run {spec} --redo iter-1/checkpoint" in error
    assert last_json(result)["phase"] == "Failed" and last_json(result)["exitCode"] == 1
    assert "Succeeded" not in result.stdout

    repaired = spin(*redo_argv(error), "--json")
    assert repaired.returncode == 0, repaired.stderr[-6000:]
    assert last_json(repaired)["phase"] == "Succeeded"
    assert spin("verify", store.uri).returncode == 0
    again = spin(*redo_argv(error), timeout=300)
    assert again.returncode == 0 and "verifies: nothing to redo" in again.stderr


def test_edited_metrics_are_refused_and_redo_restores_them(finished, tmp_path):
    spec, store = finished.copy(tmp_path)
    original = store.read_json(layout.metrics(1))
    path = store.backend.local_path(layout.metrics(1))
    document = json.loads(path.read_text())
    document["final"]["loss"] = 0.001
    path.write_text(json.dumps(document, indent=1))

    report = spin("report", store.uri, "--out", str(tmp_path / "report"), timeout=300)
    assert report.returncode == 1 and "metrics.json is corrupt" in report.stderr
    result = spin("run", str(spec), timeout=300)
    assert result.returncode == 1
    error = error_line(result)
    assert "iter-1/metrics.json is corrupt: changed after publishing" in error
    assert f"regenerate it with: spin run {spec} --redo iter-1/metrics.json" in error
    # `spin verify` names the run by its URI: its repair command runs the run from its own run.json.
    verified = spin("verify", store.uri)
    assert verified.returncode == 1
    command = f"spin run {store.uri} --redo iter-1/metrics.json"
    assert f"  {command}" in verified.stdout
    repaired = spin(*command.split()[1:], timeout=300)
    assert repaired.returncode == 0, repaired.stderr[-4000:]
    assert store.read_json(layout.metrics(1)) == original
    assert spin("report", store.uri, "--out", str(tmp_path / "report"), timeout=300).returncode == 0
    assert spin("verify", store.uri).returncode == 0


def test_a_corrupt_shard_is_found_before_the_next_iteration_and_redo_regenerates_it(finished, tmp_path):
    """Continuing the run to 2 iterations: iteration 2 trains on iteration 1's pairs too, so the flipped byte must
    stop the run before iteration 2 generates, with the command that regenerates the shard."""
    spec, store = finished.copy(tmp_path, iterations=2)
    shard = layout.shard(1, 0, 2)
    rows = (folder(store, shard) / layout.SHARD_ROWS).read_bytes()
    flip_byte(folder(store, shard) / layout.SHARD_ROWS)
    result = spin("run", str(spec), "--json", timeout=300)
    assert result.returncode == 1, result.stderr[-4000:]
    error = error_line(result)
    assert f"{store.uri}/{shard} is corrupt: rows.jsonl does not match its sha256" in error
    assert f"regenerate it with: spin run {spec} --redo {shard}" in error
    assert "spin_core generate" not in result.stderr and store.published("iter-2/") == []

    repaired = spin(*redo_argv(error), "--json")
    assert repaired.returncode == 0, repaired.stderr[-6000:]
    assert (folder(store, shard) / layout.SHARD_ROWS).read_bytes() == rows  # the same seeds: the same answers
    assert spin("verify", store.uri).returncode == 0


# -- storage reuse (item 9) -------------------------------------------------------------------------------------------
def test_another_run_may_not_reuse_a_finished_runs_folder(finished, tmp_path):
    spec, _ = finished.copy(tmp_path, name="other", training={"beta": 0.5, "learningRate": 0.01})
    result = spin("run", str(spec), "--json", timeout=300)
    assert result.returncode == 2
    error = error_line(result)
    assert "belongs to run 'faults', which has published artefacts there" in error
    for change in ("metadata.name: 'faults' -> 'other'", "spec.training.beta: 0.1 -> 0.5", "learningRate: 0.0001"):
        assert change in error
    assert last_json(result)["exitCode"] == 2

    # Where and how the steps run, and where the folder lives, may change: the run is the same.
    same, _ = finished.copy(tmp_path / "moved", training={"processesPerNode": 1, "checkpointEverySteps": 9})
    result = spin("run", str(same), "--json", timeout=300)
    assert result.returncode == 0 and "nothing to do" in result.stderr, result.stderr[-3000:]


# -- failed steps exit 1, interrupts 130 (item 6) ------------------------------------------------------------------
def test_a_stale_deepspeed_build_lock_does_not_hang_training(finished, tmp_path):
    """Item 1: a kill -9 during DeepSpeed's JIT build leaves its lock; the next training must not wait on it."""
    spec, _ = finished.copy(tmp_path, drop=TRAINED)
    extensions = tmp_path / "torch_extensions"
    built = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    if built.is_dir():
        shutil.copytree(built, extensions)
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    hold = (
        "import os, sys, time; os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); print('held', flush=True); time.sleep(600)"
    )
    builder = subprocess.Popen([sys.executable, "-c", hold, str(lock)], stdout=subprocess.PIPE, text=True)
    assert builder.stdout.readline().strip() == "held"
    builder.send_signal(signal.SIGKILL)  # as a kill -9 during the build would
    builder.wait(10)
    assert lock.exists()
    result = spin("run", str(spec), "--json", env={"TORCH_EXTENSIONS_DIR": str(extensions)}, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    assert f"removed a stale build lock {lock}" in result.stderr
    assert last_json(result)["phase"] == "Succeeded"


def test_a_crashed_rank_is_a_failed_step(finished, tmp_path):
    spec, store = finished.copy(tmp_path, drop=TRAINED)
    proc = subprocess.Popen(
        [*SPIN, "run", str(spec), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    ranks = wait_for(
        lambda: [p for p in job_processes(proc, "spin_core train") if "torch.distributed" not in " ".join(p.cmdline())],
        proc,
        300,
        "training ranks",
    )
    everything = descendants(proc.pid)
    ranks[0].kill()
    out, err = proc.communicate(timeout=300)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert result.returncode == 1, err[-4000:]
    error = error_line(result)
    assert error.startswith("error: training of iteration 1 failed (exit code 1)")
    assert error.endswith("run the same command to retry")
    assert last_json(result)["exitCode"] == 1 and not store.is_published(layout.checkpoint(1))
    assert_no_survivors(everything)


def test_a_crashed_job_is_a_failed_step(finished, tmp_path):
    spec, _ = finished.copy(tmp_path, drop=TRAINED + GENERATED)
    proc = subprocess.Popen(
        [*SPIN, "run", str(spec), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    job = wait_for(lambda: job_processes(proc, "spin_core generate"), proc, 300, "the generation job")
    job[0].kill()
    out, err = proc.communicate(timeout=300)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert result.returncode == 1, err[-4000:]
    error = error_line(result)
    assert "generation of iteration 1 (shards 0,1) failed (killed by SIGKILL); see its output above" in error
    assert last_json(result) == {"run": "faults", "phase": "Failed", "exitCode": 1, "error": error[len("error: ") :]}


def test_ctrl_c_is_130_and_stops_the_job(finished, tmp_path):
    spec, _ = finished.copy(tmp_path, drop=TRAINED + GENERATED)
    # As from a terminal: SIGINT at its default. A shell starts background jobs (`make test &`, a CI runner's) with
    # SIGINT ignored, which spin run would inherit, and then Ctrl-C could not reach it.
    proc = subprocess.Popen(
        [*SPIN, "run", str(spec), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for(lambda: job_processes(proc, "spin_core generate"), proc, 300, "the generation job")
    everything = descendants(proc.pid)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground process group: spin run
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-4000:]
    assert json.loads(out.strip().splitlines()[-1])["phase"] == "Interrupted"
    assert "interrupted: published artefacts are kept" in err
    assert_no_survivors(everything)


def test_a_raising_scorer_is_a_failed_step_that_names_the_row(finished, tmp_path):
    spec, _ = finished.copy(tmp_path, drop=(layout.evaluation(1),))
    row = next(r for r in make_chat_rows(24) if is_heldout(r["prompt_id"], HELDOUT))
    prompt = row["messages"][0]["content"]
    result = spin("run", str(spec), "--json", env={"SPIN_TEST_SCORER_RAISES": prompt})
    assert result.returncode == 1, result.stderr[-4000:]
    error = error_line(result)
    assert error.startswith("error: evaluation of iteration 1 failed (exit code 1): evaluation.scorer ")
    assert f"raised ValueError on row {row['prompt_id']!r}" in error and "cannot parse the answer" in error


def test_left_truncated_prompts_are_counted_once(finished, tmp_path):
    spec, _ = finished.copy(tmp_path, drop=TRAINED + GENERATED, training={"maxPromptLength": 6})
    result = spin("generate", "--spec", str(spec), "--iteration", "1", "--shards", "0,1", timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    notes = [line for line in result.stderr.splitlines() if "longer than training.maxPromptLength 6 tokens" in line]
    assert len(notes) == 2, result.stderr[-4000:]  # one per shard, with its count
    assert all(re.search(r"shard \d/2: \d+ of \d+ prompts are longer", n) for n in notes)
    assert "their start (the chat template's beginning) is lost" in notes[0]


# -- no orphaned vLLM processes (item 2), vLLM's cache in SPIN_CACHE_DIR (item 10) -------------------------------------
def test_killing_spin_run_during_vllm_generation_leaves_no_engine(tmp_path, tiny_model_dir, tiny_dataset):
    spec = write_spec(
        tmp_path / "spinrun.yaml",
        spec_document(tiny_model_dir, tiny_dataset, tmp_path / "run", generation={"backend": "vllm"}),
    )
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "SPIN_CACHE_DIR": str(cache)}
    proc = subprocess.Popen([*SPIN, "run", str(spec)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_for(lambda: vllm_processes(proc), proc, 600, "the vLLM engine")
        time.sleep(2)  # its worker too
        everything = descendants(proc.pid)
        assert any(p.name().startswith("VLLM::EngineCor") for p in everything), [p.name() for p in everything]
        proc.send_signal(signal.SIGKILL)  # spin run alone, not its process group
        proc.wait(30)
        assert_no_survivors(everything)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (cache / "vllm").is_dir()
    assert not (home / ".cache" / "vllm").exists()

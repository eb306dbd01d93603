"""`spin run`: execute a SpinRun on one machine with the same entry points the cluster's containers run.

The loop is: ask the planner for the next step given what the store holds, run that step's job(s) as child
processes (`spin generate` per shard; `spin train` under torchrun), repeat. Everything the children publish
is atomic, so a crash, a kill or Ctrl-C at any point loses only the step in flight; running again continues.

Before any step (and before `run.json` claims the storage) every input that can be checked without running a model
is checked (`preflight`), and what the rest of the run will read from the store is verified (`check_published`):
a bad input fails in seconds with exit code 2 and one line, a corrupt artefact with exit code 1 and the command that
regenerates it (`--redo KEY`). Each job runs in a process group of its own that ends with it, or with `spin run`
(`procs.ChildGroup`), so no vLLM or torchrun process outlives the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from spin_core import layout, reuse
from spin_core.context import RunContext
from spin_core.errors import INTERRUPTED, STEP_FAILED, SpinError, StepFailed
from spin_core.planner import Progress, Step, best, plan, training_iterations
from spin_core.procs import ChildGroup, clear_stale_build_locks, describe_exit
from spin_core.resource import parse
from spin_core.spec import SpinRun
from spin_core.stopping import format_score, heldout_points, load_scorer, paired_change
from spin_core.store import MANIFEST, AlreadyPublished, IntegrityError, NotPublished, Store, cache_dir
from spin_core.verify import RedoTarget, check_artefact, check_document, redo_target, repair_hint

ERROR_FILE_ENV = "SPIN_ERROR_FILE"
"""Where a job writes its failure as JSON ({exitCode, message, artefact}); `spin run` points each child at one."""
REDO_ORDER = {"train-state": 0, "shard": 1, "checkpoint": 2, "metrics": 3, "evaluation": 4}


@dataclass
class LocalRunner:
    """Runs the plan step by step; children inherit the terminal so their progress bars show."""

    run: SpinRun
    # Not a terminal (CI, a log file): 120 columns rather than rich's 80, so the summary table fits.
    console: Console = field(default_factory=lambda: Console(stderr=True, width=shutil.get_terminal_size((120, 24))[0]))
    python: str = sys.executable
    source: str = "SPINRUN.yaml"
    """How the user named the run (the SpinRun file or the run's URI): the commands suggested in messages use it."""

    def __post_init__(self) -> None:
        self.ctx = RunContext(self.run)
        self.started = time.monotonic()
        self.child: subprocess.Popen | None = None
        self.steps_run = 0

    @property
    def store(self) -> Store:
        return self.ctx.store

    # -- the run's identity ------------------------------------------------------------------------
    def resolved_spec_file(self) -> Path:
        """Write the resolved spec where the children can read it (the operator uses a ConfigMap)."""
        tag = hashlib.sha256(self.store.uri.encode()).hexdigest()[:16]
        path = cache_dir() / "runs" / f"{self.run.metadata.name}-{tag}" / "run.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.run.to_document(), indent=1, sort_keys=True))
        return path

    def claim_storage(self, progress: Progress | None = None, rewrite: bool = False) -> None:
        """Publish run.json, or check that the existing one describes this run (`reuse.conflicts`: which fields may
        differ). A folder that holds nothing but the claim is claimed anew; `rewrite` replaces a corrupt claim."""
        document = self.run.to_document()
        try:
            self.store.publish_json(layout.RUN, document)
            return
        except AlreadyPublished:
            pass
        uri = self.store.uri_of(layout.RUN)
        try:
            existing = self.store.read_json(layout.RUN)
        except IntegrityError:
            if not rewrite:
                raise
            self._reclaim(document, f"replaced the corrupt {uri}")
            return
        changed = reuse.conflicts(_normalised(existing), document, self._started_iterations())
        if not changed:
            return
        if self._holds_only_the_claim():
            self._reclaim(document, f"{uri} claimed anew: the run it named had published nothing")
            return
        owner = existing.get("metadata", {}).get("name", "?")
        raise SpinError(
            f"{uri} belongs to run {owner!r}, which has published artefacts there, and these fields may not change: "
            f"{'; '.join(changed)}. Restore them, or give this run a new spec.storage.uri "
            "(README, 'Continuing a run', lists what may change)"
        )

    def _reclaim(self, document: dict, note: str) -> None:
        self.store.backend.delete([layout.RUN])
        self.store.publish_json(layout.RUN, document)
        self.console.print(f"[yellow]{note}[/yellow]")

    def _holds_only_the_claim(self) -> bool:
        """Nothing is published but run.json (attempt folders of killed writers do not count)."""
        for key, _ in self.store.backend.list(""):
            if key != layout.RUN and (key.endswith("/" + MANIFEST) or (key.endswith(".json") and "/a-" not in key)):
                return False
        return True

    def _started_iterations(self) -> set[int]:
        """Iterations with a published model or train state: their schedule entries may not change."""
        started = set()
        for key in self.store.published(""):
            head = key.split("/", 1)[0]
            if head.startswith("iter-") and ("/checkpoint" in key or "/train-state/" in key):
                started.add(int(head.removeprefix("iter-")))
        return started

    # -- checks before any step ----------------------------------------------------------------------
    def preflight(self, progress: Progress) -> None:
        """Every input that can be checked without running a model, before any step and before run.json claims the
        storage: the whole dataset, the held-out split and scorer, the model folder (config, weights headers,
        tokenizer and chat template, head dim for vLLM). A problem raises a SpinError (exit code 2)."""
        from spin_core.inputs import check_tokenizer

        spec = self.run.spec
        examples = self.ctx.training_examples()
        prompts = [e.prompt for e in examples]
        if spec.evaluation is not None:
            prompts += [e.prompt for e in self.ctx.heldout_examples()]
            if spec.evaluation.scorer:
                load_scorer(spec.evaluation.scorer)
        if 1 in progress.trained:
            return
        folder = self.ctx.fetch_model(1)
        config = json.loads((folder / "config.json").read_text())
        check_tokenizer(folder, f"spec.model.uri {spec.model.uri}", config, prompts)
        if len(examples) < spec.training.global_batch_size:
            raise SpinError(
                f"spec.dataset.uri: {len(examples)} training examples, fewer than training.globalBatchSize "
                f"{spec.training.global_batch_size}: iteration 1 would have too few pairs for one optimizer step"
            )

    def check_published(self, progress: Progress) -> None:
        """What the rest of the run reads from the store must be intact, found now rather than when a step trips
        over it: every manifest and file size; every byte of the shards later training reads and of the model the
        next step starts from; on a finished run, every byte of its final and best models; the metrics and
        evaluation documents (checksums). Raises IntegrityError (exit code 1; `explain` adds the redo command)."""
        store, spec = self.store, self.run.spec
        for key in store.published(""):
            if problems := check_artefact(store, key, full=False):
                raise IntegrityError(f"{store.uri_of(key)} is corrupt: {problems[0]}", store.uri_of(key))
        for t in sorted(progress.trained):
            if store.exists(layout.metrics(t)):
                store.read_json(layout.metrics(t))
        step = plan(spec, progress)
        full: set[str] = set()
        if step.kind == "done":
            full.add(layout.checkpoint(step.iteration))
            if (top := best(spec, progress)) is not None:
                full.add(layout.checkpoint(top[0]))
        else:
            if progress.trained:
                full.add(layout.checkpoint(max(progress.trained)))
            for t in range(1, spec.iterations + 1):
                if t not in progress.trained:
                    for i in training_iterations(spec, t):
                        n = spec.generation.shards
                        full |= {layout.shard(i, s, n) for s in progress.generated.get(i, ())}
        for key in sorted(full):
            if store.is_published(key):
                store.fetch(key)  # every byte; on S3 into the cache the jobs read from

    # -- steps -------------------------------------------------------------------------------------
    def progress(self) -> Progress:
        found = Progress.from_published(self.store.published(""), self.run.spec.generation.shards)
        if self.run.spec.evaluation is None:
            return found
        evaluated = {}
        for t in sorted(found.trained):
            with contextlib.suppress(NotPublished):
                evaluated[t] = self.store.read_json(layout.evaluation(t))
        return Progress(found.generated, found.trained, evaluated)

    def _elapsed(self) -> str:
        seconds = int(time.monotonic() - self.started)
        return f"{seconds // 60}:{seconds % 60:02d}"

    def _run_child(self, argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
        """Run one job in a process group of its own; a failure becomes a SpinError (the job's input: exit code 2)
        or a StepFailed (anything else: exit code 1) carrying the job's own one-line reason."""
        self.console.print(f"[dim]$ {' '.join(argv)}[/dim]")
        with tempfile.TemporaryDirectory(prefix="spin-job-") as tmp:
            error_file = Path(tmp) / "error.json"
            group = ChildGroup.start(self.python)
            try:
                self.child = subprocess.Popen(
                    argv,
                    env={**os.environ, **(env or {}), ERROR_FILE_ENV: str(error_file)},
                    process_group=group.pgid,
                    preexec_fn=_die_with_parent,
                )
                code = self.child.wait()
            except BaseException:  # Ctrl-C or an error here: stop the job cleanly, then let it through
                self._stop(group)
                raise
            finally:
                self.child = None
                group.close()
            failure = _read_error_file(error_file)
        if code == 0:
            return
        message = failure.get("message")
        if failure.get("exitCode") == 2 and message:
            raise SpinError(message)
        reason = f": {message}" if message else "; see its output above"
        artefact = failure.get("artefact")
        hint = repair_hint(self.source, self.store.uri, artefact if isinstance(artefact, str) else None)
        raise StepFailed(f"{what} failed ({describe_exit(code)}){reason}{hint or '; run the same command to retry'}")

    def _stop(self, group: ChildGroup) -> None:
        """Stop the job in flight cleanly (it publishes nothing half-done), then kill it if it lingers."""
        child = self.child
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            if child is None or child.poll() is not None:
                return
            group.signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(wait)

    def explain(self, error: SpinError) -> str:
        """The error's message, plus the command that regenerates a corrupt artefact of this run."""
        if isinstance(error, IntegrityError):
            return str(error) + repair_hint(self.source, self.store.uri, error.uri)
        return str(error)

    def generate(self, spec_file: Path, step: Step) -> None:
        """All missing shards in one `spin generate` process: one engine start, not one per shard (on one
        machine the shards would run one after the other anyway)."""
        n = self.run.spec.generation.shards
        shards = ",".join(map(str, step.shards))
        self.console.rule(
            f"[bold]iteration {step.iteration}/{self.run.spec.iterations}[/bold] · generate shards {shards} of {n}"
            f" · {self._elapsed()}"
        )
        argv = [self.python, "-m", "spin_core", "generate", "--spec", str(spec_file)]
        argv += ["--iteration", str(step.iteration), "--shards", shards]
        self._run_child(argv, f"generation of iteration {step.iteration} (shards {shards})")

    def train(self, spec_file: Path, step: Step) -> None:
        training = self.run.spec.training
        self.console.rule(
            f"[bold]iteration {step.iteration}/{self.run.spec.iterations}[/bold] · train "
            f"({training.processes_per_node} processes) · {self._elapsed()}"
        )
        for lock in clear_stale_build_locks():
            self.console.print(
                f"[yellow]removed a stale build lock {lock}[/yellow] (left by a killed build)", soft_wrap=True
            )
        job = ["-m", "spin_core", "train", "--spec", str(spec_file), "--iteration", str(step.iteration)]
        if training.processes_per_node == 1 and training.nodes == 1:
            argv = [self.python, *job]
        else:
            argv = [self.python, "-m", "torch.distributed.run", "--standalone"]
            argv += [f"--nproc_per_node={training.processes_per_node}", *job]
        threads = max(1, (os.cpu_count() or 1) // training.processes_per_node)
        self._run_child(argv, f"training of iteration {step.iteration}", {"OMP_NUM_THREADS": str(threads)})

    def evaluate(self, spec_file: Path, step: Step) -> None:
        self.console.rule(
            f"[bold]iteration {step.iteration}/{self.run.spec.iterations}[/bold] · evaluate · {self._elapsed()}"
        )
        argv = [self.python, "-m", "spin_core", "evaluate", "--spec", str(spec_file)]
        self._run_child([*argv, "--iteration", str(step.iteration)], f"evaluation of iteration {step.iteration}")

    # -- --redo ------------------------------------------------------------------------------------
    def redo(self, target: RedoTarget, spec_file: Path) -> None:
        """Remove a corrupt (or missing) artefact and run the step that makes it again; an intact one is kept."""
        store, key, t = self.store, target.key, target.iteration
        if target.kind == "run":
            return  # done by claim_storage(rewrite=True)
        if self._intact(target):
            self.console.print(f"[green]{store.uri_of(key)} verifies[/green]: nothing to redo")
            return
        if target.kind in ("metrics", "evaluation"):
            store.backend.delete([key])
        else:
            store.backend.delete([k for k, _ in store.backend.list(key + "/")])
        self.console.print(f"[yellow]removed {store.uri_of(key)}[/yellow] to make it again")
        if target.kind == "shard" and target.shards == self.run.spec.generation.shards:
            self.generate(spec_file, Step("generate", t, (target.shard,)))
        elif target.kind == "checkpoint":
            self.train(spec_file, Step("train", t))
        elif target.kind == "metrics" and store.is_published(layout.checkpoint(t)):
            # The model carries the metrics it was trained with (what `spin train` publishes them from).
            metrics = json.loads((store.fetch(layout.checkpoint(t)) / "spin_metrics.json").read_text())
            store.publish_json(key, metrics)
        elif target.kind == "evaluation" and store.is_published(layout.checkpoint(t)):
            self.evaluate(spec_file, Step("evaluate", t))
        else:
            return  # scratch, or a shard of another shard count: nothing reads it; the plan makes what it needs
        self.steps_run += 1
        if not self._intact(target):
            raise StepFailed(f"redoing {store.uri_of(key)} finished but did not publish it")

    def _intact(self, target: RedoTarget) -> bool:
        store, key = self.store, target.key
        if target.kind in ("shard", "checkpoint"):
            return store.is_published(key) and not check_artefact(store, key)
        if target.kind in ("metrics", "evaluation"):
            return store.exists(key) and check_document(store, key) is None
        states = [k for k, _ in store.backend.list(key + "/")]
        if not states:
            return True
        for state in store.published(key + "/"):
            if check_artefact(store, state):
                return False
        return all(check_document(store, k) is None for k in states if k.endswith("/commit.json"))

    # -- the run -----------------------------------------------------------------------------------
    def execute(self, redo: Sequence[str] = ()) -> Progress:
        """Run steps until the planner says done; returns the final progress. `redo`: keys of artefacts to make
        again first (when corrupt or missing)."""
        if self.run.spec.training.nodes != 1:
            raise SpinError("spec.training.nodes must be 1 for `spin run` (one machine); use the operator for more")
        targets = sorted(
            {t.key: t for t in map(redo_target, redo)}.values(),
            key=lambda t: (t.kind != "run", t.iteration, REDO_ORDER.get(t.kind, 0)),
        )
        progress = self.progress() if not any(t.kind == "evaluation" for t in targets) else self._progress_for_redo()
        if plan(self.run.spec, progress).kind != "done" or targets:
            self.preflight(progress)
        self.claim_storage(progress, rewrite=any(t.kind == "run" for t in targets))
        spec_file = self.resolved_spec_file()
        for target in targets:
            self.redo(target, spec_file)
        progress = self.progress()
        self.check_published(progress)
        while (step := plan(self.run.spec, progress)).kind != "done":
            self.steps_run += 1
            {"generate": self.generate, "train": self.train, "evaluate": self.evaluate}[step.kind](spec_file, step)
            after = self.progress()
            if after == progress:
                raise StepFailed(f"{step.describe(self.run.spec.iterations)} finished but published nothing")
            progress = after
        self.final_step = step
        return progress

    def _progress_for_redo(self) -> Progress:
        """Progress without the evaluation documents (one of them is being redone: it may not read)."""
        found = Progress.from_published(self.store.published(""), self.run.spec.generation.shards)
        return Progress(found.generated, found.trained, {})

    # -- the summary -------------------------------------------------------------------------------
    def summary_table(self, progress: Progress) -> Table:
        short = {
            "loss": "loss",
            "rewards/accuracies": "acc",
            "rewards/margins": "margin",
            "logps/real": "logp real",
            "logps/generated": "logp gen",
        }
        table = Table(
            title=f"SpinRun {self.run.metadata.name} (models under {self.store.uri})",
            caption=self.caption(progress),
            caption_justify="left",
        )
        table.add_column("iter", justify="right")
        table.add_column("pairs", justify="right")
        for header in short.values():
            table.add_column(header, justify="right")
        evaluating = self.run.spec.evaluation is not None
        metric = self.run.spec.evaluation.metric if evaluating else ""
        if evaluating:
            table.add_column(f"eval {metric}" + (" [95 % CI]" if metric == "score" else ""), justify="right")
        table.add_column("model")
        points = {p.iteration: p for p in heldout_points(progress.evaluated)} if evaluating else {}
        if 0 in points:  # the starting model, as its held-out score says it was
            start = format_score(points[0]) if metric == "score" else "-"
            table.add_row("0", "-", *["-"] * len(short), start, self.run.spec.model.uri)
        for t in sorted(progress.trained):
            try:
                final = self.store.read_json(layout.metrics(t)).get("final", {})
            except NotPublished:
                final = {}
            pairs = final.get("pairs/total")
            cells = [f"{final[c]:.3f}" if isinstance(final.get(c), int | float) else "-" for c in short]
            if evaluating and metric == "score" and t in points:
                cells.append(format_score(points[t]))
            elif evaluating:
                value = progress.evaluated.get(t, {}).get(metric)
                cells.append(f"{value:.4f}" if isinstance(value, int | float) else "-")
            table.add_row(str(t), str(int(pairs)) if pairs else "-", *cells, layout.checkpoint(t))
        return table

    def caption(self, progress: Progress) -> str | None:
        """Under the table: the held-out score of the last model against the start's, and the evaluation's
        collapse warnings."""
        points = [p for p in heldout_points(progress.evaluated) if p.score is not None]
        lines = []
        if len(points) > 1 and points[0].iteration == 0:
            first, last = points[0], points[-1]
            line = (
                f"held-out score [95 % CI]: {format_score(first)} at the start -> {format_score(last)} at "
                f"iteration {last.iteration}"
            )
            before = progress.evaluated[1].get("scores_previous")
            after = progress.evaluated[last.iteration].get("scores")
            if isinstance(before, list) and isinstance(after, list) and before and len(before) == len(after):
                change, stderr = paired_change(before, after)
                line += f"; change {change:+.4f} ± {stderr:.4f} (paired SE)"
            lines.append(line)
        lines += [w for t in sorted(progress.evaluated) for w in progress.evaluated[t].get("warnings", [])]
        return "\n".join(lines) or None


def _normalised(document: dict) -> dict:
    """run.json as this version writes it (defaults filled in), so that a field added since is no difference."""
    try:
        return parse(document, layout.RUN).to_document()
    except Exception:  # written by another version: compare as it is
        return document


def _read_error_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_error_file(code: int, message: str, artefact: str | None = None) -> bool:
    """A job's failure for the `spin run` that started it ($SPIN_ERROR_FILE; every rank may write the same), which
    prints it as its own last line; returns whether it was written."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return False
    try:
        tmp = f"{path}.{os.getpid()}"
        Path(tmp).write_text(json.dumps({"exitCode": code, "message": message, "artefact": artefact}))
        os.replace(tmp, path)
    except OSError:
        return False
    return True


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel to SIGTERM the child if `spin run` itself dies (e.g. SIGKILL); its group's janitor ends the
    rest of the job (`procs.ChildGroup`)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def load_run(source: str, endpoint: str | None = None) -> SpinRun:
    """The SpinRun of a file, or of a run's storage URI: its run.json, with the storage being that folder (a run's
    folder may have been moved or copied since run.json was written)."""
    if "://" in source:
        store = Store.open(source, endpoint)
        try:
            document = store.read_json(layout.RUN)
        except NotPublished:
            raise SpinError(f"{source} holds no run (no {layout.RUN}): give the run's storage.uri") from None
        storage = document.setdefault("spec", {}).setdefault("storage", {})
        storage["uri"] = store.uri
        if endpoint:
            storage["endpoint"] = endpoint
        return parse(document, store.uri_of(layout.RUN))
    return RunContext.from_file(source).run


def run(source: str | Path, as_json: bool = False, redo: Sequence[str] = (), endpoint: str | None = None) -> int:
    """Entry point of `spin run`: prints the progress, the summary and one last line (`--json`: a JSON object, on
    failure too); returns the exit code: 0 succeeded, 2 a problem with the input, 1 a failed step, 130 interrupted."""
    source = str(source)
    runner: LocalRunner | None = None

    def finish(code: int, phase: str, message: str) -> int:
        if message:
            print(f"error: {message}" if code != INTERRUPTED else message, file=sys.stderr, flush=True)
        if as_json:
            name = runner.run.metadata.name if runner is not None else None
            print(json.dumps({"run": name, "phase": phase, "exitCode": code, "error": message}), flush=True)
        return code

    try:
        runner = LocalRunner(load_run(source, endpoint), source=source)
        spec = runner.run.spec
        runner.console.print(
            f"SpinRun [bold]{runner.run.metadata.name}[/bold]: {spec.iterations} iterations, "
            f"{spec.generation.shards} generation shard(s) ({spec.generation.backend}), "
            f"{spec.training.processes_per_node} training process(es); artefacts in {runner.store.uri}"
        )
        progress = runner.execute(redo)
        table = runner.summary_table(progress)
    except KeyboardInterrupt:
        return finish(
            INTERRUPTED, "Interrupted", "interrupted: published artefacts are kept; run the same command to continue"
        )
    except SpinError as e:
        message = runner.explain(e) if runner is not None else str(e)
        return finish(e.exit_code, "Failed", message)
    except Exception as e:
        finish(STEP_FAILED, "Failed", f"internal error: {type(e).__name__}: {e}")
        raise
    console = runner.console
    if runner.steps_run == 0:
        console.print("[green]nothing to do[/green]: every iteration of this run is already published")
    console.print(table)
    done = runner.final_step
    final = runner.store.uri_of(layout.checkpoint(done.iteration))
    result = {"run": runner.run.metadata.name, "phase": "Succeeded", "iterations": done.iteration, "model": final}
    text = f"spin run {result['run']}: Succeeded, {done.iteration}/{spec.iterations} iterations, model {final}"
    if done.reason:
        result["stopReason"] = done.reason
        console.print(f"[yellow]stopped early[/yellow]: {done.reason}")
    if (top := best(spec, progress)) is not None:
        result["bestIteration"], result["bestCheckpoint"] = top[0], runner.store.uri_of(layout.checkpoint(top[0]))
        text += f", best iteration {top[0]} ({spec.evaluation.metric} {top[1]:.4f}): {result['bestCheckpoint']}"
    print(json.dumps(result) if as_json else text)
    return 0

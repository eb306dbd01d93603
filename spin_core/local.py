"""`spin run`: execute a SpinRun on one machine with the same entry points the cluster's containers run.

The loop is: ask the planner for the next step given what the store holds, run that step's job(s) as child
processes (`spin generate` per shard; `spin train` under torchrun), repeat. Everything the children publish
is atomic, so a crash, a kill or Ctrl-C at any point loses only the step in flight; running again continues.
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
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from spin_core import layout
from spin_core.context import RunContext
from spin_core.errors import SpinError
from spin_core.planner import Progress, Step, best, plan
from spin_core.spec import SpinRun
from spin_core.stopping import format_score, heldout_points, load_scorer, paired_change
from spin_core.store import AlreadyPublished, NotPublished, Store, cache_dir

# Fields that define what a run *is*: changing them under an existing storage.uri would mix two runs.
FROZEN = ("model", "dataset", "storage")
FROZEN_GENERATION = ("shards", "backend")


@dataclass
class LocalRunner:
    """Runs the plan step by step; children inherit the terminal so their progress bars show."""

    run: SpinRun
    # Not a terminal (CI, a log file): 120 columns rather than rich's 80, so the summary table fits.
    console: Console = field(default_factory=lambda: Console(stderr=True, width=shutil.get_terminal_size((120, 24))[0]))
    python: str = sys.executable

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

    def claim_storage(self) -> None:
        """Publish run.json, or check the existing one describes the same run."""
        document = self.run.to_document()
        try:
            self.store.publish_json(layout.RUN, document)
            return
        except AlreadyPublished:
            pass
        existing = self.store.read_json(layout.RUN)
        old, new = existing.get("spec", {}), document["spec"]
        changed = [f"spec.{k}" for k in FROZEN if old.get(k) != new.get(k)]
        changed += [
            f"spec.generation.{k}"
            for k in FROZEN_GENERATION
            if old.get("generation", {}).get(k) != new["generation"].get(k)
        ]
        if changed:
            raise SpinError(
                f"{self.store.uri_of(layout.RUN)} belongs to a different run ({', '.join(changed)} differ): "
                "use a new spec.storage.uri, or restore the original values"
            )

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
        self.console.print(f"[dim]$ {' '.join(argv)}[/dim]")
        self.child = subprocess.Popen(argv, env={**os.environ, **(env or {})}, preexec_fn=_die_with_parent)
        try:
            code = self.child.wait()
        finally:
            self.child = None
        if code != 0:
            raise SpinError(f"{what} failed (exit code {code}); see its output above. Run `spin run` again to retry")

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

    def execute(self) -> Progress:
        """Run steps until the planner says done; returns the final progress."""
        if self.run.spec.training.nodes != 1:
            raise SpinError("spec.training.nodes must be 1 for `spin run` (one machine); use the operator for more")
        progress = self.progress()
        if plan(self.run.spec, progress).kind != "done":
            self.preflight(progress)
        self.claim_storage()
        spec_file = self.resolved_spec_file()
        while (step := plan(self.run.spec, progress)).kind != "done":
            self.steps_run += 1
            {"generate": self.generate, "train": self.train, "evaluate": self.evaluate}[step.kind](spec_file, step)
            after = self.progress()
            if after == progress:
                raise SpinError(f"{step.describe(self.run.spec.iterations)} finished but published nothing")
            progress = after
        self.final_step = step
        return progress

    def preflight(self, progress: Progress) -> None:
        """Fail before any expensive step when an input is missing (the jobs would fail the same way later)."""
        self.ctx.fetch_dataset()
        if self.run.spec.evaluation is not None:
            self.ctx.heldout_examples()
            if self.run.spec.evaluation.scorer:
                load_scorer(self.run.spec.evaluation.scorer)
        if 1 not in progress.trained:
            self.ctx.fetch_model(1)

    def interrupt(self) -> None:
        """Stop the child in flight cleanly (it publishes nothing half-done), then kill it if it lingers."""
        child = self.child
        if child is None or child.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            child.send_signal(sig)
            try:
                child.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

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


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel to SIGTERM the child if `spin run` itself dies (e.g. SIGKILL): no orphaned jobs."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run(spec_path: Path, as_json: bool = False) -> int:
    """Entry point of `spin run`. Returns the process exit code."""
    runner = LocalRunner(RunContext.from_file(spec_path).run)
    spec = runner.run.spec
    console = runner.console
    console.print(
        f"SpinRun [bold]{runner.run.metadata.name}[/bold]: {spec.iterations} iterations, "
        f"{spec.generation.shards} generation shard(s) ({spec.generation.backend}), "
        f"{spec.training.processes_per_node} training process(es); artefacts in {runner.store.uri}"
    )
    try:
        progress = runner.execute()
    except KeyboardInterrupt:
        runner.interrupt()
        console.print("[yellow]interrupted[/yellow]: published artefacts are kept; run the same command to continue")
        return 130
    except BaseException:
        runner.interrupt()
        raise
    if runner.steps_run == 0:
        console.print("[green]nothing to do[/green]: every iteration of this run is already published")
    console.print(runner.summary_table(progress))
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

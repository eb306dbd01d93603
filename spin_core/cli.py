"""`spin`: the one command users and containers run.

Heavy imports (torch, vLLM, DeepSpeed, kopf) happen inside the subcommands that need them, so
`spin validate` and `spin crd` start in a fraction of a second.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="SPIN (Self-Play Fine-Tuning) of language models: on a Kubernetes cluster or on one machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 1) -> None:
    """Print one clear line to stderr and exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="SpinRun YAML/JSON files (multi-document allowed).")],
) -> None:
    """Check SpinRun files: exit 0 when all are valid, else print one line per problem and exit 1."""
    from spin_core.resource import SpecError, load_all

    bad = 0
    for path in files:
        try:
            runs = load_all(path)
        except SpecError as e:
            bad += 1
            for problem in e.problems:
                typer.echo(f"{path}: {problem}", err=True)
            continue
        for run in runs:
            typer.echo(f"{path}: SpinRun {run.metadata.name!r} is valid ({run.spec.iterations} iterations)")
    raise typer.Exit(1 if bad else 0)


@app.command()
def crd(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to a file instead of stdout.")] = None,
) -> None:
    """Print the SpinRun CustomResourceDefinition generated from the spec models."""
    from spin_core.crd import crd_yaml

    text = crd_yaml()
    if output:
        output.write_text(text)
    else:
        sys.stdout.write(text)


SpecOption = Annotated[Path, typer.Option("--spec", help="The resolved SpinRun (YAML or JSON) this job belongs to.")]
IterationOption = Annotated[int, typer.Option("--iteration", "-t", min=1, help="SPIN iteration, 1-based.")]


def _run_job(fn, *args) -> None:
    """Run a job's library entry point. A SpinError becomes one line on stderr, the same line in the pod's
    termination message (`{"error": "input" | "step", "message": ...}`, which the operator shows: under torchrun the
    container's exit code is torchrun's own 1) and its exit code: 2 for a problem with the input, 1 for a failed
    step; Ctrl-C exits 130. Any other exception is a failed step (exit code 1, with its traceback)."""
    from spin_core.errors import INPUT_ERROR, INTERRUPTED, STEP_FAILED, SpinError
    from spin_core.local import write_error_file
    from spin_core.termination import write_termination_message

    try:
        code = fn(*args)
    except SpinError as e:
        message = str(e)
        kind = "input" if e.exit_code == INPUT_ERROR else "step"
        write_termination_message({"error": kind, "message": message})
        if write_error_file(e.exit_code, message, getattr(e, "uri", None)):  # `spin run` says it, with the step
            raise typer.Exit(e.exit_code) from None
        fail(message, e.exit_code)
    except KeyboardInterrupt:
        fail("interrupted; nothing was published", INTERRUPTED)
    except Exception as e:
        message = f"{type(e).__name__}: {e}".strip().splitlines()[0]
        write_termination_message({"error": "step", "message": message})
        write_error_file(STEP_FAILED, message)
        raise
    raise typer.Exit(code or 0)


@app.command()
def generate(
    spec: SpecOption,
    iteration: IterationOption,
    shard_index: Annotated[
        int | None,
        typer.Option(
            "--shard-index",
            min=0,
            envvar="JOB_COMPLETION_INDEX",
            help="Shard to generate (default: the Indexed Job's index).",
        ),
    ] = None,
    shards: Annotated[
        str | None,
        typer.Option("--shards", help="Comma-separated shards to generate in this process with one engine (e.g. 0,1)."),
    ] = None,
) -> None:
    """Generation job: the model of the iteration answers its shard of the prompts; publishes the shard."""
    from spin_core import generate as job

    indices = None
    if shards:
        try:
            indices = [int(i) for i in shards.split(",")]
        except ValueError:
            fail(f"--shards must be comma-separated shard numbers, got {shards!r}")
    _run_job(job.main, spec, iteration, shard_index, indices)


@app.command()
def train(spec: SpecOption, iteration: IterationOption) -> None:
    """Training job (run under torchrun or a PyTorchJob): trains M_t against M_{t-1}; publishes the checkpoint."""
    from spin_core import train as job
    from spin_core.procs import clear_stale_build_locks

    for lock in clear_stale_build_locks():  # a killed build's lock would make this job wait forever
        typer.echo(f"removed a stale build lock {lock} (left by a killed build)", err=True)
    _run_job(job.main, spec, iteration)


@app.command()
def evaluate(spec: SpecOption, iteration: IterationOption) -> None:
    """Evaluation job: held-out SPIN signal and task score of iteration t's model; publishes iter-<t>/eval.json."""
    from spin_core import evaluate as job

    _run_job(job.main, spec, iteration)


@app.command("run")
def run_command(
    spec: Annotated[
        str, typer.Argument(help="The SpinRun file to execute on this machine, or a run's storage URI (its run.json).")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="End with a JSON object (on failure too).")] = False,
    redo: Annotated[
        list[str] | None,
        typer.Option(
            "--redo",
            help="Make this artefact again first if it is corrupt or missing (e.g. iter-2/generated/shard-0-of-2, "
            "iter-1/checkpoint, iter-1/metrics.json); repeatable.",
        ),
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="S3 endpoint URL to read a run URI's run.json (default: $AWS_ENDPOINT_URL).")
    ] = None,
) -> None:
    """Execute a SpinRun on this machine: generate and train every iteration; rerun to continue after a stop.
    Exit code 0: succeeded; 2: a problem with the input; 1: a failed step; 130: interrupted."""
    from spin_core import local

    raise typer.Exit(local.run(spec, as_json, redo or (), endpoint))


@app.command()
def verify(
    run_uri: Annotated[str, typer.Argument(help="The run's storage.uri (file://... or s3://...).")],
    endpoint: Annotated[str | None, typer.Option(help="S3 endpoint URL (default: AWS or $AWS_ENDPOINT_URL).")] = None,
) -> None:
    """Check every artefact (every file, every byte, against its manifest) and every JSON document (its checksum)
    of a run. Exit code 0: intact; 1: something is corrupt (each problem is named, with the command that
    regenerates it); 2: not a run."""
    from spin_core.store import Store
    from spin_core.verify import report_lines, verify_run

    def go() -> int:
        store = Store.open(run_uri, endpoint)
        lines, intact = report_lines(verify_run(store), store, run_uri)
        for line in lines:
            typer.echo(line)
        return 0 if intact else 1

    _run_job(go)


@app.command()
def report(
    run_uri: Annotated[str, typer.Argument(help="The run's storage.uri (file://... or s3://...).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNG and the Markdown summary.")] = Path("."),
    endpoint: Annotated[str | None, typer.Option(help="S3 endpoint URL (default: AWS or $AWS_ENDPOINT_URL).")] = None,
) -> None:
    """Plot a run's metrics (PNG) and write a Markdown summary next to it."""
    from spin_core.report import write_report

    def go() -> None:
        from spin_core.store import IntegrityError, Store
        from spin_core.verify import repair_hint

        try:
            png, md = write_report(run_uri, out, endpoint)
        except IntegrityError as e:  # an edited metrics.json or eval.json: refuse to show its numbers
            hint = repair_hint(run_uri, Store.open(run_uri, endpoint).uri, e.uri)
            raise IntegrityError(f"{e}: nothing reported{hint}", e.uri) from None
        typer.echo(f"wrote {png} and {md}")

    _run_job(go)


demo_app = typer.Typer(help="The tiny demo: a weak SFT model on two-digit addition.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")


@demo_app.command("prepare")
def demo_prepare(
    out: Annotated[Path, typer.Argument(help="Folder for the dataset and the SFT model (e.g. demo).")],
    sft_steps: Annotated[int, typer.Option(min=0, help="SFT steps: few on purpose, the model must be weak.")] = 600,
    seed: Annotated[int, typer.Option(help="Seed of the data and the model.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Rebuild when the folder already holds a demo.")] = False,
) -> None:
    """Write the demo's SFT dataset, held-out split and weak SFT model (about a minute on CPU)."""
    from spin_core import demo

    def go() -> None:
        summary = demo.prepare(out, sft_steps=sft_steps, seed=seed, overwrite=overwrite)
        typer.echo(
            f"demo ready in {out}: {summary['train']} training rows, {summary['heldout']} held-out; "
            f"SFT model held-out accuracy {summary['heldout_accuracy']:.1%}"
        )

    _run_job(go)


def main() -> None:  # pragma: no cover - console entry point
    app()


@app.command("operator")
def operator_command(
    namespace: Annotated[
        list[str] | None,
        typer.Option("--namespace", "-n", help="Serve SpinRuns in this namespace (repeatable)."),
    ] = None,
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A", help="Serve every namespace.")] = False,
    liveness: Annotated[
        str, typer.Option("--liveness", help="kopf's health endpoint URL; empty disables it.")
    ] = "http://0.0.0.0:8080/healthz",
    peering: Annotated[
        str | None, typer.Option("--peering", help="Coordinate with other operator replicas via this kopf peering.")
    ] = None,
    standalone: Annotated[bool, typer.Option("--standalone", help="No peering: the only replica (default).")] = False,
    priority: Annotated[
        int | None,
        typer.Option(
            "--priority",
            help=(
                "Peering priority (the highest serves; must differ between replicas). "
                "Default: the start time in milliseconds with 3 random digits below."
            ),
        ),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", min=0, max=65535, help="Serve Prometheus metrics on this port.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run the SpinRun operator (kopf): each iteration becomes a generation Job, then a training PyTorchJob."""
    if bool(namespace) == all_namespaces:
        fail("give --namespace/-n (repeatable) or --all-namespaces/-A (one of them)")
    if peering and standalone:
        fail("--peering and --standalone exclude each other")
    from spin_operator import run as run_operator

    run_operator(
        namespaces=namespace or [],
        all_namespaces=all_namespaces,
        liveness=liveness,
        peering=peering,
        metrics_port=metrics_port,
        verbose=verbose,
        priority=priority,
    )

"""Operator reaction latency: from a child reaching its terminal state to the operator creating the next child.

    .venv/bin/python benchmarks/operator_latency.py                          # 1 and 50 concurrent SpinRuns
    .venv/bin/python benchmarks/operator_latency.py --runs-list 1,10,50 --iterations 3 --hold 0.2
    .venv/bin/python benchmarks/operator_latency.py --operator-thread        # the operator in a thread, as in the tests

What runs: the real operator (kopf + spin_operator's handlers, `Config()` with its production defaults), in its own
process (this script with --operator-process, kopf's event loop in its main thread; `--operator-thread`: a thread
of this process instead, as the tests run it), against the emulated Kubernetes API of the operator tests (kmock
over HTTP on 127.0.0.1, with the shims of tests/fixtures/kube.py, in this process), cluster-wide, SpinRuns spread
over two namespaces. Nothing runs pods:
like the tests, this script plays the Job controller and the Kubeflow Training Operator. It reacts to every Job and
PyTorchJob the operator creates (the emulator's create hook), waits `--hold` seconds (so that the operator has
finished the reconciliation that created the child, as it would have while a real child runs for minutes), then
writes the terminal status through the API: a generation Job gets Complete (all indexes succeeded); a training
PyTorchJob gets its Master pod (terminated, with the trainer's summary) and then Succeeded. All runs' children are
completed concurrently, as they appear, so with 50 runs the operator handles 50 at once.

One sample per transition of a run: generation Job i<t>-gen Complete -> PyTorchJob i<t>-train created, and
PyTorchJob i<t>-train Succeeded -> Job i<t+1>-gen created (2 x iterations - 1 samples per run). A sample is

    (the API server's receive time of the operator's POST of the next child)
  - (the time the benchmark's terminal status write completed: its PATCH .../status returned)

both read from time.monotonic() in this process (the API server logs every request with it, `KubeAPI.log`), so the
operator's clock plays no part. It
therefore covers the watch event's delivery, kopf's queueing, the operator's wake-up and reconciliation (planner,
status bookkeeping) and its create request, on the emulated API server. It does not include a real API server's
latencies (etcd, admission, a network hop) nor the time a real Job controller takes to write the status. A
scenario with fewer than `--min-samples` samples is repeated (fresh SpinRuns, one batch after the other, same
concurrency) until it has enough.

Checked while measuring (the script fails, exit status 1, otherwise): every SpinRun ends in phase Succeeded with
progress N/N and every iteration record Succeeded; the operator POSTed each child (and each spec ConfigMap) exactly
once and deleted nothing; exactly the expected Jobs and PyTorchJobs exist; no child was POSTed before its
predecessor's terminal status write reached the API server; every scenario finished within `--timeout`. Missing the
latency target does not fail the script: its line says ok=no.

Output: a table, then one line per scenario for scripts, e.g.

    RESULT runs=50 samples=250 p50_ms=257.0 p95_ms=557.5 max_ms=1073.8 min_ms=24.7 target_p95_ms=1000 ok=yes
        reconcile_errors=0 reconciles=669 operator_cpu_s=2.68 operator_cpu_ms_per_sample=10.7 api_cpu_s=5.22
        load1=2.27 operator=process iterations=3 hold_s=0.2   (one line)

The table adds the p95 of each transition kind, the operator's reconciliations (count, mean wall time), its
event-loop CPU per reconciliation, its own API requests per sample, and CPU seconds: the operator's event-loop
thread (all the operator's Python work: watch streams, kopf's handling, Events, reconciliations), the API server +
driver (this process; with --operator-thread, this thread), and the operator's other threads (kopf's executor).

Caveats: with 2 CPUs and other jobs running, the operator and the emulator compete for cores (the load average is
printed; compare CPU seconds and reconciliation counts rather than latencies between runs). The emulator costs about
twice the operator's CPU, far more than a real API server would spend per request. With --operator-thread the
operator also shares the GIL and the garbage collector (whose passes over the emulator's objects are then charged
to whichever thread triggers them) with the emulator, which inflates its latencies at 50 runs. The operator runs
with the test fixture's kopf settings (`operator_settings()`: shorter idle/exit timeouts; kopf 1.45 ignores the
batch window, time-based batching was removed).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `tests` (the emulated API server)
sys.path.insert(1, str(ROOT / "operator"))  # spin_operator, when the package is not installed
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPIN_RECORD_API", "0")
warnings.filterwarnings("ignore", category=DeprecationWarning)

import kmock  # noqa: E402

from tests.fixtures.kube import (  # noqa: E402
    JOBS,
    PYTORCHJOBS,
    SPINRUNS,
    FakeCluster,
    KubeAPI,
    operator_settings,
    serve_kube,
    start_operator,
)

NAMESPACES = ("default", "team-a")
OPERATOR_AGENT = "spin-operator"
RUN_LABEL = "selfplay.dev/run"
TARGET_P95 = 1.0


# -- SpinRuns (as tests/test_operator.py builds them) ----------------------------------------------------------------
def spinrun(name: str, iterations: int) -> dict[str, Any]:
    return {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SpinRun",
        "metadata": {"name": name, "labels": {"team": "nlp"}},
        "spec": {
            "model": {"uri": "s3://models/zephyr-sft"},
            "dataset": {"uri": "s3://data/ultrachat.jsonl"},
            "storage": {"uri": f"s3://runs/{name}"},
            "iterations": iterations,
            "generation": {"shards": 1, "gpusPerShard": 0},
            "training": {"nodes": 1, "processesPerNode": 1, "gpusPerNode": 0, "globalBatchSize": 8},
        },
    }


async def create(api: KubeAPI, body: dict[str, Any], namespace: str) -> dict[str, Any]:
    return await api.call("POST", f"/apis/selfplay.dev/v1alpha1/namespaces/{namespace}/spinruns", body)


def raw(api: KubeAPI, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
    """The stored object itself (no copy: the caller only reads it)."""
    key = (kmock.resource(resource), namespace, name)
    if key not in api.objects or api.objects[key].deleted:
        return None
    return api.objects[key].raw


def phase_of(api: KubeAPI, namespace: str, name: str) -> str | None:
    return ((raw(api, SPINRUNS, namespace, name) or {}).get("status") or {}).get("phase")


# -- the fake cluster: finishes every child `hold` seconds after the operator created it ------------------------------
class Driver:
    def __init__(self, api: KubeAPI, hold: float):
        self.fake = FakeCluster(api)
        self.hold = hold
        self.finished: dict[tuple[str, str], float] = {}
        """(namespace, child) -> monotonic time its terminal status write returned."""
        self.errors: list[str] = []
        self.tasks: set[asyncio.Task[None]] = set()
        api.created.append(self._on_create)

    def _on_create(self, resource: str, obj: dict[str, Any]) -> None:
        if resource not in (JOBS, PYTORCHJOBS) or RUN_LABEL not in (obj.get("metadata", {}).get("labels") or {}):
            return
        task = asyncio.get_running_loop().create_task(self._finish(resource, obj["metadata"]))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _finish(self, resource: str, meta: dict[str, Any]) -> None:
        namespace, name = meta["namespace"], meta["name"]
        try:
            await asyncio.sleep(self.hold)
            if resource == JOBS:
                await self.fake.complete_job(namespace, name)
            else:
                summary = {"metrics": {"loss": 0.5, "rewards/accuracy": 0.75}, "checkpoint": None}
                await self.fake.succeed_pytorchjob(namespace, name, summary)
            self.finished[namespace, name] = time.monotonic()
        except Exception as e:
            self.errors.append(f"finishing {resource} {namespace}/{name}: {e!r}")

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


# -- the operator under test: its own process (default), or a thread of this one ------------------------------------
def counter_value(counter: Any) -> float:
    return float(counter._value.get())


def thread_cpu(thread: Any) -> float:
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (AttributeError, OSError, TypeError):
        return math.nan


def operator_counters(operator_thread: Any) -> dict[str, float]:
    """The operator's cumulative figures, read in its own process: CPU seconds of its event-loop thread and of its
    other threads (kopf's executor), and its reconciliation metrics."""
    from spin_operator import metrics

    loop_cpu = thread_cpu(operator_thread)
    return {
        "operator": loop_cpu,
        "process": time.process_time(),
        "reconciles": counter_value(metrics.RECONCILES),
        "reconcile_errors": counter_value(metrics.RECONCILE_ERRORS),
        "reconcile_seconds": float(metrics.RECONCILE_SECONDS._sum.get()),
    }


class ProcessOperator:
    """The operator in a child process (this script with --operator-process): kopf's event loop in its main thread,
    its own interpreter and GIL, as on a cluster where the API server is another program. Commands go over its stdin
    (`stats`, `stop`; end of input stops it too), answers come back over its stdout as JSON lines; its logs go to
    stderr."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    @classmethod
    async def start(cls, verbose: bool, timeout: float = 60.0) -> ProcessOperator:
        command = [sys.executable, str(Path(__file__).resolve()), "--operator-process"] + (["-v"] if verbose else [])
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        op = cls(proc)
        try:
            answer = await op._read(timeout)
        except BaseException:
            await op.stop()
            raise
        if not answer.get("ready"):
            await op.stop()
            raise RuntimeError(f"the operator process did not start: {answer}")
        return op

    async def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"the operator process exited (status {await self.proc.wait()})")
        return json.loads(line)

    async def stats(self) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stats\n")
        await self.proc.stdin.drain()
        return await self._read(30.0)

    def check(self) -> None:
        if self.proc.returncode is not None:
            raise RuntimeError(f"the operator process died (status {self.proc.returncode})")

    async def stop(self, timeout: float = 30.0) -> None:
        if self.proc.returncode is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write(b"stop\n")
                await self.proc.stdin.drain()
                self.proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass
        try:
            status = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise RuntimeError("the operator process did not stop: killed") from None
        if status != 0:
            raise RuntimeError(f"the operator process exited with status {status}")


class ThreadOperator:
    """The operator in a thread of this process (--operator-thread: the tests' `start_operator`), sharing the GIL,
    and the garbage collector's work, with the emulated API server."""

    def __init__(self, op: Any):
        self.op = op

    @classmethod
    async def start(cls) -> ThreadOperator:
        from spin_operator.config import Config

        return cls(await start_operator(namespaces=NAMESPACES, config=Config(), clusterwide=True))

    async def stats(self) -> dict[str, float]:
        counters = operator_counters(self.op.thread)
        # The other threads: not this one (it serves the API and drives the children), nor the operator's loop.
        counters["process"] -= time.thread_time() + counters["operator"]
        return counters

    def check(self) -> None:
        if self.op.error is not None or not self.op.thread.is_alive():
            raise RuntimeError(f"the operator died: {self.op.error!r}")

    async def stop(self) -> None:
        await self.op.stop()


def operator_process(verbose: bool) -> int:
    """The child's side of ProcessOperator: the operator as `start_operator` runs it (same kopf settings, Config()
    with production defaults, cluster-wide), against $KUBECONFIG (set by the parent's `serve_kube`)."""
    import kopf
    import spin_operator.handlers  # noqa: F401  (registers the handlers)
    from spin_operator.config import Config
    from spin_operator.controller import Controller

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    stop_flag, ready = threading.Event(), threading.Event()
    main = threading.current_thread()
    lock = threading.Lock()

    def say(answer: dict[str, Any]) -> None:
        with lock:
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()

    def commands() -> None:
        ready.wait()
        say({"ready": not stop_flag.is_set()})
        for line in sys.stdin:
            if line.strip() == "stats":
                counters = operator_counters(main)
                counters["process"] -= counters["operator"]
                say(counters)
            elif line.strip() == "stop":
                break
        stop_flag.set()  # on `stop`, and when the parent goes away (end of input)

    threading.Thread(target=commands, name="commands", daemon=True).start()
    try:
        asyncio.run(
            kopf.operator(
                registry=kopf.get_default_registry(),
                settings=operator_settings(),
                namespaces=[],
                clusterwide=True,
                standalone=True,
                stop_flag=stop_flag,
                ready_flag=ready,
                memo=kopf.Memo(spin=Controller(Config())),
            )
        )
    finally:
        stop_flag.set()
        ready.set()
    return 0


# -- one scenario ----------------------------------------------------------------------------------------------------
@dataclass
class Result:
    runs: int
    batches: int
    samples: dict[str, list[float]] = field(default_factory=lambda: {"gen->train": [], "train->gen": []})
    wall: float = 0.0
    reconciles: int = 0
    reconcile_errors: int = 0
    reconcile_seconds: float = 0.0
    """Wall time of all reconciliations (the operator's histogram sum)."""
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds: the operator's event-loop thread, the API server + driver, the operator's other threads."""
    operator_requests: int = 0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def all(self) -> list[float]:
        return sorted(self.samples["gen->train"] + self.samples["train->gen"])


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def scenario(args: argparse.Namespace, runs: int, tmp: Path) -> Result:
    iterations, hold, timeout = args.iterations, args.hold, args.timeout
    per_batch = runs * (2 * iterations - 1)
    result = Result(runs=runs, batches=max(1, math.ceil(args.min_samples / per_batch)))
    result.load_before = os.getloadavg()
    problems: list[str] = []
    # The API server's and the driver's CPU: this process (with the operator in its own), or this thread.
    api_cpu = time.thread_time if args.operator_thread else time.process_time
    async with serve_kube(tmp, NAMESPACES) as api:
        driver = Driver(api, hold)
        op: ProcessOperator | ThreadOperator
        op = await (ThreadOperator.start() if args.operator_thread else ProcessOperator.start(args.verbose))
        names: list[tuple[str, str]] = []
        stats0, api0 = await op.stats(), api_cpu()
        started = time.monotonic()
        try:
            for batch in range(result.batches):
                wave = [(NAMESPACES[i % 2], f"r{runs}-b{batch}-{i:02d}") for i in range(runs)]
                names += wave
                await asyncio.gather(*(create(api, spinrun(name, iterations), ns) for ns, name in wave))
                pending = set(wave)
                while pending:
                    if driver.errors:
                        raise RuntimeError("; ".join(driver.errors[:3]))
                    op.check()
                    if time.monotonic() - started > timeout:
                        raise TimeoutError(
                            f"{runs} runs: {len(pending)} not Succeeded after {timeout:.0f}s, e.g. "
                            + ", ".join(f"{ns}/{n}: {phase_of(api, ns, n)}" for ns, n in sorted(pending)[:3])
                        )
                    pending = {(ns, n) for ns, n in pending if phase_of(api, ns, n) != "Succeeded"}
                    await asyncio.sleep(0.2)
            result.wall = time.monotonic() - started
            stats1, api1 = await op.stats(), api_cpu()
            result.cpu = {
                "operator": stats1["operator"] - stats0["operator"],
                "api": api1 - api0,
                "other": stats1["process"] - stats0["process"],
            }
            await asyncio.sleep(0.5)  # let trailing requests (events, status) land before the checks
            stats2 = await op.stats()
        finally:
            await driver.close()
            await op.stop()
        result.load_after = os.getloadavg()
        result.reconciles = int(stats2["reconciles"] - stats0["reconciles"])
        result.reconcile_errors = int(stats2["reconcile_errors"] - stats0["reconcile_errors"])
        result.reconcile_seconds = stats2["reconcile_seconds"] - stats0["reconcile_seconds"]

        # The operator's requests, by the API server's log: creations (receive time) and deletions.
        posts: dict[tuple[str, str], list[float]] = {}
        patches: dict[tuple[str, str], float] = {}
        for at, request in api.log:
            agent = request.headers.get("User-Agent", "")
            plural = request.resource.plural if request.resource is not None else None
            if agent.startswith(OPERATOR_AGENT):
                result.operator_requests += 1
                if request.method == "POST" and isinstance(request.data, dict):
                    name = (request.data.get("metadata") or {}).get("name")
                    posts.setdefault((request.namespace or "", f"{plural}/{name}"), []).append(at)
                elif request.method == "DELETE":
                    problems.append(f"the operator deleted {plural}/{request.name} in {request.namespace}")
            elif request.method == "PATCH" and request.subresource == "status" and plural in ("jobs", "pytorchjobs"):
                patches[request.namespace or "", request.name or ""] = at
        dup = [f"{ns}/{what} x{len(times)}" for (ns, what), times in posts.items() if len(times) > 1]
        if dup:
            problems.append("children created more than once: " + ", ".join(sorted(dup)[:5]))

        for ns, name in names:
            status = (raw(api, SPINRUNS, ns, name) or {}).get("status") or {}
            if status.get("phase") != "Succeeded" or status.get("progress") != f"{iterations}/{iterations}":
                problems.append(f"{ns}/{name}: phase {status.get('phase')}, progress {status.get('progress')}")
            records = status.get("iterations") or []
            if [r.get("phase") for r in records] != ["Succeeded"] * iterations:
                problems.append(f"{ns}/{name}: iteration records {[r.get('phase') for r in records]}")
            if f"configmaps/{name}-spec" not in {w for (n, w) in posts if n == ns}:
                problems.append(f"{ns}/{name}: no spec ConfigMap created")
            chain = [
                child
                for t in range(1, iterations + 1)
                for child in ((JOBS, f"{name}-i{t}-gen"), (PYTORCHJOBS, f"{name}-i{t}-train"))
            ]
            for (_, before), (resource, after) in itertools.pairwise(chain):
                created = posts.get((ns, f"{resource.rsplit('/', 1)[1]}/{after}"))
                done = driver.finished.get((ns, before))
                if not created or done is None:
                    problems.append(f"{ns}/{name}: {before} -> {after}: not observed")
                    continue
                if created[0] < patches.get((ns, before), math.inf):
                    problems.append(f"{ns}/{name}: {after} created before {before} finished")
                kind = "gen->train" if resource == PYTORCHJOBS else "train->gen"
                result.samples[kind].append(created[0] - done)
        for resource, plural in ((JOBS, "jobs"), (PYTORCHJOBS, "pytorchjobs")):
            for ns in NAMESPACES:
                want = sorted(w.split("/", 1)[1] for (n, w) in posts if n == ns and w.startswith(plural + "/"))
                expected = sorted(
                    f"{name}-i{t}-{'gen' if plural == 'jobs' else 'train'}"
                    for n, name in names
                    if n == ns
                    for t in range(1, iterations + 1)
                )
                if api.names(resource, ns) != expected or want != expected:
                    problems.append(f"{ns}: {plural} are {api.names(resource, ns)[:4]}..., expected {expected[:4]}...")
    if problems:
        raise AssertionError(f"{runs} concurrent runs: " + "; ".join(problems[:10]))
    return result


# -- output ----------------------------------------------------------------------------------------------------------
def ms(value: float) -> str:
    return f"{value * 1000:.1f}"


def report(results: list[Result], args: argparse.Namespace) -> None:
    print()
    where = "a thread of the API server's process" if args.operator_thread else "its own process"
    print(
        f"Operator reaction: child terminal status written -> next child POSTed (emulated API server, operator in "
        f"{where}, {args.iterations} iterations per run, hold {args.hold:g} s, {os.cpu_count()} CPUs)"
    )
    header = (
        f"{'runs':>5} {'samples':>8} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'gen>train p95':>14} "
        f"{'train>gen p95':>14} {'reconciles':>10} {'ms/rec':>6} {'op CPU ms/rec':>13} {'req/sample':>10} "
        f"{'wall s':>7} {'CPU s op/api/other':>18} {'load 1m before/after':>21}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        values = r.all
        print(
            f"{r.runs:>5} {len(values):>8} {ms(percentile(values, 0.5)):>8} {ms(percentile(values, 0.95)):>8} "
            f"{ms(max(values)):>8} {ms(percentile(r.samples['gen->train'], 0.95)):>14} "
            f"{ms(percentile(r.samples['train->gen'], 0.95)):>14} {r.reconciles:>10} "
            f"{ms(r.reconcile_seconds / max(1, r.reconciles)):>6} "
            f"{ms(r.cpu.get('operator', math.nan) / max(1, r.reconciles)):>13} "
            f"{r.operator_requests / len(values):>10.1f} {r.wall:>7.1f} "
            f"{'/'.join(f'{r.cpu.get(k, math.nan):.1f}' for k in ('operator', 'api', 'other')):>18} "
            f"{f'{r.load_before[0]:.2f} / {r.load_after[0]:.2f}':>21}"
        )
    print(
        "ms/rec: mean wall time of one reconciliation; op CPU ms/rec: the operator's event-loop CPU (all of it: watch"
        " streams, kopf's handling, Events, reconciliations) per reconciliation; req/sample: the operator's own API"
        " requests per sample (kopf's watches and Events not counted); CPU s: the operator's event-loop thread / the"
        f" API server and driver ({'this thread' if args.operator_thread else 'this process'}) / the operator's"
        " other threads (kopf's executor), over the scenario"
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"target: p95 < {TARGET_P95 * 1000:.0f} ms; load average (1, 5, 15 min) at the end: {load}")
    print()
    for r in results:
        values = r.all
        p95 = percentile(values, 0.95)
        print(
            f"RESULT runs={r.runs} samples={len(values)} p50_ms={ms(percentile(values, 0.5))} p95_ms={ms(p95)} "
            f"max_ms={ms(max(values))} min_ms={ms(min(values))} target_p95_ms={TARGET_P95 * 1000:.0f} "
            f"ok={'yes' if p95 < TARGET_P95 else 'no'} reconcile_errors={r.reconcile_errors} "
            f"reconciles={r.reconciles} operator_cpu_s={r.cpu.get('operator', math.nan):.2f} "
            f"operator_cpu_ms_per_sample={ms(r.cpu.get('operator', math.nan) / len(values))} "
            f"api_cpu_s={r.cpu.get('api', math.nan):.2f} load1={r.load_after[0]:.2f} "
            f"operator={'thread' if args.operator_thread else 'process'} iterations={args.iterations} "
            f"hold_s={args.hold:g}"
        )


async def main_async(args: argparse.Namespace) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="spin-operator-latency-") as tmp:
        for i, runs in enumerate(args.runs_list):
            where = Path(tmp) / f"scenario-{i}"
            where.mkdir()
            print(f"scenario: {runs} concurrent SpinRun(s), load average {os.getloadavg()}", flush=True)
            results.append(await scenario(args, runs, where))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--runs-list", default="1,50", help="concurrent SpinRuns per scenario, comma-separated")
    parser.add_argument("--iterations", type=int, default=3, help="SPIN iterations per run (2 x N - 1 samples)")
    parser.add_argument("--hold", type=float, default=0.2, help="seconds a child 'runs' before it is finished")
    parser.add_argument("--min-samples", type=int, default=20, help="repeat a scenario until it has this many")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a scenario may take before it fails")
    parser.add_argument(
        "--operator-thread",
        action="store_true",
        help="run the operator in a thread of this process (as the tests do) instead of its own process",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="the operator's and kopf's INFO logs")
    parser.add_argument("--operator-process", action="store_true", help=argparse.SUPPRESS)  # the child's side
    args = parser.parse_args()
    if args.operator_process:
        return operator_process(args.verbose)
    args.runs_list = [int(x) for x in args.runs_list.split(",") if x.strip()]
    if not args.runs_list or min(args.runs_list) < 1 or args.iterations < 1:
        parser.error("--runs-list needs positive integers and --iterations at least 1")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("kopf._core.reactor.running").setLevel(logging.ERROR)  # "OS signals are ignored": a thread
    try:
        results = asyncio.run(main_async(args))
    except (AssertionError, TimeoutError, RuntimeError) as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Operator reaction latency: from a child reaching its terminal state to the operator creating the next child.

    .venv/bin/python benchmarks/operator_latency.py              # 1 and 50 concurrent SpinRuns, kmock and real
    .venv/bin/python benchmarks/operator_latency.py --api kmock --runs-list 1,10,50 --iterations 3 --hold 0.2
    .venv/bin/python benchmarks/operator_latency.py --api kmock --operator-thread   # in a thread, as in the tests

Each scenario runs against two API servers, side by side in one invocation (`--api kmock,real`, the default):
`kmock`, the emulator described next, and `real`, the test suite's control plane (below).

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

`--api real`: the same operator process, the same SpinRuns (their children run the stub image of the tests,
tests/cluster/stub/: a `spin` and a `torchrun` that do no work), against the control plane of tests/cluster (built
once from Go modules and cached, like the tests'; about 40 s to start): real kube-apiserver and etcd, the Job
controller and the Kubeflow Training Operator write the children's statuses, the scheduler and the stand-in kubelet
run their pods. The operator runs as the chart's ServiceAccount (the chart installed with helm, cluster-wide, its
own Deployment scaled to 0), so RBAC judges every request. The children end when their pods do (a second or so;
many at once but not in the same instant, unlike kmock's driver), and the samples come from the API server's audit
log, on its clock: (receipt of the operator's POST of the next child) - (receipt of the controller's status write
that made the child done: a PyTorchJob Succeeded, a generation Job with every index completed). The second end is
the write's receipt, not its response: the commit to etcd and the watch event's delivery are part of the reaction,
and the operator can act on the watch event before the write's response is complete (`status_write_p50_ms` is how
long the API server took to answer those writes). Checked as for kmock, from the audit log (children created once,
nothing deleted), plus `conflicts`, the operator's requests answered 409. CPU: `api` is kube-apiserver + etcd,
`cluster_cpu_s` the controllers, scheduler and kubelet with the pods it ran. The SpinRuns are deleted after each
scenario.

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
    async def start(cls, verbose: bool, timeout: float = 60.0, kubeconfig: Path | None = None) -> ProcessOperator:
        command = [sys.executable, str(Path(__file__).resolve()), "--operator-process"] + (["-v"] if verbose else [])
        env = {**os.environ, **({"KUBECONFIG": str(kubeconfig)} if kubeconfig else {})}
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
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
    api: str = "kmock"
    samples: dict[str, list[float]] = field(default_factory=lambda: {"gen->train": [], "train->gen": []})
    wall: float = 0.0
    reconciles: int = 0
    reconcile_errors: int = 0
    reconcile_seconds: float = 0.0
    """Wall time of all reconciliations (the operator's histogram sum)."""
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds: the operator's event-loop thread, the API server + driver, the operator's other threads."""
    operator_requests: int = 0
    conflicts: int = 0
    """The operator's requests answered 409 (real API server only: the emulator never answers 409)."""
    write_seconds: list[float] = field(default_factory=list)
    """Real API server: how long it took to answer the terminal status writes (received -> response complete)."""
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def operator_stats(self, before: dict[str, float], after: dict[str, float]) -> None:
        """The operator's reconciliation counters over the scenario (its stats before and after), and the load."""
        self.load_after = os.getloadavg()
        self.reconciles = int(after["reconciles"] - before["reconciles"])
        self.reconcile_errors = int(after["reconcile_errors"] - before["reconcile_errors"])
        self.reconcile_seconds = after["reconcile_seconds"] - before["reconcile_seconds"]

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
    """One scenario on the emulated API server (kmock)."""
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
        result.operator_stats(stats0, stats2)

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


# -- the same on the real control plane (tests/cluster: kube-apiserver, etcd, controllers, the Training Operator) ---
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        # The children's status writes by their controllers (the terminal one starts a sample), with the object.
        {
            "level": "RequestResponse",
            "verbs": ["update", "patch"],
            "resources": [
                {"group": "batch", "resources": ["jobs/status"]},
                {"group": "kubeflow.org", "resources": ["pytorchjobs/status"]},
            ],
        },
        # Every request of the operator (its creations end the samples).
        {"level": "Metadata", "users": ["system:serviceaccount:spin-system:spin-operator"]},
        {"level": "None"},
    ],
}
OPERATOR_USER = "system:serviceaccount:spin-system:spin-operator"
CHILDREN = ("jobs", "pytorchjobs", "configmaps")


def terminal(resource: str, obj: dict[str, Any]) -> bool:
    """Whether a status write made the child done as the operator sees it: a PyTorchJob Succeeded; a generation Job
    with every index completed (the Job controller's `Complete` comes later, once the pods are gone: the operator
    starts training on the completed shards already)."""
    from spin_operator.observe import parse_indexes

    status = obj.get("status") or {}
    done = {c.get("type") for c in status.get("conditions") or [] if c.get("status") == "True"}
    if resource == "pytorchjobs":
        return "Succeeded" in done
    completions = (obj.get("spec") or {}).get("completions") or 1
    return "Complete" in done or parse_indexes(status.get("completedIndexes")) >= set(range(completions))


def audit_time(stamp: str) -> float:
    """An audit event's RFC 3339 timestamp (microseconds), as seconds since the epoch."""
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class RealApi:
    """The test suite's control plane (tests/cluster/controlplane.py, binaries built once, cached) with an audit log,
    the stand-in kubelet running the children's pods with the stub image (tests/cluster/stub/: `spin` and `torchrun`
    that do no work), and the chart's ServiceAccount and cluster-wide RBAC for the operator (the chart installed with
    helm, its own operator Deployment scaled to 0: the benchmark runs the operator itself)."""

    def __init__(self, workdir: Path):
        from tests.cluster import build
        from tests.cluster.controlplane import NodeSpec
        from tests.fixtures.cluster import Cluster, default_images

        build.check_go()
        for target in build.DEFAULT_TARGETS:
            build.build(target, log=lambda _m: None)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.audit_log = workdir / "audit.log"
        policy = workdir / "audit-policy.json"
        policy.write_text(json.dumps(AUDIT_POLICY))
        audit = [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}", "--audit-log-format=json"]
        nodes = [NodeSpec("node-1", pods=5000)]
        self.cluster = Cluster(workdir / "cluster", nodes=nodes, images=default_images(), apiserver_args=audit)
        self.kubeconfig = workdir / "operator.kubeconfig"

    def start(self) -> None:
        from tests.cluster.api import Credentials
        from tests.e2e import CHART

        cluster = self.cluster
        cluster.start()
        api = cluster.api
        for ns in NAMESPACES:
            if api.find(f"/api/v1/namespaces/{ns}") is None:
                api.create("/api/v1/namespaces", {"metadata": {"name": ns}})
        cluster.helm("install", "spin-operator", str(CHART), "-n", "spin-system", "--create-namespace")
        for ns in NAMESPACES:  # the new CRD's watch cache answers 429 while it initializes
            api.wait_for(
                "SpinRuns to be served", lambda ns=ns: api.get(f"/apis/selfplay.dev/v1alpha1/namespaces/{ns}/spinruns")
            )
        deployment = "/apis/apps/v1/namespaces/spin-system/deployments/spin-operator"
        api.patch(deployment, {"spec": {"replicas": 0}})
        api.wait_for("the chart's operator pod to be gone",
                     lambda: not api.get("/api/v1/namespaces/spin-system/pods")["items"], timeout=120)  # fmt: skip
        token = api.create(
            "/api/v1/namespaces/spin-system/serviceaccounts/spin-operator/token",
            {"spec": {"expirationSeconds": 86400}},
        )["status"]["token"]
        Credentials(cluster.server, cluster.ca_file, token=token).kubeconfig(self.kubeconfig, "spin-operator")

    def stop(self) -> None:
        self.cluster.stop()

    def audit_offset(self) -> int:
        return self.audit_log.stat().st_size if self.audit_log.exists() else 0

    def audit_events(self, offset: int) -> list[dict[str, Any]]:
        with self.audit_log.open("rb") as f:
            f.seek(offset)
            return [json.loads(line) for line in f.read().splitlines() if line.strip()]

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far: kube-apiserver + etcd ("api"), and the controllers, scheduler and kubelet with the
        pods it ran ("cluster")."""
        import psutil

        out = {"api": 0.0, "cluster": 0.0}
        for name, component in self.cluster.components.items():
            try:
                t = psutil.Process(component.process.pid).cpu_times()
            except psutil.Error:
                continue
            out["api" if name in ("kube-apiserver", "etcd") else "cluster"] += (
                t.user + t.system + t.children_user + t.children_system
            )
        return out

    def delete_runs(self) -> None:
        """Delete the scenario's SpinRuns (their children go with them) so the next scenario starts clean."""
        api = self.cluster.api
        for ns in NAMESPACES:
            api.request("DELETE", f"/apis/selfplay.dev/v1alpha1/namespaces/{ns}/spinruns")
        api.wait_for(
            "the SpinRuns to be deleted",
            lambda: not any(api.get(f"/apis/selfplay.dev/v1alpha1/namespaces/{ns}/spinruns")["items"]
                            for ns in NAMESPACES),
            timeout=300,
        )  # fmt: skip


async def scenario_real(args: argparse.Namespace, runs: int, real: RealApi) -> Result:
    """One scenario on the real control plane: the same SpinRuns, the same operator process; the children run for
    real (the Job controller and the Training Operator write their statuses), each sample read from the audit log."""
    from tests.control_plane import stub_spinrun

    iterations, timeout = args.iterations, args.timeout
    per_batch = runs * (2 * iterations - 1)
    result = Result(runs=runs, batches=max(1, math.ceil(args.min_samples / per_batch)), api="real")
    result.load_before = os.getloadavg()
    problems: list[str] = []
    api = real.cluster.api
    offset = real.audit_offset()
    op = await ProcessOperator.start(args.verbose, kubeconfig=real.kubeconfig)
    names: list[tuple[str, str]] = []
    stats0, cpu0 = await op.stats(), real.cpu()
    started = time.monotonic()

    def phases() -> dict[tuple[str, str], str | None]:
        out = {}
        for ns in NAMESPACES:
            for o in api.get(f"/apis/selfplay.dev/v1alpha1/namespaces/{ns}/spinruns")["items"]:
                out[ns, o["metadata"]["name"]] = (o.get("status") or {}).get("phase")
        return out

    def message(namespace: str, name: str) -> str:
        run = api.find(f"/apis/selfplay.dev/v1alpha1/namespaces/{namespace}/spinruns/{name}") or {}
        return str((run.get("status") or {}).get("message"))

    try:
        for batch in range(result.batches):
            wave = [(NAMESPACES[i % 2], f"r{runs}-b{batch}-{i:02d}") for i in range(runs)]
            names += wave
            bodies = [stub_spinrun(name, ns, iterations=iterations) for ns, name in wave]
            for body in bodies:
                body["metadata"]["labels"] = {"team": "nlp"}
            await asyncio.gather(
                *(asyncio.to_thread(api.create, f"/apis/selfplay.dev/v1alpha1/namespaces/{b['metadata']['namespace']}"
                                    "/spinruns", b) for b in bodies)
            )  # fmt: skip
            pending = set(wave)
            while pending:
                op.check()
                found = await asyncio.to_thread(phases)
                failed = [f"{ns}/{n}" for (ns, n) in pending if found.get((ns, n)) == "Failed"]
                if failed:
                    raise RuntimeError(f"{runs} runs on the real API server: Failed: {', '.join(failed[:3])}")
                if time.monotonic() - started > timeout:
                    raise TimeoutError(
                        f"{runs} runs (real API server): {len(pending)} not Succeeded after {timeout:.0f}s, e.g. "
                        + "; ".join(f"{ns}/{n}: {message(ns, n)}" for ns, n in sorted(pending)[:3])
                    )
                pending = {key for key in pending if found.get(key) != "Succeeded"}
                await asyncio.sleep(0.5)
        result.wall = time.monotonic() - started
        stats1, cpu1 = await op.stats(), real.cpu()
        result.cpu = {
            "operator": stats1["operator"] - stats0["operator"],
            "api": cpu1["api"] - cpu0["api"],
            "cluster": cpu1["cluster"] - cpu0["cluster"],
            "other": stats1["process"] - stats0["process"],
        }
        await asyncio.sleep(1.0)  # trailing requests (events, status) reach the audit log
        stats2 = await op.stats()
    finally:
        await op.stop()
    result.operator_stats(stats0, stats2)

    # The audit log: the operator's creations (receive time), the controllers' terminal status writes (completion).
    posts: dict[tuple[str, str], list[float]] = {}
    finished: dict[tuple[str, str], float] = {}
    for event in real.audit_events(offset):
        if event.get("stage") != "ResponseComplete":
            continue
        ref, code = event.get("objectRef") or {}, (event.get("responseStatus") or {}).get("code", 0)
        key = (ref.get("namespace") or "", f"{ref.get('resource')}/{ref.get('name')}")
        if event["user"]["username"] == OPERATOR_USER:
            if event.get("userAgent", "").startswith(OPERATOR_AGENT):  # its own client; not kopf's watches, Events
                result.operator_requests += 1
            if event["verb"] == "create" and ref.get("resource") in CHILDREN and code < 300:
                posts.setdefault(key, []).append(audit_time(event["requestReceivedTimestamp"]))
            elif code == 409:
                result.conflicts += 1
            if event["verb"] == "delete":
                problems.append(f"the operator deleted {key[1]} in {key[0]}")
        elif (
            ref.get("subresource") == "status"
            and code < 300
            and key not in finished
            and terminal(ref.get("resource", ""), event.get("responseObject") or {})
        ):
            # From its receipt: the commit to etcd and the watch event's delivery are part of the reaction; a
            # write's response can complete after the operator already acted on its watch event.
            finished[key] = audit_time(event["requestReceivedTimestamp"])
            result.write_seconds.append(audit_time(event["stageTimestamp"]) - finished[key])
    dup = [f"{ns}/{what} x{len(times)}" for (ns, what), times in posts.items() if len(times) > 1]
    if dup:
        problems.append("children created more than once: " + ", ".join(sorted(dup)[:5]))
    for ns, name in names:
        status = (api.find(f"/apis/selfplay.dev/v1alpha1/namespaces/{ns}/spinruns/{name}") or {}).get("status") or {}
        if status.get("phase") != "Succeeded" or status.get("progress") != f"{iterations}/{iterations}":
            problems.append(f"{ns}/{name}: phase {status.get('phase')}, progress {status.get('progress')}")
        chain = [
            child
            for t in range(1, iterations + 1)
            for child in (("jobs", f"{name}-i{t}-gen"), ("pytorchjobs", f"{name}-i{t}-train"))
        ]
        for (before_kind, before), (kind, after) in itertools.pairwise(chain):
            created = posts.get((ns, f"{kind}/{after}"))
            done = finished.get((ns, f"{before_kind}/{before}"))
            if not created or done is None:
                problems.append(f"{ns}/{name}: {before} -> {after}: not observed")
                continue
            if created[0] < done:
                problems.append(f"{ns}/{name}: {after} created before {before} finished")
            result.samples["gen->train" if kind == "pytorchjobs" else "train->gen"].append(created[0] - done)
    real.delete_runs()
    if problems:
        raise AssertionError(f"{runs} concurrent runs (real API server): " + "; ".join(problems[:10]))
    return result


# -- output ----------------------------------------------------------------------------------------------------------
def ms(value: float) -> str:
    return f"{value * 1000:.1f}"


def report(results: list[Result], args: argparse.Namespace) -> None:
    print()
    where = "a thread of the API server's process" if args.operator_thread else "its own process"
    print(
        f"Operator reaction: child terminal status written -> next child POSTed (operator in {where}, "
        f"{args.iterations} iterations per run, {os.cpu_count()} CPUs; kmock: the emulated API server, children "
        f"finished by this script {args.hold:g} s after creation; real: the test control plane, children finished "
        "by the Job controller and the Training Operator, times from its audit log)"
    )
    header = (
        f"{'API':>5} {'runs':>5} {'samples':>8} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'gen>train p95':>14} "
        f"{'train>gen p95':>14} {'reconciles':>10} {'ms/rec':>6} {'op CPU ms/rec':>13} {'req/sample':>10} "
        f"{'wall s':>7} {'CPU s op/api/other':>18} {'load 1m before/after':>21}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        values = r.all
        print(
            f"{r.api:>5} {r.runs:>5} {len(values):>8} {ms(percentile(values, 0.5)):>8} "
            f"{ms(percentile(values, 0.95)):>8} {ms(max(values)):>8} "
            f"{ms(percentile(r.samples['gen->train'], 0.95)):>14} "
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
        f" API server (kmock: with the driver, {'this thread' if args.operator_thread else 'this process'}; real:"
        " kube-apiserver + etcd) / the operator's other threads (kopf's executor), over the scenario"
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
            f"api_cpu_s={r.cpu.get('api', math.nan):.2f} load1={r.load_after[0]:.2f} api={r.api} "
            f"conflicts={r.conflicts if r.api == 'real' else 'n/a'} cluster_cpu_s={r.cpu.get('cluster', math.nan):.2f} "
            f"status_write_p50_ms={ms(percentile(r.write_seconds, 0.5))} "
            f"operator={'thread' if args.operator_thread else 'process'} iterations={args.iterations} "
            f"hold_s={args.hold:g}"
        )


async def main_async(args: argparse.Namespace) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="spin-operator-latency-") as tmp:
        real: RealApi | None = None
        try:
            for i, runs in enumerate(args.runs_list):
                for api in args.apis:
                    print(f"scenario: {runs} concurrent SpinRun(s), {api} API server, load average "
                          f"{os.getloadavg()}", flush=True)  # fmt: skip
                    if api == "kmock":
                        where = Path(tmp) / f"scenario-{i}"
                        where.mkdir()
                        results.append(await scenario(args, runs, where))
                        continue
                    if real is None:
                        real = RealApi(Path(tmp) / "real")
                        await asyncio.to_thread(real.start)
                    results.append(await scenario_real(args, runs, real))
        finally:
            if real is not None:
                real.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--runs-list", default="1,50", help="concurrent SpinRuns per scenario, comma-separated")
    parser.add_argument(
        "--api",
        default="kmock,real",
        help="API servers, comma-separated: kmock (the emulator), real (the test control plane of tests/cluster)",
    )
    parser.add_argument("--iterations", type=int, default=3, help="SPIN iterations per run (2 x N - 1 samples)")
    parser.add_argument(
        "--hold", type=float, default=0.2, help="seconds a child 'runs' before it is finished (kmock only)"
    )
    parser.add_argument("--min-samples", type=int, default=20, help="repeat a scenario until it has this many")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a scenario may take before it fails")
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
    args.apis = [x.strip() for x in args.api.split(",") if x.strip()]
    if not args.apis or set(args.apis) - {"kmock", "real"}:
        parser.error("--api takes kmock, real or both")
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

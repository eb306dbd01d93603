"""The reconciler: one SpinRun at a time, driven by the shared planner and the children's states.

Every watch event of a SpinRun or of one of its children *wakes* the run; wakes are coalesced and a run is never
reconciled twice at once. A reconciliation reads the run and its children from kopf's in-memory indexes (filled by
the watches, complete before the first handler runs), asks `spin_core.planner.plan` for the next step, acts on it
(create, suspend, resume, recreate, nothing) and writes the status. Nothing sleeps or polls: the only timers are
a retry's back-off and a long safety-net resync.

The status is the durable state (iteration records, retry counters, the trainer's summaries); the ConfigMap
`<run>-spec` holds the last accepted spec. A restarted operator reads both back and adopts the children it
finds by their deterministic names.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from spin_core import layout
from spin_core.planner import Progress, Step, best, plan
from spin_core.resource import SpecError, parse, plain
from spin_core.spec import SpinRun
from spin_operator import changes, children, metrics, policy
from spin_operator import status as st_
from spin_operator.config import Config
from spin_operator.kube import CONFIGMAPS, PODS, PYTORCHJOBS, SPINRUNS, TRAINJOBS, ApiError, Kube
from spin_operator.observe import Child, children_of, input_error, pod_problem, pods_of, termination_summary

logger = logging.getLogger("spin_operator")

Key = tuple[str, str]
STEP_WORD = {"generate": "generation", "train": "training", "evaluate": "evaluation"}
JOB_FIELD = {"generate": "generationJob", "train": "trainingJob", "evaluate": "evaluationJob"}
FAILURE_REASON = {"generate": "GenerationFailed", "train": "TrainingFailed", "evaluate": "EvaluationFailed"}
CHILD_FAILURE_REASONS = (*FAILURE_REASON.values(), "InvalidInput")
NOT_BUILT_IN = {
    PYTORCHJOBS: "install the Kubeflow Training Operator (v1)",
    TRAINJOBS: "install Kubeflow Trainer v2, or leave spec.training.runtime empty to use PyTorchJobs",
}


class Blocked(Exception):
    """The run cannot proceed until something outside the operator changes (reported in the status)."""


@dataclass
class RunState:
    """What the operator knows about one run beyond the watch: the status it wrote, the accepted spec, and
    "expectations" covering the short gap between its own writes and the watch events that reflect them."""

    uid: str | None
    written: dict[str, Any]
    status: dict[str, Any]
    accepted: SpinRun | None = None
    accepted_loaded: bool = False
    configmap_hash: str | None = None
    configmap_run: SpinRun | None = None
    """The accepted SpinRun object whose hash `configmap_hash` was last checked against (models are never mutated:
    a new spec is a new object), so that an unchanged spec is not hashed again on every pass."""
    created: dict[str, dict[str, Any]] = field(default_factory=dict)
    suspend_sent: dict[str, bool] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    failure_notes: dict[str, tuple[str, bool]] = field(default_factory=dict)
    pod_problems: dict[str, tuple[str, str]] = field(default_factory=dict)
    """What each stuck pod of the run waits for, as last seen (see observe.pod_problem)."""
    stuck: tuple[str, str] | None = None
    """The current child's stuck pod, found by this reconciliation: (reason, message) for the Degraded condition."""
    reported: set[str] = field(default_factory=set)
    error_backoff: float = 0.0
    seen: tuple[Any, ...] | None = None
    """What of the SpinRun the last reconciliation read, besides its status (see `_fingerprint`); a copy."""
    woken_at: float | None = None
    """When the wake that started the current reconciliation arrived (monotonic clock)."""
    parsed: tuple[tuple[Any, ...], SpinRun | SpecError] | None = None
    """The last `_parse_run` result and what it was parsed from: the spec is validated again only when it changes."""


def _first(store: Any) -> dict[str, Any] | None:
    if store is None:
        return None
    for value in store:
        return value
    return None


def _parse_run(body: Mapping[str, Any]) -> SpinRun | SpecError:
    """The SpinRun as the pods will see it: metadata reduced to name, namespace and labels."""
    meta = body.get("metadata") or {}
    document = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in ("name", "namespace", "labels") if k in meta},
        "spec": body.get("spec"),
    }
    try:
        return parse(document, f"SpinRun {meta.get('namespace')}/{meta.get('name')}")
    except SpecError as e:
        return e


def _fingerprint(body: Mapping[str, Any], copy: bool = False) -> tuple[Any, ...]:
    """Everything of a SpinRun a reconciliation depends on, except its status. Without `copy` it refers to the
    body's own parts (enough to compare it with a stored fingerprint); with it, they are copied (to store it)."""
    meta = body.get("metadata") or {}
    labels, spec = _raw(meta.get("labels") or {}), _raw(body.get("spec"))
    return (
        meta.get("uid"),
        meta.get("generation"),
        meta.get("deletionTimestamp"),
        st_.clone(labels) if copy else labels,
        st_.clone(spec) if copy else spec,
    )


_JSON_TYPES = (dict, list, str, int, float, bool, type(None))


def _raw(value: Any) -> Any:
    """A part of a body as the JSON parser made it: kopf hands handlers views (Mappings) of a raw dict, whose own
    values are plain dicts, lists and scalars already; only a view itself needs converting."""
    return value if type(value) in _JSON_TYPES else plain(value)


def checkpoint_uri(run: SpinRun, t: int) -> str:
    return f"{run.spec.storage.uri.rstrip('/')}/{layout.checkpoint(t)}"


class Controller:
    """All SpinRuns one operator process serves."""

    def __init__(self, config: Config | None = None, kube: Kube | None = None, metrics_port: int | None = None):
        self.config = config or Config.from_env()
        self.kube = kube or Kube()
        self.metrics_port = metrics_port
        self.metrics_runner: Any = None
        self.states: dict[Key, RunState] = {}
        self.spinruns: Mapping[Key, Any] = {}
        self.jobs: Mapping[Key, Any] = {}
        self.pytorchjobs: Mapping[Key, Any] = {}
        self.pods: Mapping[Key, Any] = {}
        self.trainjobs: Mapping[Key, Any] = {}
        self._context: contextvars.Context | None = None
        self._dirty: set[Key] = set()
        self._woken: dict[Key, float] = {}
        """When each dirty run was first woken (monotonic clock): the start of the reaction the metric measures."""
        self._workers: dict[Key, asyncio.Task[None]] = {}
        self._timers: dict[Key, tuple[float, asyncio.TimerHandle]] = {}
        self._resync: asyncio.Task[None] | None = None
        self._phases_changed = True
        """Some run's phase changed (or a run appeared) since the runs-by-phase gauge was last set."""

    # -- wiring -------------------------------------------------------------------------------------------------
    def bind(
        self,
        spinruns: Mapping[Key, Any],
        jobs: Mapping[Key, Any],
        pytorchjobs: Mapping[Key, Any],
        pods: Mapping[Key, Any] | None = None,
        trainjobs: Mapping[Key, Any] | None = None,
    ) -> None:
        """Take kopf's live indexes, and the handler context kopf's event posting needs, from a handler call."""
        self.spinruns, self.jobs, self.pytorchjobs = spinruns, jobs, pytorchjobs
        self.pods = pods if pods is not None else {}
        self.trainjobs = trainjobs if trainjobs is not None else {}
        if self._context is None:
            self._context = contextvars.copy_context()

    async def start(self) -> None:
        if self.metrics_port is not None:
            self.metrics_runner, self.metrics_port = await metrics.serve(self.metrics_port)
        self._resync = asyncio.create_task(self._resync_forever(), name="spin-operator resync")

    async def stop(self) -> None:
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        tasks = [t for t in [self._resync, *self._workers.values()] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._workers.clear()
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
            self.metrics_runner = None
        await self.kube.close()

    # -- waking -------------------------------------------------------------------------------------------------
    def wake(self, key: Key) -> None:
        """Ask for a reconciliation of the run; bursts of wakes collapse into one pass (plus one after it)."""
        self._dirty.add(key)
        self._woken.setdefault(key, time.monotonic())
        worker = self._workers.get(key)
        if worker is None or worker.done():
            context = self._context.copy() if self._context is not None else None
            self._workers[key] = asyncio.get_running_loop().create_task(
                self._work(key), name=f"reconcile {key[0]}/{key[1]}", context=context
            )

    def spinrun_changed(self, key: Key, body: Mapping[str, Any]) -> None:
        """A watch event of the SpinRun itself: wake the run, unless the event only echoes the operator's own
        status write (same spec, metadata and status as the last reconciliation read and wrote). Without this,
        every status patch came back as an event and cost one more full reconciliation."""
        state = self.states.get(key)
        if (
            state is not None
            and state.seen == _fingerprint(body)
            and _raw(body.get("status") or {}) == state.written
            and key not in self._dirty
        ):
            return
        self.wake(key)

    def child_changed(self, key: Key, body: Mapping[str, Any]) -> None:
        """A watch event of a child: wake its run, unless the event only announces a child this operator has just
        created and that shows nothing new yet (same status as the creation's response, not being deleted): that
        event cost a full reconciliation per step, in the middle of the burst of steps that end together."""
        state = self.states.get(key)
        if state is not None and key not in self._dirty:
            meta = body.get("metadata") or {}
            created = state.created.get(meta.get("name"))
            if (
                created is not None
                and not meta.get("deletionTimestamp")
                and _raw(body.get("status") or {}) == (created.get("status") or {})
            ):
                return
        self.wake(key)

    def pod_changed(self, key: Key, body: Mapping[str, Any]) -> None:
        """A watch event of a child's pod: wake the run only when what the pod is stuck on (or that it is stuck)
        changed; pods report progress often, and the children's own events carry everything else."""
        state = self.states.get(key)
        name = (body.get("metadata") or {}).get("name", "")
        problem = pod_problem(body)
        if state is not None:
            if state.pod_problems.get(name) == problem:
                return
            if problem is None:
                state.pod_problems.pop(name, None)
            else:
                state.pod_problems[name] = problem
        self.wake(key)

    def wake_later(self, key: Key, delay: float) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, delay)
        current = self._timers.get(key)
        if current is not None and current[0] <= when and not current[1].cancelled():
            return
        if current is not None:
            current[1].cancel()
        self._timers[key] = (when, loop.call_at(when, self._timer_fired, key))

    def _timer_fired(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.wake(key)

    def forget(self, key: Key) -> None:
        self.states.pop(key, None)
        self._dirty.discard(key)
        self._woken.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer[1].cancel()
        metrics.set_phases(s.status.get("phase") for s in self.states.values())

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.resync_interval)
            for key in list(self.spinruns.keys()):
                self.wake(key)

    async def _work(self, key: Key) -> None:
        while key in self._dirty:
            self._dirty.discard(key)
            woken = self._woken.pop(key, None)
            state = self.states.get(key)
            if state is not None:
                state.woken_at = woken
            started = time.perf_counter()
            metrics.RECONCILES.inc()
            try:
                await self.reconcile(key)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                await self._failed_reconcile(key, e)
            finally:
                metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)

    async def _failed_reconcile(self, key: Key, error: Exception) -> None:
        metrics.RECONCILE_ERRORS.inc()
        state = self.states.get(key)
        body = _first(self.spinruns.get(key))
        delay = self.config.error_backoff
        if state is not None:
            delay = state.error_backoff = min(max(state.error_backoff * 2, self.config.error_backoff), 300.0)
        if isinstance(error, ApiError | Blocked):
            logger.warning("[%s/%s] reconcile failed, retrying in %.0fs: %s", *key, delay, error)
        else:
            logger.exception("[%s/%s] reconcile failed, retrying in %.0fs", *key, delay)
        if body is not None and state is not None:
            message = str(error)
            if f"error:{message}" not in state.reported:
                state.reported.add(f"error:{message}")
                kopf.exception(children.owner(body), reason="ReconcileError", message="", exc=error)
            st_.set_condition(state.status.setdefault("conditions", []), "Degraded", True, "ReconcileError", message)
            state.status["message"] = message
            try:
                await self._write(key, state)
            except Exception as e:  # the API is down: the retry will try again
                logger.debug("[%s/%s] could not record the error in the status: %s", *key, e)
        self.wake_later(key, delay)

    # -- reconciliation -----------------------------------------------------------------------------------------
    async def reconcile(self, key: Key) -> None:
        namespace, name = key
        body = _first(self.spinruns.get(key))
        if body is None:
            self.forget(key)
            return
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            self.forget(key)  # its children go with it (owner references); nothing new is created
            return
        uid = meta.get("uid")
        state = self.states.get(key)
        if state is None or state.uid != uid:
            status = st_.clone(_raw(body.get("status") or {}))
            state = self.states[key] = RunState(uid=uid, written=st_.clone(status), status=status)
            self._phases_changed = True
        if state.seen != _fingerprint(body):
            state.seen = _fingerprint(body, copy=True)
        status = state.status
        state.stuck = None
        conditions = status.setdefault("conditions", [])
        generation = meta.get("generation")
        if generation is not None:
            status["observedGeneration"] = generation
        owner = children.owner(body)

        # 1. The spec: validate (once per distinct spec and labels), and compare with the last accepted one.
        source = (body.get("apiVersion"), body.get("kind"), meta.get("name"), meta.get("namespace"), state.seen)
        if state.parsed is not None and state.parsed[0] == source:
            current = state.parsed[1]
        else:
            current = _parse_run(body)
            if not isinstance(current, SpecError) and (denied := policy.violations(current, self.config)):
                current = SpecError(f"SpinRun {namespace}/{name}", denied)
            state.parsed = (source, current)
        if state.accepted is None and state.written and not state.accepted_loaded:
            state.accepted_loaded = True
            await self._load_accepted(state, namespace, name)
        rejected: tuple[str, str] | None = None
        if isinstance(current, SpecError):
            message = "invalid spec: " + "; ".join(current.problems)
            if state.accepted is None:
                self._set_phase(state, owner, "Failed", message, failure=("InvalidSpec", message), warn=True)
                st_.set_condition(conditions, "SpecAccepted", False, "InvalidSpec", message, generation)
                await self._finish(key, state)
                return
            rejected = ("InvalidSpec", message)
        elif state.accepted is None:
            state.accepted = current
        elif current is not state.accepted and changes.changed_fields(state.accepted.spec, current.spec):
            problems = changes.unsafe_changes(state.accepted.spec, current.spec, self._started(status))
            if problems:
                rejected = ("UnsafeSpecChange", "; ".join(problems) + ": revert the spec, or create a new SpinRun")
            else:
                fields = ", ".join(f"spec.{f}" for f in changes.changed_fields(state.accepted.spec, current.spec))
                kopf.info(owner, reason="SpecChanged", message=f"applied: {fields}")
                state.accepted = current
        if rejected:
            st_.set_condition(conditions, "SpecAccepted", False, rejected[0], rejected[1], generation)
            if f"rejected:{generation}" not in state.reported:
                state.reported.add(f"rejected:{generation}")
                kopf.warn(owner, reason="SpecRejected", message=rejected[1])
        else:
            st_.set_condition(conditions, "SpecAccepted", True, "Accepted", "the spec is in effect", generation)
        run = state.accepted
        assert run is not None

        # A run that failed for good (a child out of retries) stays failed; its children stay for inspection.
        failed = st_.condition(conditions, "Failed")
        if status.get("phase") == "Failed" and failed and failed.get("reason") in CHILD_FAILURE_REASONS:
            await self._finish(key, state)
            return

        # 2. The spec ConfigMap the pods mount.
        await self._ensure_configmap(state, run, body)

        # 3. What is done: the status records, updated from the children.
        kids = self._children(key, state)
        current_child = {
            (t, step): self._current(state, kids, t, step) for t, step in {(c.iteration, c.step) for c in kids}
        }
        for _, child in sorted(current_child.items()):
            if child is not None:
                self._observe(state, run, owner, child)
        for (t, step_kind), child in current_child.items():
            if child is not None and step_kind == "evaluate" and child.phase == "Succeeded":
                await self._read_evaluation(state, t, child)
        progress = self._progress(run, status, current_child)
        step = plan(run.spec, progress)
        self._best(state, run, progress)

        # 4. Act on the next step.
        if step.kind == "done":
            if step.reason:
                status["stopReason"] = step.reason
                message = f"stopped after iteration {step.iteration}/{run.spec.iterations}: {step.reason}"
            else:
                status.pop("stopReason", None)
                message = f"{run.spec.iterations} iterations trained"
            self._set_phase(state, owner, "Succeeded", message, last=step.iteration)
        else:
            await self._advance(key, state, run, body, step, current_child)

        # 5. The trainer's summaries (after acting: reading a pod must not delay the next child).
        for (t, step_kind), child in current_child.items():
            if child is not None and step_kind == "train" and child.phase == "Succeeded":
                await self._read_summary(state, run, t, child)
        trained = [r["iteration"] for r in status.get("iterations") or [] if r.get("phase") == "Succeeded"]
        if trained:
            latest = st_.find_record(status, max(trained))
            status["latestCheckpoint"] = (latest or {}).get("checkpoint") or checkpoint_uri(run, max(trained))
        await self._cleanup_attempts(state, kids, current_child)
        await self._finish(key, state)

    async def _finish(self, key: Key, state: RunState) -> None:
        self._conditions(state)
        await self._write(key, state)
        state.error_backoff = 0.0

    # -- the pieces ---------------------------------------------------------------------------------------------
    def _started(self, status: dict[str, Any]) -> int:
        """The highest iteration that has a child (0: none started)."""
        started = [
            r.get("iteration", 0)
            for r in status.get("iterations") or []
            if r.get("generationJob") or r.get("trainingJob") or r.get("phase") == "Succeeded"
        ]
        return max(started, default=0)

    async def _load_accepted(self, state: RunState, namespace: str, name: str) -> None:
        """After a restart: the last accepted spec is what the ConfigMap holds (if it belongs to this run)."""
        try:
            cm = await self.kube.get(CONFIGMAPS, namespace, children.configmap_name(name))
        except ApiError as e:
            if e.status == 404:
                return
            raise
        owners = [r.get("uid") for r in cm.get("metadata", {}).get("ownerReferences") or []]
        if state.uid and owners and state.uid not in owners:
            return
        try:
            accepted = parse(json.loads((cm.get("data") or {}).get(children.SPEC_FILE, "")))
        except (ValueError, SpecError):
            return
        state.accepted = accepted
        state.configmap_hash = children.spec_hash(accepted)

    async def _ensure_configmap(self, state: RunState, run: SpinRun, body: dict[str, Any]) -> None:
        if run is state.configmap_run and state.configmap_hash is not None:
            return  # the same accepted spec as on the last pass, whose ConfigMap was found up to date
        want = children.spec_hash(run)
        if state.configmap_hash == want:
            state.configmap_run = run
            return
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        obj = children.configmap(run, body)
        if state.configmap_hash is None:
            try:
                await self.kube.create(CONFIGMAPS, namespace, obj)
                state.configmap_hash, state.configmap_run = want, run
                return
            except ApiError as e:
                if e.status != 409:
                    raise
            existing = await self.kube.get(CONFIGMAPS, namespace, obj["metadata"]["name"])
            same = (existing.get("data") or {}).get(children.SPEC_FILE) == obj["data"][children.SPEC_FILE]
            owners = [r.get("uid") for r in existing.get("metadata", {}).get("ownerReferences") or []]
            if state.uid not in owners:
                # Never take over an object this run did not create: it may be someone's (and would be garbage
                # collected with the run), or a same-named predecessor's, which the garbage collector removes.
                raise Blocked(
                    f"ConfigMap {obj['metadata']['name']} exists and does not belong to this SpinRun (owners: "
                    f"{owners or 'none'}): delete or rename it; the run starts once the name is free"
                )
            if same:
                state.configmap_hash, state.configmap_run = want, run
                return
        await self.kube.patch(
            CONFIGMAPS,
            namespace,
            obj["metadata"]["name"],
            {
                "metadata": {k: obj["metadata"][k] for k in ("labels", "annotations", "ownerReferences")},
                "data": obj["data"],
            },
        )
        if state.configmap_hash is not None:
            logger.info("[%s/%s] spec ConfigMap updated", namespace, name)
        state.configmap_hash, state.configmap_run = want, run

    def _children(self, key: Key, state: RunState) -> list[Child]:
        jobs = [b for b in self.jobs.get(key, ()) or ()]
        training = [b for index in (self.pytorchjobs, self.trainjobs) for b in index.get(key, ()) or ()]
        seen = {b.get("metadata", {}).get("name") for b in jobs + training}
        for created in list(state.created):
            if created in seen:
                del state.created[created]  # the watch has caught up
        for body in state.created.values():
            (jobs if body.get("kind") == "Job" else training).append(body)
        state.deleted &= seen
        kids = children_of(state.uid, jobs, training)
        return [c for c in kids if c.name not in state.deleted]

    def _current(self, state: RunState, kids: list[Child], t: int, step: children.Step) -> Child | None:
        """The child of the current attempt of (iteration, step)."""
        rec = st_.find_record(state.status, t) or {}
        attempt = max([rec.get(f"{step}Retries", 0)] + [c.attempt for c in kids if (c.iteration, c.step) == (t, step)])
        return next((c for c in kids if (c.iteration, c.step, c.attempt) == (t, step, attempt)), None)

    def _observe(self, state: RunState, run: SpinRun, owner: dict[str, Any], child: Child) -> None:
        """Copy what a child shows into its iteration's record; report the step's completion once."""
        status = state.status
        rec = st_.record(status, child.iteration)
        shards = run.spec.generation.shards
        if child.step == "generate":
            rec["generationJob"] = child.name
            rec["shards"] = shards
            done = shards if child.phase == "Succeeded" else len([i for i in child.completed if i < shards])
            if rec.get("shardsDone", 0) < shards:
                rec["shardsDone"] = done
            if child.phase == "Succeeded" and f"done:{child.name}" not in state.reported:
                state.reported.add(f"done:{child.name}")
                rec.pop("message", None)
                self._step_seconds("generate", rec.get("startedAt"), child.finished_at)
                if rec.get("phase") in (None, "Pending", "Generating"):
                    kopf.info(
                        owner,
                        reason="GenerationComplete",
                        message=f"iteration {child.iteration}: {shards}/{shards} shards generated by Job {child.name}",
                    )
        elif child.step == "evaluate":
            rec["evaluationJob"] = child.name
        else:
            rec["trainingJob"] = child.name
            if child.restarted_at and child.restarted_at != rec.get("trainingRestartedAt") and child.active:
                # Its pods were recreated in place (a rank killed by a signal: preemption, node loss, OOM).
                rec["trainingRestartedAt"] = child.restarted_at
                rec["trainingRestarts"] = rec.get("trainingRestarts", 0) + 1
            if child.phase == "Succeeded" and rec.get("phase") != "Succeeded":
                rec["phase"] = "Succeeded"
                rec["finishedAt"] = child.finished_at or st_.now()
                rec.setdefault("checkpoint", checkpoint_uri(run, child.iteration))
                rec.pop("message", None)
                self._step_seconds("train", rec.get("trainingStartedAt"), child.finished_at)
                kopf.info(
                    owner,
                    reason="TrainingComplete",
                    message=f"iteration {child.iteration}: PyTorchJob {child.name} succeeded",
                )

    def _step_seconds(self, step: str, start: str | None, end: str | None) -> None:
        a, b = st_.parse_time(start), st_.parse_time(end)
        if a and b and b >= a:
            metrics.STEP_SECONDS.labels(step=step).observe((b - a).total_seconds())

    def _progress(self, run: SpinRun, status: dict[str, Any], current: dict[tuple[int, str], Child | None]) -> Progress:
        shards = run.spec.generation.shards
        generated: dict[int, set[int]] = {}
        trained: set[int] = set()
        evaluated: dict[int, dict[str, Any]] = {}
        for rec in status.get("iterations") or []:
            t = rec.get("iteration", 0)
            if rec.get("phase") == "Succeeded":
                trained.add(t)
            if isinstance(rec.get("evaluation"), dict):
                evaluated[t] = rec["evaluation"]
            if rec.get("shards") == shards and rec.get("shardsDone", 0) >= shards:
                generated[t] = set(range(shards))
        for (t, step), child in current.items():
            if child is None:
                continue
            if step == "generate":
                done = set(range(shards)) if child.phase == "Succeeded" else set(child.completed)
                generated.setdefault(t, set()).update(i for i in done if i < shards)
            elif step == "train" and child.phase == "Succeeded":
                trained.add(t)
        return Progress({t: frozenset(s) for t, s in generated.items()}, frozenset(trained), evaluated)

    async def _advance(
        self,
        key: Key,
        state: RunState,
        run: SpinRun,
        body: dict[str, Any],
        step: Step,
        current: dict[tuple[int, str], Child | None],
    ) -> None:
        owner = children.owner(body)
        t, kind = step.iteration, step.kind
        assert kind in ("generate", "train", "evaluate")
        rec = st_.record(state.status, t)
        if kind == "evaluate":
            phase = "Evaluating"  # the record keeps Succeeded: its model is trained
        else:
            phase = rec["phase"] = "Generating" if kind == "generate" else "Training"
            rec["shards"] = run.spec.generation.shards
            rec.setdefault("startedAt", st_.now())
        child = current.get((t, kind))
        n = run.spec.iterations
        word = STEP_WORD[kind]
        what = children.kind_of(run, kind).kind
        state.status["iteration"] = t
        state.status["progress"] = f"{t}/{n}"

        if run.spec.suspend:
            if child is not None and child.active and not child.suspended:
                await self._suspend(state, body, child, True)
            if child is not None and child.active:
                message = f"iteration {t}/{n}: {word} suspended ({what} {child.name})"
            else:
                message = f"iteration {t}/{n}: suspended before {word}"
            if kind != "evaluate":
                rec["phase"] = "Suspended"
            self._set_phase(state, owner, "Suspended", message)
            return

        if child is not None and child.active and child.suspended:
            if not child.suspended_by_operator:
                # Held by another controller (Kueue: until the workload is admitted): never resumed here.
                self._set_phase(
                    state,
                    owner,
                    phase,
                    f"iteration {t}/{n}: {word} waiting for admission ({what} {child.name} is held suspended by "
                    "another controller, e.g. a Kueue queue)",
                )
                return
            await self._suspend(state, body, child, False)

        if child is None:
            attempt = rec.get(f"{kind}Retries", 0)
            await self._create(state, run, body, t, kind, attempt)
            child_name = children.child_name(run.metadata.name, t, kind, attempt)
            self._set_phase(state, owner, phase, f"iteration {t}/{n}: {word} ({what} {child_name} created)")
            return

        restarts = rec.get("trainingRestarts", 0) if kind == "train" else 0
        if child.active and restarts > run.spec.training.backoff_limit:
            # restartPolicy ExitCode restarts signal-killed pods without a limit of its own: a crash that repeats
            # (an OOM kill) would loop forever. Past training.backoffLimit it counts as a failed attempt.
            child = dataclasses.replace(
                child,
                phase="Failed",
                finished_at=child.restarted_at,
                message=f"its pods restarted {restarts} times (killed by a signal, exit code >= 128: preemption, "
                f"node loss or out of memory), more than training.backoffLimit {run.spec.training.backoff_limit}",
            )
        if child.phase == "Failed":
            await self._failed_child(key, state, run, body, child, current)
            return

        if kind == "generate":
            detail = f"{rec.get('shardsDone', 0)}/{rec['shards']} shards generated"
        else:
            detail = child.message or child.phase.lower()
        stuck = [p for p in map(pod_problem, pods_of(child, self.pods.get(key, ()) or ())) if p is not None]
        if stuck:
            state.stuck = min(stuck)  # the same one on every pass
            detail = f"{detail}; {state.stuck[0]}: {state.stuck[1]}"
        self._set_phase(state, owner, phase, f"iteration {t}/{n}: {word} ({what} {child.name}: {detail})")

    async def _suspend(self, state: RunState, body: dict[str, Any], child: Child, suspend: bool) -> None:
        if state.suspend_sent.get(child.name) == suspend:
            return
        namespace = body["metadata"]["namespace"]
        try:
            await self.kube.patch(
                children.KINDS[child.kind],
                namespace,
                child.name,
                children.suspend_patch(children.KINDS[child.kind], suspend),
            )
        except ApiError as e:
            if e.status != 404:
                raise
        state.suspend_sent[child.name] = suspend
        verb = "Suspended" if suspend else "Resumed"
        kopf.info(children.owner(body), reason=verb, message=f"{verb.lower()} {child.step} child {child.name}")

    async def _create(
        self,
        state: RunState,
        run: SpinRun,
        body: dict[str, Any],
        t: int,
        step: children.Step,
        attempt: int,
    ) -> None:
        namespace = body["metadata"]["namespace"]
        obj = children.build(run, step, body, t, attempt, self.config)
        name = obj["metadata"]["name"]
        kind = children.kind_of(run, step)
        try:
            created = await self.kube.create(kind, namespace, obj)
        except ApiError as e:
            if e.status == 404 and kind in NOT_BUILT_IN:
                raise Blocked(
                    f"{kind.api_version} {kind} is not served by this cluster: {NOT_BUILT_IN[kind]}"
                ) from None
            if e.status != 409:
                raise
            created = await self._adopt(state, kind, namespace, name, obj)
        else:
            metrics.CHILDREN_CREATED.labels(step=step).inc()
            # From the watch event that woke this pass (the previous step's end, when the pass creates the next
            # child) to this creation: the operator's own reaction time, on one clock.
            if state.woken_at is not None and attempt == 0:
                metrics.REACTION_SECONDS.observe(time.monotonic() - state.woken_at)
            kopf.info(
                children.owner(body),
                reason="Created",
                message=f"iteration {t}/{run.spec.iterations}: {kind} {name} ({STEP_WORD[step]})",
            )
        state.created[name] = created
        rec = st_.record(state.status, t)
        rec[JOB_FIELD[step]] = name
        if step == "train":
            rec.setdefault("trainingStartedAt", st_.now())
            rec.pop("trainingRestarts", None)  # counted per attempt
            rec.pop("trainingRestartedAt", None)

    async def _adopt(
        self, state: RunState, kind: Any, namespace: str, name: str, obj: dict[str, Any]
    ) -> dict[str, Any]:
        """409 AlreadyExists: the child was created before (by us before a restart, or by someone): adopt it."""
        existing = await self.kube.get(kind, namespace, name)
        meta = existing.get("metadata") or {}
        refs = meta.get("ownerReferences") or []
        controllers = [r for r in refs if r.get("controller")]
        if controllers and state.uid not in [r.get("uid") for r in controllers]:
            raise Blocked(
                f"{kind} {name} exists but belongs to another owner ({controllers[0].get('kind')} "
                f"{controllers[0].get('name')}, uid {controllers[0].get('uid')}): waiting for it to be deleted"
            )
        if (
            not controllers
            or (meta.get("labels") or {}).get(children.RUN_LABEL) != obj["metadata"]["labels"][children.RUN_LABEL]
        ):
            existing = await self.kube.patch(
                kind,
                namespace,
                name,
                {
                    "metadata": {
                        "ownerReferences": obj["metadata"]["ownerReferences"],
                        "labels": obj["metadata"]["labels"],
                    }
                },
            )
        logger.info("[%s] adopted existing %s %s", namespace, kind, name)
        return existing

    async def _failed_child(
        self,
        key: Key,
        state: RunState,
        run: SpinRun,
        body: dict[str, Any],
        child: Child,
        current: dict[tuple[int, str], Child | None],
    ) -> None:
        owner = children.owner(body)
        namespace = key[0]
        t, step = child.iteration, child.step
        rec = st_.record(state.status, t)
        what = child.kind
        note, bad_input = await self._failure_note(state, namespace, child)
        reason = f"{what} {child.name} failed: {child.message}" + (f"; {note}" if note else "")
        retries = rec.get(f"{step}Retries", 0)
        n = run.spec.iterations
        if f"failed:{child.name}" not in state.reported:
            state.reported.add(f"failed:{child.name}")
            kopf.warn(owner, reason="ChildFailed", message=reason)
        if bad_input or retries >= self.config.max_retries:
            if bad_input:  # exit code 2: the same input fails the same way, so a retry only wastes GPUs
                message, failure = f"{reason} (bad input: not retried; fix it and create the run again)", "InvalidInput"
            else:
                message = f"{reason} (no retries left: {retries} of {self.config.max_retries} used)"
                failure = FAILURE_REASON[step]
            if step != "evaluate":  # an evaluation failure leaves the trained model's record as it is
                rec["phase"] = "Failed"
            rec["message"] = message
            self._set_phase(state, owner, "Failed", message, failure=(failure, message), warn=True)
            return
        delay = self.config.backoff(retries)
        waited = st_.seconds_since(child.finished_at)
        remaining = delay - (waited if waited is not None else delay)
        rec["message"] = reason
        if remaining > 0:
            self.wake_later(key, remaining)
            self._set_phase(
                state,
                owner,
                state.status.get("phase") or "Pending",
                f"iteration {t}/{n}: {reason}; recreating in {remaining:.0f}s "
                f"(retry {retries + 1}/{self.config.max_retries})",
            )
            return
        # Persist the retry first: a restart between here and the creation then resumes at the new attempt.
        rec[f"{step}Retries"] = retries + 1
        rec["retries"] = sum(rec.get(f"{k}Retries", 0) for k in STEP_WORD)
        await self._write(key, state)
        if await self.kube.delete(children.KINDS[child.kind], namespace, child.name):
            state.deleted.add(child.name)
        metrics.CHILD_RETRIES.labels(step=step).inc()
        await self._create(state, run, body, t, step, retries + 1)
        new_name = children.child_name(run.metadata.name, t, step, retries + 1)
        kopf.warn(
            owner,
            reason="Retrying",
            message=f"recreated {what} {child.name} as {new_name} (retry {retries + 1}/{self.config.max_retries})",
        )
        self._set_phase(
            state,
            owner,
            state.status.get("phase") or "Pending",
            f"iteration {t}/{n}: {STEP_WORD[step]} retry {retries + 1} ({what} {new_name}) after: {reason}",
        )

    async def _failure_note(self, state: RunState, namespace: str, child: Child) -> tuple[str, bool]:
        """The failed pod's own words (termination message, or its log tail via FallbackToLogsOnError), and whether
        it failed on bad input (see observe.input_error); read once per child."""
        if child.name in state.failure_notes:
            return state.failure_notes[child.name]
        note, bad_input = "", False
        try:
            if child.step == "train":
                pods = [await self._master_pod(namespace, child)]
                container = children.train_container(children.KINDS[child.kind])
            else:
                pods = await self.kube.list(PODS, namespace, {"batch.kubernetes.io/job-name": child.name})
                container = children.GENERATE_CONTAINER if child.step == "generate" else children.EVALUATE_CONTAINER
            for pod in pods:
                if pod is None:
                    continue
                bad_input = bad_input or input_error(pod, container)
                _, _, message = termination_summary(pod, container)
                if message and not note:  # the job's own error line (it names the file, row or artefact), or a log tail
                    note = f"pod {pod.get('metadata', {}).get('name')}: {message[:500]}"
        except ApiError as e:
            logger.debug("no failure details for %s: %s", child.name, e)
        state.failure_notes[child.name] = (note, bad_input)
        return note, bad_input

    async def _master_pod(self, namespace: str, child: Child) -> dict[str, Any] | None:
        """The pod of rank 0's node: a PyTorchJob's Master, or a TrainJob's first pod of its "node" replicated
        job (JobSet labels); the one whose termination message carries the trainer's summary."""
        if child.kind == TRAINJOBS.kind:
            pods = await self.kube.list(
                PODS,
                namespace,
                {
                    "jobset.sigs.k8s.io/jobset-name": child.name,
                    "jobset.sigs.k8s.io/replicatedjob-name": children.TRAINJOB_CONTAINER,
                    "jobset.sigs.k8s.io/job-index": "0",
                    "batch.kubernetes.io/job-completion-index": "0",
                },
            )
            return pods[0] if pods else None
        try:
            return await self.kube.get(PODS, namespace, children.master_pod_name(child.name))
        except ApiError as e:
            if e.status != 404:
                raise
        pods = await self.kube.list(
            PODS,
            namespace,
            {"training.kubeflow.org/job-name": child.name, "training.kubeflow.org/replica-type": "master"},
        )
        return pods[0] if pods else None

    async def _read_evaluation(self, state: RunState, t: int, child: Child) -> None:
        """eval.json's numbers, from the evaluation pod's termination message (the operator reads no S3)."""
        rec = st_.record(state.status, t)
        if isinstance(rec.get("evaluation"), dict):
            return
        namespace = (child.body.get("metadata") or {}).get("namespace", "")
        pods = await self.kube.list(PODS, namespace, {"batch.kubernetes.io/job-name": child.name})
        found: dict[str, float] = {}
        for pod in pods:
            numbers, _, _ = termination_summary(pod, children.EVALUATE_CONTAINER)
            if numbers:
                found = numbers
                break
        if not found:
            # Without numbers the stop rule and bestIteration skip this iteration; the run goes on.
            rec["message"] = "evaluation finished but its pod left no summary: see iter-<t>/eval.json in the store"
        rec["evaluation"] = found
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(found.items()) if k in ("score", "rewards/margins"))
        logger.info("[%s] iteration %d evaluated by %s: %s", namespace, t, child.name, shown or "no numbers")

    def _best(self, state: RunState, run: SpinRun, progress: Progress) -> None:
        """bestIteration / bestCheckpoint by evaluation.metric: the model to deploy."""
        chosen = best(run.spec, progress)
        if chosen is None:
            return
        t, value = chosen
        rec = st_.find_record(state.status, t) or {}
        state.status["bestIteration"] = t
        state.status["bestCheckpoint"] = rec.get("checkpoint") or checkpoint_uri(run, t)
        state.status["bestMetric"] = value

    async def _read_summary(self, state: RunState, run: SpinRun, t: int, child: Child) -> None:
        rec = st_.record(state.status, t)
        if "summary" in rec:
            return
        namespace = run.metadata.namespace or ""
        pod = await self._master_pod(namespace, child)
        metrics_, checkpoint, line = termination_summary(
            pod or {}, children.train_container(children.KINDS[child.kind])
        )
        rec["metrics"] = metrics_
        rec["checkpoint"] = checkpoint or checkpoint_uri(run, t)
        rec["summary"] = line or "unavailable: the Master pod has no termination message"

    async def _cleanup_attempts(
        self, state: RunState, kids: list[Child], current: dict[tuple[int, str], Child | None]
    ) -> None:
        """Failed children of earlier attempts go once their replacement exists (a restart may leave one)."""
        for kid in kids:
            now_child = current.get((kid.iteration, kid.step))
            if now_child is not None and kid.attempt < now_child.attempt and not kid.deleting:
                namespace = (kid.body.get("metadata") or {}).get("namespace", "")
                await self.kube.delete(children.KINDS[kid.kind], namespace, kid.name)
                state.deleted.add(kid.name)

    def _set_phase(
        self,
        state: RunState,
        owner: dict[str, Any],
        phase: str,
        message: str,
        failure: tuple[str, str] | None = None,
        warn: bool = False,
        last: int | None = None,
    ) -> None:
        status = state.status
        before = status.get("phase")
        status["phase"] = phase
        status["message"] = message
        if failure:
            status["failure"] = {"reason": failure[0], "message": failure[1]}
        else:
            status.pop("failure", None)
        if phase == "Succeeded" and state.accepted is not None:
            n = state.accepted.spec.iterations
            status["iteration"] = last or n
            status["progress"] = f"{last or n}/{n}"
        if before != phase:
            self._phases_changed = True
            (kopf.warn if warn else kopf.info)(owner, reason=phase, message=message)

    def _conditions(self, state: RunState) -> None:
        status = state.status
        conds = status.setdefault("conditions", [])
        gen = status.get("observedGeneration")
        phase = status.get("phase") or "Pending"
        message = status.get("message") or ""
        failure = status.get("failure") or {}
        st_.set_condition(
            conds, "Ready", phase == "Succeeded", "Succeeded" if phase == "Succeeded" else phase, message, gen
        )
        st_.set_condition(
            conds, "Progressing", phase in ("Pending", "Generating", "Training", "Evaluating"), phase, message, gen
        )
        st_.set_condition(
            conds, "Failed", phase == "Failed", failure.get("reason") or "NoFailure", failure.get("message") or "", gen
        )
        current = st_.find_record(status, status.get("iteration") or 0) or {}
        retried = sum(current.get(f"{k}Retries", 0) for k in STEP_WORD)
        degraded = phase in ("Generating", "Training", "Evaluating", "Suspended") and bool(current.get("message"))
        if state.stuck and phase in ("Generating", "Training", "Evaluating"):
            st_.set_condition(conds, "Degraded", True, state.stuck[0], state.stuck[1], gen)
        elif degraded:
            st_.set_condition(conds, "Degraded", True, "ChildFailed", current["message"], gen)
        elif retried and phase != "Succeeded" and phase != "Failed":
            st_.set_condition(
                conds,
                "Degraded",
                False,
                "Recovered",
                f"iteration {current.get('iteration')} needed {retried} retries",
                gen,
            )
        else:
            st_.set_condition(conds, "Degraded", False, "AsExpected", "", gen)
        if self._phases_changed:  # counting every run's phase on every pass would cost O(runs) each time
            self._phases_changed = False
            metrics.set_phases(s.status.get("phase") for s in self.states.values())

    async def _write(self, key: Key, state: RunState) -> None:
        st_.drop_non_finite(state.status)
        patch = st_.merge_patch(state.written, state.status)
        if not patch:
            return
        try:
            await self.kube.patch(SPINRUNS, key[0], key[1], {"status": patch}, subresource="status")
        except ApiError as e:
            if e.status == 404:
                self.forget(key)
                return
            raise
        state.written = st_.clone(state.status)

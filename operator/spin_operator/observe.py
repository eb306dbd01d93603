"""Reading children: what state a Job or PyTorchJob is in, and what the planner should count as done.

Pure functions of object bodies (as the watch delivers them), so the same code serves the live operator and the
unit tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from spin_operator.children import (
    ATTEMPT_LABEL,
    ITERATION_LABEL,
    OPERATOR,
    STEP_LABEL,
    SUSPENDED_BY_ANNOTATION,
    Step,
)

ChildPhase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]
TERMINAL = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Child:
    """One generation Job or training PyTorchJob, as last seen."""

    name: str
    step: Step
    iteration: int
    attempt: int
    phase: ChildPhase
    suspended: bool = False
    """What the child's spec asks for (spec.suspend / runPolicy.suspend), not whether it has stopped yet."""
    suspended_by_operator: bool = False
    """The operator suspended it (spec.suspend); otherwise a suspended child is held by another controller (Kueue)."""
    completed: frozenset[int] = frozenset()
    """Indexes (shards) that finished (generation Jobs)."""
    message: str = ""
    """Why it failed, or what it is waiting for."""
    finished_at: str | None = None
    started_at: str | None = None
    restarted_at: str | None = None
    """PyTorchJobs: when its pods last restarted in place (the Restarting condition's transition time)."""
    deleting: bool = False
    owner_uids: tuple[str, ...] = ()
    kind: str = "Job"
    """The child's kind: Job, PyTorchJob or TrainJob."""
    body: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    @property
    def active(self) -> bool:
        return not self.terminal and not self.deleting


def parse_indexes(text: str | None) -> frozenset[int]:
    """batch/v1 completedIndexes: "1,3-5,7" -> {1, 3, 4, 5, 7}."""
    out: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.update(range(int(lo), int(hi) + 1))
        else:
            out.add(int(part))
    return frozenset(out)


def _conditions(body: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """True conditions by type (the last one wins when a type repeats)."""
    out: dict[str, dict[str, Any]] = {}
    for cond in (body.get("status") or {}).get("conditions") or []:
        if isinstance(cond, dict) and str(cond.get("status")) == "True":
            out[str(cond.get("type"))] = cond
    return out


def _describe(cond: Mapping[str, Any]) -> str:
    reason, message = cond.get("reason") or "", cond.get("message") or ""
    if reason and message:
        return f"{reason}: {message}"
    return reason or message


def _identity(body: Mapping[str, Any], step: Step) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    return {
        "name": meta.get("name", ""),
        "step": step,
        "iteration": int(labels.get(ITERATION_LABEL, 0) or 0),
        "attempt": int(labels.get(ATTEMPT_LABEL, 0) or 0),
        "deleting": bool(meta.get("deletionTimestamp")),
        "suspended_by_operator": (meta.get("annotations") or {}).get(SUSPENDED_BY_ANNOTATION) == OPERATOR,
        "owner_uids": tuple(str(r.get("uid")) for r in meta.get("ownerReferences") or [] if r.get("uid")),
        "kind": str(body.get("kind") or "Job"),
        "body": body,
    }


def job_child(body: Mapping[str, Any], step: Step = "generate") -> Child:
    """A batch/v1 Job (generation or evaluation): Complete / Failed (or FailureTarget: failing) / Suspended /
    running."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    conds = _conditions(body)
    completed = parse_indexes(status.get("completedIndexes"))
    suspended = bool(spec.get("suspend"))
    started = status.get("startTime")
    if "Complete" in conds:
        return Child(
            **_identity(body, step),
            phase="Succeeded",
            suspended=suspended,
            completed=completed,
            finished_at=conds["Complete"].get("lastTransitionTime") or status.get("completionTime"),
            started_at=started,
        )
    failed = conds.get("Failed") or conds.get("FailureTarget")
    if failed:
        message = _describe(failed) or "the Job failed"
        if status.get("failedIndexes"):
            message += f" (failed indexes: {status['failedIndexes']})"
        return Child(
            **_identity(body, step),
            phase="Failed",
            suspended=suspended,
            completed=completed,
            message=message,
            finished_at=failed.get("lastTransitionTime"),
            started_at=started,
        )
    if "Suspended" in conds:
        return Child(**_identity(body, step), phase="Suspended", suspended=suspended, completed=completed)
    running = bool(status.get("active")) or bool(status.get("ready"))
    return Child(
        **_identity(body, step),
        phase="Running" if running else "Pending",
        suspended=suspended,
        completed=completed,
        started_at=started,
    )


def pytorchjob_child(body: Mapping[str, Any]) -> Child:
    """A kubeflow.org/v1 PyTorchJob: Succeeded / Failed / Suspended / Running or Restarting / Created."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    conds = _conditions(body)
    suspended = bool((spec.get("runPolicy") or {}).get("suspend"))
    started = status.get("startTime")
    if "Succeeded" in conds:
        return Child(
            **_identity(body, "train"),
            phase="Succeeded",
            suspended=suspended,
            finished_at=conds["Succeeded"].get("lastTransitionTime") or status.get("completionTime"),
            started_at=started,
        )
    if "Failed" in conds:
        return Child(
            **_identity(body, "train"),
            phase="Failed",
            suspended=suspended,
            message=_describe(conds["Failed"]) or "the PyTorchJob failed",
            finished_at=conds["Failed"].get("lastTransitionTime"),
            started_at=started,
        )
    if "Suspended" in conds:
        return Child(**_identity(body, "train"), phase="Suspended", suspended=suspended)
    if "Running" in conds or "Restarting" in conds:
        restarting = conds.get("Restarting")
        return Child(
            **_identity(body, "train"),
            phase="Running",
            suspended=suspended,
            message=_describe(restarting) if restarting else "",
            started_at=started,
            restarted_at=restarting.get("lastTransitionTime") if restarting else None,
        )
    return Child(**_identity(body, "train"), phase="Pending", suspended=suspended, started_at=started)


def trainjob_child(body: Mapping[str, Any]) -> Child:
    """A trainer.kubeflow.org/v1alpha1 TrainJob (Kubeflow Trainer v2): Complete / Failed / Suspended / running."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    conds = _conditions(body)
    suspended = bool(spec.get("suspend"))
    if "Complete" in conds:
        return Child(
            **_identity(body, "train"),
            phase="Succeeded",
            suspended=suspended,
            finished_at=conds["Complete"].get("lastTransitionTime"),
        )
    if "Failed" in conds:
        return Child(
            **_identity(body, "train"),
            phase="Failed",
            suspended=suspended,
            message=_describe(conds["Failed"]) or "the TrainJob failed",
            finished_at=conds["Failed"].get("lastTransitionTime"),
        )
    if "Suspended" in conds:
        return Child(**_identity(body, "train"), phase="Suspended", suspended=suspended)
    running = any(j.get("active") or j.get("ready") for j in status.get("jobsStatus") or [])
    return Child(**_identity(body, "train"), phase="Running" if running else "Pending", suspended=suspended)


def children_of(
    uid: str | None, jobs: Iterable[Mapping[str, Any]], training: Iterable[Mapping[str, Any]]
) -> list[Child]:
    """The run's children (batch Jobs; PyTorchJobs and TrainJobs): labelled for it and owned by this incarnation of
    it (a same-named predecessor's leftovers, still waiting for garbage collection, are not ours)."""
    out = []
    for body in jobs:
        step = (body.get("metadata", {}).get("labels") or {}).get(STEP_LABEL)
        if step in ("generate", "evaluate"):
            out.append(job_child(body, step))
    for body in training:
        if (body.get("metadata", {}).get("labels") or {}).get(STEP_LABEL) == "train":
            out.append(trainjob_child(body) if body.get("kind") == "TrainJob" else pytorchjob_child(body))
    return [c for c in out if c.iteration >= 1 and (not c.owner_uids or uid is None or uid in c.owner_uids)]


STUCK_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "CrashLoopBackOff",
    }
)
"""Container waiting reasons that do not clear up by themselves: the kubelet keeps retrying, the Job counts the
pod as active, and nothing else tells the user."""


def pod_problem(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """Why a pod of a running child makes no progress, as (reason, message): a container stuck waiting (image pull,
    config error, crash loop) or the scheduler unable to place it. None while it is fine or still starting."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed"):
        return None
    name = meta.get("name", "")
    for key in ("initContainerStatuses", "containerStatuses"):
        for container in status.get(key) or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_REASONS:
                detail = f": {waiting['message']}" if waiting.get("message") else ""
                return waiting["reason"], f"pod {name}, container {container.get('name')}{detail}"
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason"):
            detail = f": {cond['message']}" if cond.get("message") else ""
            return str(cond["reason"]), f"pod {name} cannot be scheduled{detail}"
    return None


def pods_of(child: Child, pods: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The child's pods, by the labels its pod template carries (run, iteration, step, attempt)."""
    want = {ITERATION_LABEL: str(child.iteration), STEP_LABEL: child.step, ATTEMPT_LABEL: str(child.attempt)}
    return [p for p in pods if want.items() <= (((p.get("metadata") or {}).get("labels") or {}).items())]


def _terminated(pod: Mapping[str, Any], container: str) -> list[Mapping[str, Any]]:
    """The container's terminated states (current, then last), newest first."""
    out = []
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == container:
            for key in ("state", "lastState"):
                terminated = (status.get(key) or {}).get("terminated")
                if terminated:
                    out.append(terminated)
    return out


INPUT_ERROR_EXIT_CODE = 2
"""What `spin generate/train/evaluate` exit with on a problem the user must fix (spec, data, model, scorer)."""


def input_error(pod: Mapping[str, Any], container: str) -> bool:
    """Whether the container stopped on bad input: exit code 2, or (under torchrun, which exits 1 whatever its ranks
    did) the job's termination message {"error": "input", ...}. Retrying cannot help such a failure."""
    for terminated in _terminated(pod, container):
        if terminated.get("exitCode") == INPUT_ERROR_EXIT_CODE:
            return True
        lines = str(terminated.get("message") or "").strip().splitlines()
        try:
            data = json.loads(lines[-1]) if lines else None
        except ValueError:
            data = None
        if isinstance(data, dict) and data.get("error") == "input":
            return True
    return False


def termination_summary(pod: Mapping[str, Any], container: str) -> tuple[dict[str, float], str | None, str]:
    """The trainer's one-line JSON summary from the Master pod's terminated state.

    Returns (metrics, checkpoint URI or None, raw message). Accepts {"metrics": {...}, "checkpoint": "..."} or a
    flat object whose numeric values are metrics; a non-JSON message (logs, via FallbackToLogsOnError) is kept raw.
    """
    message = next((str(t["message"]) for t in _terminated(pod, container) if t.get("message")), "")
    if not message:
        return {}, None, ""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    try:
        data = json.loads(lines[-1]) if lines else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return {}, None, message.strip()[-1000:]
    if isinstance(data.get("error"), str):  # a job's failure: {"error": "input" | "step", "message": ...}
        return {}, None, str(data.get("message") or data["error"])[:1000]
    raw_metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else data
    metrics = {
        str(k): float(v) for k, v in raw_metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    checkpoint = data.get("checkpoint") or data.get("checkpointUri") or data.get("checkpoint_uri")
    return metrics, (str(checkpoint) if checkpoint else None), lines[-1][-1000:]

"""A stand-in kubelet: `python -m tests.cluster.kubelet CONFIG.json`. It stands in at the container-runtime boundary.

Nothing on the test machine runs containers, so this program does what a kubelet does with what the machine has:

- registers its Nodes (capacity cpu, memory, pods and `nvidia.com/gpu` as configured), keeps their Leases and their
  Ready condition fresh (so the node lifecycle controller never taints them), each node with its own client
  certificate (`system:node:<name>`), so the Node authorizer and NodeRestriction judge every call it makes;
- watches the pods the scheduler bound to its nodes and runs each container as a local process
  (tests/cluster/shim.py): the image's ENV, USER and WORKDIR read from images/*/Dockerfile, command/args as given
  with `spin`, `python`, `torchrun` resolved in the project's .venv (a test-only image's own folders first), env
  (value, valueFrom fieldRef, secretKeyRef, configMapKeyRef, envFrom), volumes (configMap, secret, emptyDir,
  projected ServiceAccount token + ca.crt + namespace) bind-mounted at their mountPath, /dev/termination-log from
  a per-container file;
- writes pod status through the API as the kubelet does: Pending -> Running -> Succeeded/Failed, container states
  with exit codes, reasons and termination messages (FallbackToLogsOnError included), pod conditions, restarts with
  restartCount (OnFailure/Always), httpGet/tcpSocket startup, readiness and liveness probes;
- reports what a kubelet reports for what it cannot run: unknown images -> ErrImagePull/ImagePullBackOff;
  runAsNonRoot against an image that runs as root -> CreateContainerConfigError, with the kubelet's own messages;
- on deletion: SIGTERM to the container's process group, the grace period, SIGKILL, a terminal phase (Failed unless
  every container succeeded), then completes the graceful deletion (DELETE with gracePeriodSeconds=0,
  preconditioned on the uid).

Stand-ins, named as such: the pods share the host's network, each with its own loopback address as pod IP
(127.1.x.y, the probes' target); a Python program's listening socket on the wildcard address with a fixed port is
narrowed to that address (tests/cluster/podnet/sitecustomize.py), so two pods may listen on the same port, as in
their own network namespaces (other programs' ports must not clash; port 0 is left alone); there is no cluster
DNS, so env vars naming a master host (MASTER_ADDR, PET_MASTER_ADDR) are rewritten to 127.0.0.1, and the Training
Operator's `init-pytorch` container (an alpine `nslookup <master>` loop) succeeds once that Service exists;
KUBERNETES_SERVICE_HOST/PORT point at the test apiserver; the CPU stand-ins of STAND_IN_ENV replace GPUs. Not done:
images' filesystems (the process sees the host's; the image's HOME/WORKDIR are per-container folders), resource
limits, cgroups, exec probes, service-link env vars, resourceFieldRef, `kubectl logs/exec` (logs are files under the
kubelet's root), other volume types (hostPath, downwardAPI, persistent volumes), token refresh.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from tests.cluster.api import Api, ApiError, Credentials

ROOT = Path(__file__).resolve().parent.parent.parent
SHIM = Path(__file__).resolve().parent / "shim.py"
POD_IP = "127.0.0.1"  # the node's address (and what names of Services resolve to)
PODNET = Path(__file__).resolve().parent / "podnet"  # sitecustomize: wildcard binds narrowed to the pod's address
# In place of GPUs and a model hub: what the test suite sets for vLLM and DeepSpeed on a CPU (see the README).
STAND_IN_ENV = {
    "DS_ACCELERATOR": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "HF_HUB_OFFLINE": "1",
}
# No cluster DNS here: env vars naming the rendezvous host of a distributed job point at this machine instead.
MASTER_HOST_VARS = ("MASTER_ADDR", "PET_MASTER_ADDR")
PODNET_ENV = "STANDIN_POD_IP"
TERMINATION_MESSAGE_MAX = 4096
LOG_TAIL_LINES, LOG_TAIL_BYTES = 80, 2048
NSLOOKUP_LOOP = re.compile(r"for i in \$\(seq (\d+)\); do if nslookup (\S+);")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- images ----------------------------------------------------------------------------------------------------------
@dataclass
class Image:
    """What the stand-in knows of an image: its config (ENV, USER, WORKDIR, ENTRYPOINT, CMD)."""

    env: dict[str, str] = field(default_factory=dict)
    user: str = ""
    workdir: str = "/"
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    stand_in: str = ""  # "nslookup": the alpine init container of PyTorchJob workers, run by the kubelet itself
    path: list[str] = field(default_factory=list)  # folders ahead of the venv on PATH: the image's own programs

    @classmethod
    def from_dockerfile(cls, path: Path) -> Image:
        from dockerfile_parse import DockerfileParser

        parser = DockerfileParser(path=str(path))
        image = cls(env={k: v for k, v in parser.envs.items() if k != "PATH"})
        last_from = max(i for i, ins in enumerate(parser.structure) if ins["instruction"] == "FROM")
        for ins in parser.structure[last_from:]:
            name, value = ins["instruction"], ins["value"]
            if name == "USER":
                image.user = value
            elif name == "WORKDIR":
                image.workdir = value
            elif name in ("ENTRYPOINT", "CMD"):
                words = json.loads(value) if value.startswith("[") else ["/bin/sh", "-c", value]
                if name == "ENTRYPOINT":
                    image.entrypoint, image.cmd = words, []  # a new ENTRYPOINT resets CMD
                else:
                    image.cmd = words
        return image

    def uid_gid(self) -> tuple[int | None, int | None, str]:
        """(uid, gid, user name when not numeric); an image without USER runs as root (uid 0)."""
        user, _, group = self.user.partition(":")
        if not user:
            return 0, 0, ""
        if not user.isdigit():
            return None, None, user
        return int(user), int(group) if group.isdigit() else int(user), ""


def image_repository(reference: str) -> str:
    """`docker.io/library/alpine:3.10` -> `alpine`; tags and digests dropped."""
    ref = reference.split("@", 1)[0]
    name, _, tag = ref.rpartition(":")
    if name and "/" not in tag:
        ref = name
    for prefix in ("docker.io/library/", "docker.io/", "library/"):
        if ref.startswith(prefix):
            return ref[len(prefix) :]
    return ref


# -- processes -------------------------------------------------------------------------------------------------------
class NslookupStandIn:
    """The `init-pytorch` container (alpine: `nslookup <master>` every 2 s up to N tries): cluster DNS answers for a
    Service name once the Service exists, so this succeeds once the Service exists in the pod's namespace."""

    def __init__(self, api: Api, namespace: str, host: str, tries: int, log: Path):
        self.returncode: int | None = None
        self._stop = threading.Event()
        self.pid = -1
        threading.Thread(target=self._run, args=(api, namespace, host, tries, log), daemon=True).start()

    def _run(self, api: Api, namespace: str, host: str, tries: int, log: Path) -> None:
        service = host.split(".")[0]
        with log.open("a") as out:
            for _ in range(tries):
                with contextlib.suppress(ApiError, requests.RequestException):
                    if api.find(f"/api/v1/namespaces/{namespace}/services/{service}"):
                        out.write(f"Name:\t{host}\nAddress: {POD_IP} (stand-in: the Service exists)\n")
                        self.returncode = 0
                        return
                out.write("waiting for master\n")
                out.flush()
                if self._stop.wait(2.0):
                    self.returncode = 143
                    return
        self.returncode = 1

    def poll(self) -> int | None:
        return self.returncode

    def signal(self, sig: int) -> None:
        self._stop.set()


class Process:
    """A container's process (the shim, then the exec'd command), in its own process group."""

    def __init__(self, spec: dict[str, Any], spec_file: Path, log: Path):
        spec_file.write_text(json.dumps(spec))
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-I", str(SHIM), str(spec_file)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.popen.pid

    def poll(self) -> int | None:
        code = self.popen.poll()
        return None if code is None else (128 - code if code < 0 else code)  # killed by SIGn -> 128+n

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


class ContainerConfigError(Exception):
    """CreateContainerConfigError: the container cannot be created as specified (message as the kubelet's)."""


class ImagePullError(Exception):
    pass


class VolumeError(Exception):
    pass


# -- one container ---------------------------------------------------------------------------------------------------
@dataclass
class Container:
    spec: dict[str, Any]
    init: bool
    proc: Process | NslookupStandIn | None = None
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    not_before: float = 0.0  # restart or retry back-off
    backoff: float = 0.0
    started_at: float = 0.0
    log_offset: int = 0
    ready: bool = False
    started: bool = False
    probe_failures: dict[str, int] = field(default_factory=dict)
    next_probe: dict[str, float] = field(default_factory=dict)
    pull_failures: int = 0
    done: bool = False  # terminated and not to be restarted
    killing: str = ""  # why the kubelet is stopping it (liveness, startup)

    @property
    def name(self) -> str:
        return self.spec["name"]

    def status(self, image_id: str) -> dict[str, Any]:
        status = {
            "name": self.name,
            "image": self.spec["image"],
            "imageID": image_id,
            "ready": self.ready,
            "restartCount": self.restarts,
            "started": self.started,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.proc is not None:
            status["containerID"] = f"standin://{self.proc.pid}"
        return status


# -- one pod ---------------------------------------------------------------------------------------------------------
class PodWorker(threading.Thread):
    """Runs one pod to its end and writes its status; a thread per pod, as the kubelet's pod workers."""

    def __init__(self, node: NodeAgent, pod: dict[str, Any]):
        meta = pod["metadata"]
        super().__init__(name=f"pod {meta['namespace']}/{meta['name']}", daemon=True)
        self.node, self.api, self.pod = node, node.api, pod
        self.uid, self.namespace, self.pod_name = meta["uid"], meta["namespace"], meta["name"]
        self.dir = node.kubelet.root / "pods" / self.uid
        self.wake = threading.Event()
        self.deleted = threading.Event()  # the object is gone: stop at once
        spec = pod["spec"]
        self.init = [Container(c, True) for c in spec.get("initContainers") or []]
        self.main = [Container(c, False) for c in spec.get("containers") or []]
        self.restart_policy = spec.get("restartPolicy", "Always")
        self.start_time = now()
        self.volumes: dict[str, Path] | None = None
        self.volume_error = ""
        self.phase = "Pending"
        self.written: Any = None
        self.ip = node.kubelet.allocate_ip()

    def update(self, pod: dict[str, Any]) -> None:
        self.pod = pod
        self.wake.set()

    @property
    def deleting(self) -> bool:
        return bool(self.pod["metadata"].get("deletionTimestamp")) or self.deleted.is_set()

    def run(self) -> None:
        try:
            self.sync_until_done()
        except Exception:
            self.node.kubelet.log(f"pod {self.namespace}/{self.pod_name}: {traceback.format_exc()}")
        finally:
            self.node.forget(self.uid)

    def sync_until_done(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        while True:
            if self.deleting:
                self.stop_all(self.grace_period())
                if self.phase not in ("Succeeded", "Failed"):
                    # As the kubelet does since Kubernetes 1.27: a deleted pod ends in a terminal phase first, so
                    # that the Job controller (podFailurePolicy, e.g. DisruptionTarget) can judge its failure.
                    codes = [c.state.get("terminated", {}).get("exitCode") for c in self.main]
                    self.phase = "Succeeded" if codes and all(code == 0 for code in codes) else "Failed"
                self.write_status()
                if not self.deleted.is_set():
                    with contextlib.suppress(ApiError):
                        self.api.delete(self.pod_path, {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}})
                return
            if self.phase not in ("Succeeded", "Failed"):
                self.step()
                self.write_status()
            self.wake.wait(0.25)
            self.wake.clear()

    @property
    def pod_path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}"

    def grace_period(self) -> float:
        meta = self.pod["metadata"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        return float(grace)

    # -- the sync step: volumes, init containers in order, then every container ----------------------------------
    def step(self) -> None:
        if self.volumes is None:
            try:
                self.volumes = self.node.kubelet.prepare_volumes(self)
                self.volume_error = ""
            except VolumeError as e:
                if str(e) != self.volume_error:
                    self.node.event(self.pod, "FailedMount", str(e), "Warning")
                self.volume_error = str(e)
                return
        for c in self.init:
            if c.done:
                continue
            self.supervise(c)
            if not c.done:
                return
            if c.state.get("terminated", {}).get("exitCode") != 0:  # restartPolicy Never: the pod failed
                self.phase = "Failed"
                return
        for c in self.main:
            if not c.done:
                self.supervise(c)
        running = [c for c in self.main if "running" in c.state]
        if all(c.done for c in self.main):
            codes = [c.state["terminated"]["exitCode"] for c in self.main]
            self.phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
        elif running or any(c.restarts for c in self.main):
            self.phase = "Running"

    def supervise(self, c: Container) -> None:
        t = time.monotonic()
        if c.proc is None:
            if t >= c.not_before:
                self.start_container(c)
            return
        code = c.proc.poll()
        if code is None:
            self.probe(c)
            return
        terminated = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": c.state.get("running", {}).get("startedAt", now()),
            "finishedAt": now(),
            "containerID": f"standin://{c.proc.pid}",
        }
        message = self.termination_message(c, code)
        if message:
            terminated["message"] = message
        c.proc, c.ready, c.started = None, False, False
        c.state = {"terminated": terminated}
        restart = (
            (c.killing in ("liveness", "startup") and self.restart_policy != "Never")
            or self.restart_policy == "Always"
            or (self.restart_policy == "OnFailure" and code != 0)
        )
        if c.init and code == 0:
            restart = False
        c.killing = ""
        if not restart:
            c.done = True
            return
        # CrashLoopBackOff (the kubelet: 10 s doubling to 5 min; here 1 s doubling to 10 s).
        c.backoff = min(max(c.backoff * 2, 1.0), 10.0)
        c.not_before = t + c.backoff
        c.last_state, c.restarts = c.state, c.restarts + 1
        c.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {c.backoff:.0f}s restarting failed container={c.name} "
                f"pod={self.pod_name}_{self.namespace}({self.uid})",
            }
        }

    def start_container(self, c: Container) -> None:
        kubelet = self.node.kubelet
        try:
            image = kubelet.pull(c.spec["image"])
            c.pull_failures = 0
            spec = kubelet.container_spec(self, c, image)
        except ImagePullError as e:
            c.pull_failures += 1
            reason = "ErrImagePull" if c.pull_failures == 1 else "ImagePullBackOff"
            message = str(e) if reason == "ErrImagePull" else f'Back-off pulling image "{c.spec["image"]}": {e}'
            self.waiting(c, reason, message, retry=min(2.0 * c.pull_failures, 10.0))
            return
        except ContainerConfigError as e:
            self.waiting(c, "CreateContainerConfigError", str(e), retry=2.0)
            return
        log = kubelet.log_path(self, c)
        c.log_offset = log.stat().st_size if log.exists() else 0
        if image.stand_in == "nslookup":
            match = NSLOOKUP_LOOP.search(" ".join(spec["argv"]))
            if match is None:
                raise RuntimeError(f"the stand-in for {c.spec['image']} runs only the init-pytorch nslookup loop")
            c.proc = NslookupStandIn(self.api, self.namespace, match.group(2), int(match.group(1)), log)
        else:
            cdir = self.dir / "containers" / c.name
            c.proc = Process(spec, cdir / f"spec-{c.restarts}.json", log)
        c.started_at = time.monotonic()
        c.state = {"running": {"startedAt": now()}}
        c.started = not c.spec.get("startupProbe")
        c.ready = c.started and not c.spec.get("readinessProbe")
        c.probe_failures, c.next_probe = {}, {}
        self.node.event(self.pod, "Started", f"Started container {c.name}")

    def waiting(self, c: Container, reason: str, message: str, retry: float) -> None:
        """The container cannot start (yet): waiting with reason and message, an Event when they change."""
        if c.state.get("waiting") != {"reason": reason, "message": message}:
            self.node.event(self.pod, "Failed", f"Error: {reason}: {message}", "Warning")
        c.state = {"waiting": {"reason": reason, "message": message}}
        c.not_before = time.monotonic() + retry

    def termination_message(self, c: Container, code: int) -> str:
        path = self.dir / "containers" / c.name / "termination-log"
        message = ""
        if path.exists():
            message = path.read_bytes()[:TERMINATION_MESSAGE_MAX].decode(errors="replace")
            path.write_bytes(b"")  # a restarted container starts with an empty file, as with a new container
        if not message and code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            log = self.node.kubelet.log_path(self, c)
            with log.open("rb") as f:
                f.seek(c.log_offset)
                tail = f.read().splitlines()[-LOG_TAIL_LINES:]
            message = b"\n".join(tail)[-LOG_TAIL_BYTES:].decode(errors="replace")
        return message

    # -- probes -----------------------------------------------------------------------------------------------------
    def probe(self, c: Container) -> None:
        if c.init:
            return
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = c.spec.get(kind)
            if not probe or (kind != "startupProbe" and not c.started) or (kind == "startupProbe" and c.started):
                continue
            t = time.monotonic()
            if t < c.next_probe.get(kind, c.started_at + probe.get("initialDelaySeconds", 0)):
                continue
            c.next_probe[kind] = t + probe.get("periodSeconds", 10)
            ok = self.run_probe(c, probe)
            failures = 0 if ok else c.probe_failures.get(kind, 0) + 1
            c.probe_failures[kind] = failures
            if kind == "startupProbe":
                c.started = ok
                c.ready = ok and not c.spec.get("readinessProbe")
            elif kind == "readinessProbe":
                if ok and failures == 0:
                    c.ready = True
                elif failures >= probe.get("failureThreshold", 3):
                    c.ready = False
            if not ok and kind != "readinessProbe" and failures >= probe.get("failureThreshold", 3):
                c.killing = "liveness" if kind == "livenessProbe" else "startup"
                self.node.event(self.pod, "Killing", f"Container {c.name} failed {kind}, will be restarted")
                self.stop(c, float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))

    def run_probe(self, c: Container, probe: dict[str, Any]) -> bool:
        timeout = probe.get("timeoutSeconds", 1)
        if "httpGet" in probe:
            get = probe["httpGet"]
            port = self.port_number(c, get["port"])
            url = f"{get.get('scheme', 'HTTP').lower()}://{get.get('host') or self.ip}:{port}{get.get('path', '/')}"
            headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
            try:
                return 200 <= requests.get(url, headers=headers, timeout=timeout, verify=False).status_code < 400
            except requests.RequestException:
                return False
        if "tcpSocket" in probe:
            port = self.port_number(c, probe["tcpSocket"]["port"])
            try:
                socket.create_connection((probe["tcpSocket"].get("host") or self.ip, port), timeout=timeout).close()
                return True
            except OSError:
                return False
        return False  # exec and grpc probes: not supported by the stand-in

    @staticmethod
    def port_number(c: Container, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"container {c.name} has no port named {port}")

    # -- stopping ---------------------------------------------------------------------------------------------------
    def stop(self, c: Container, grace: float) -> None:
        if c.proc is None:
            return
        c.proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while c.proc.poll() is None and time.monotonic() < deadline and not self.node.kubelet.stopping.is_set():
            time.sleep(0.1)
        if c.proc.poll() is None:
            c.proc.signal(signal.SIGKILL)
            while c.proc.poll() is None:
                time.sleep(0.05)

    def stop_all(self, grace: float) -> None:
        for c in [*self.init, *self.main]:
            if c.proc is not None:
                self.node.event(self.pod, "Killing", f"Stopping container {c.name}")
                self.stop(c, grace)
                self.supervise_exit(c)

    def supervise_exit(self, c: Container) -> None:
        code = c.proc.poll() if c.proc else None
        if code is None:
            return
        started = c.state.get("running", {}).get("startedAt", now())
        c.state = {"terminated": {"exitCode": code, "reason": "Error" if code else "Completed", "startedAt": started,
                                  "finishedAt": now(), "containerID": f"standin://{c.proc.pid}"}}  # fmt: skip
        c.proc, c.ready, c.done = None, False, True

    # -- status -----------------------------------------------------------------------------------------------------
    def conditions(self) -> list[dict[str, Any]]:
        def cond(kind: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
            entry = {"type": kind, "status": "True" if ok else "False"}
            if not ok and reason:
                entry.update(reason=reason, message=message)
            return entry

        terminal = self.phase in ("Succeeded", "Failed")
        init_pending = [c.name for c in self.init if not c.done]
        unready = [c.name for c in self.main if not c.ready]
        ready_reason = "PodCompleted" if terminal else "ContainersNotReady"
        ready_message = "" if terminal else f"containers with unready status: [{' '.join(unready)}]"
        return [
            cond("PodReadyToStartContainers", self.volumes is not None and not terminal),
            cond("Initialized", not init_pending, "ContainersNotInitialized",
                 f"containers with incomplete status: [{' '.join(init_pending)}]"),
            cond("Ready", not unready, ready_reason, ready_message),
            cond("ContainersReady", not unready, ready_reason, ready_message),
        ]  # fmt: skip

    def read_pod(self) -> dict[str, Any] | None:
        """The pod as the API has it; None once it is gone. The Node authorizer answers 403 for a pod it does not
        relate to this node: one deleted, but also one just bound whose binding its graph has not seen yet (under
        load, a second or more), so a 403 counts as gone only once it persists."""
        deadline = time.monotonic() + 10.0
        while True:
            try:
                return self.api.find(self.pod_path)
            except ApiError as e:
                if e.status != 403:
                    raise
                if time.monotonic() > deadline or self.deleted.is_set():
                    return None
            time.sleep(0.25)

    def write_status(self) -> None:
        status = {
            "phase": self.phase,
            "hostIP": POD_IP,
            "hostIPs": [{"ip": POD_IP}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "conditions": self.conditions(),
            "containerStatuses": [c.status(self.node.kubelet.image_id(c.spec["image"])) for c in self.main],
        }
        if self.init:
            status["initContainerStatuses"] = [c.status(self.node.kubelet.image_id(c.spec["image"])) for c in self.init]
        if self.volume_error:
            for entry in status["containerStatuses"]:
                entry["state"] = {"waiting": {"reason": "ContainerCreating", "message": self.volume_error}}
        if status == self.written:
            return
        for _ in range(10):
            pod = self.read_pod()
            if pod is None or pod["metadata"]["uid"] != self.uid:
                self.deleted.set()
                return
            old = pod.get("status", {})
            ours = {c["type"] for c in status["conditions"]}
            merged = dict(status)
            merged["conditions"] = []
            for entry in status["conditions"]:
                previous = next((o for o in old.get("conditions", []) if o["type"] == entry["type"]), None)
                same = previous and previous["status"] == entry["status"]
                entry["lastTransitionTime"] = previous.get("lastTransitionTime") if same else now()  # type: ignore[union-attr]
                merged["conditions"].append(entry)
            merged["conditions"] += [o for o in old.get("conditions", []) if o["type"] not in ours]
            pod["status"] = {**old, **merged}
            try:
                self.api.replace(self.pod_path + "/status", pod)
                self.written = status
                return
            except ApiError as e:
                if e.status == 404:
                    self.deleted.set()
                    return
                if e.status != 409:
                    raise
        raise RuntimeError(f"could not write the status of pod {self.namespace}/{self.pod_name}")


# -- one node --------------------------------------------------------------------------------------------------------
class NodeAgent:
    """One Node: registration, heartbeats (Lease every 10 s, status every 20 s) and its pods."""

    def __init__(self, kubelet: Kubelet, config: dict[str, Any]):
        self.kubelet, self.config = kubelet, config
        self.name: str = config["name"]
        creds = Credentials(kubelet.server, Path(kubelet.ca), Path(config["cert"]), Path(config["key"]))
        self.api = Api(creds, user_agent=f"stand-in-kubelet/{self.name}")
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.Lock()
        self.started = now()

    def capacity(self) -> dict[str, str]:
        c = self.config
        capacity = {
            "cpu": str(c.get("cpu", "64")),
            "memory": str(c.get("memory", "512Gi")),
            "pods": str(c.get("pods", 110)),
        }
        capacity["ephemeral-storage"] = "1Ti"
        if c.get("gpus"):
            capacity["nvidia.com/gpu"] = str(c["gpus"])
        return capacity

    def register(self) -> None:
        labels = {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
        labels.update(self.config.get("labels") or {})
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.name, "labels": labels}, "spec": {}}
        try:
            self.api.create("/api/v1/nodes", body)
        except ApiError as e:
            if e.status != 409:
                raise
        self.post_status()

    def post_status(self) -> None:
        beat = now()

        def cond(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": beat, "lastTransitionTime": self.started}  # fmt: skip

        status = {
            "capacity": self.capacity(),
            "allocatable": self.capacity(),
            "conditions": [
                cond(
                    "MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"
                ),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "kubelet is posting ready status (stand-in kubelet)"),
            ],
            "addresses": [{"type": "InternalIP", "address": POD_IP}, {"type": "Hostname", "address": self.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, self.name).hex,
                "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, self.name)),
                "bootID": self.kubelet.boot_id,
                "kernelVersion": os.uname().release,
                "osImage": "stand-in kubelet (tests/cluster/kubelet.py)",
                "containerRuntimeVersion": "stand-in://0",
                "kubeletVersion": self.kubelet.version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        self.api.patch(f"/api/v1/nodes/{self.name}/status", {"status": status})

    def renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}"
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": micro_now()}
        if self.api.find(path) is None:
            node = self.api.get(f"/api/v1/nodes/{self.name}")
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": node["metadata"]["uid"]}
            body = {"metadata": {"name": self.name, "ownerReferences": [owner]}, "spec": spec}
            self.api.create("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", body)
        else:
            self.api.patch(path, {"spec": spec})

    def heartbeat(self) -> None:
        last_status = time.monotonic()
        while not self.kubelet.stopping.wait(10.0):
            try:
                self.renew_lease()
                if time.monotonic() - last_status >= 20.0:
                    self.post_status()
                    last_status = time.monotonic()
            except (ApiError, requests.RequestException) as e:
                self.kubelet.log(f"node {self.name}: heartbeat failed: {e}")

    def watch_pods(self) -> None:
        path = "/api/v1/pods"
        for event in self.api.watch(path, self.kubelet.stopping, fieldSelector=f"spec.nodeName={self.name}"):
            pod = event["object"]
            uid = pod["metadata"]["uid"]
            with self.lock:
                worker = self.workers.get(uid)
                if event["type"] == "DELETED":
                    if worker:
                        worker.deleted.set()
                        worker.update(pod)
                    continue
                if worker:
                    worker.update(pod)
                elif pod.get("status", {}).get("phase") not in ("Succeeded", "Failed") or pod["metadata"].get(
                    "deletionTimestamp"
                ):
                    worker = self.workers[uid] = PodWorker(self, pod)
                    worker.start()

    def forget(self, uid: str) -> None:
        with self.lock:
            self.workers.pop(uid, None)

    def run(self) -> None:
        try:
            self.register()
            self.renew_lease()
            threading.Thread(target=self.heartbeat, name=f"heartbeat {self.name}", daemon=True).start()
            self.watch_pods()
        except Exception:
            self.kubelet.log(f"node {self.name}: {traceback.format_exc()}")
            self.kubelet.failed = True
            self.kubelet.stopping.set()  # a node that stopped working: the whole stand-in exits, visibly

    def event(self, pod: dict[str, Any], reason: str, message: str, kind: str = "Normal") -> None:
        meta = pod["metadata"]
        body = {
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {"kind": "Pod", "apiVersion": "v1", "namespace": meta["namespace"],
                               "name": meta["name"], "uid": meta["uid"]},
            "reason": reason, "message": message, "type": kind,
            "source": {"component": "kubelet", "host": self.name},
            "firstTimestamp": now(), "lastTimestamp": now(), "count": 1,
        }  # fmt: skip
        with contextlib.suppress(ApiError, requests.RequestException):
            self.api.create(f"/api/v1/namespaces/{meta['namespace']}/events", body)


# -- the kubelet: what is shared by its nodes ------------------------------------------------------------------------
class Kubelet:
    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.server: str = config["server"]
        self.ca: str = config["ca"]
        self.root = Path(config["root"])
        self.version: str = config.get("version", "v0.0.0")
        self.boot_id = str(uuid.uuid4())
        self.stopping = threading.Event()
        self.failed = False
        self.repo = Path(config.get("repo") or ROOT)
        self.bin = Path(config.get("bin") or self.repo / ".venv" / "bin")
        self.images: dict[str, Image] = {}
        for name, entry in config.get("images", {}).items():
            if "dockerfile" in entry:
                image = Image.from_dockerfile(Path(entry["dockerfile"]))
            else:
                image = Image(user=entry.get("user", ""), stand_in=entry.get("standIn", ""), path=entry.get("path", []))
            self.images[name] = image
        self.nodes = [NodeAgent(self, n) for n in config["nodes"]]
        self.log_lock = threading.Lock()
        self._ips = iter(f"127.1.{i // 250}.{i % 250 + 1}" for i in range(250 * 256))

    def allocate_ip(self) -> str:
        """A pod's own loopback address (127.1.0.1, 127.1.0.2...: the whole of 127/8 is local on Linux)."""
        with self.log_lock:
            return next(self._ips)

    def log(self, message: str) -> None:
        with self.log_lock:
            print(f"{now()} {message}", flush=True)

    def image_id(self, reference: str) -> str:
        return f"stand-in://{image_repository(reference)}"

    def pull(self, reference: str) -> Image:
        image = self.images.get(image_repository(reference))
        if image is None:
            raise ImagePullError(
                f'failed to pull and unpack image "{reference}": not found (the stand-in kubelet knows the images '
                f"{sorted(self.images)})"
            )
        return image

    def log_path(self, worker: PodWorker, c: Container) -> Path:
        path = self.root / "logs" / f"{worker.namespace}_{worker.pod_name}_{c.name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # -- volumes ----------------------------------------------------------------------------------------------------
    def _get(self, api: Api, path: str, what: str, optional: bool) -> dict[str, Any] | None:
        """GET through the Node authorizer (whose graph may lag the pod by a moment: 403 is retried)."""
        for _ in range(20):
            try:
                return api.get(path)
            except ApiError as e:
                if e.status == 404:
                    if optional:
                        return None
                    raise VolumeError(f"{what} not found") from e
                if e.status != 403:
                    raise
                time.sleep(0.25)
        raise VolumeError(f"{what}: forbidden for node")

    def source_data(self, worker: PodWorker, kind: str, name: str, optional: bool) -> dict[str, bytes] | None:
        plural = "configmaps" if kind == "configMap" else "secrets"
        what = f'{"configmap" if kind == "configMap" else "secret"} "{name}"'
        obj = self._get(worker.api, f"/api/v1/namespaces/{worker.namespace}/{plural}/{name}", what, optional)
        if obj is None:
            return None
        if kind == "configMap":
            data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
            return data
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}

    @staticmethod
    def write_file(path: Path, content: bytes, mode: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)

    def keyed_files(self, target: Path, data: dict[str, bytes], items: list[dict] | None, mode: int, what: str) -> None:
        if items:
            for item in items:
                if item["key"] not in data:
                    raise VolumeError(f"configmap or secret {what} has no key {item['key']}")
                self.write_file(target / item["path"], data[item["key"]], item.get("mode", mode))
        else:
            for key, content in data.items():
                self.write_file(target / key, content, mode)

    def field_value(self, worker: PodWorker, field_path: str) -> str:
        meta = worker.pod["metadata"]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", field_path)
        if match:
            return (meta.get(match.group(1)) or {}).get(match.group(2), "")
        values = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": worker.pod["spec"].get("nodeName", ""),
            "spec.serviceAccountName": worker.pod["spec"].get("serviceAccountName", ""),
            **dict.fromkeys(("status.hostIP", "status.hostIPs"), POD_IP),
            **dict.fromkeys(("status.podIP", "status.podIPs"), worker.ip),
        }
        if field_path not in values:
            raise ContainerConfigError(f"unsupported fieldPath: {field_path} (stand-in kubelet)")
        return values[field_path]

    def service_account_token(self, worker: PodWorker, source: dict[str, Any]) -> bytes:
        sa = worker.pod["spec"].get("serviceAccountName") or "default"
        spec: dict[str, Any] = {
            "expirationSeconds": source.get("expirationSeconds", 3600),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": worker.pod_name, "uid": worker.uid},
        }
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        path = f"/api/v1/namespaces/{worker.namespace}/serviceaccounts/{sa}/token"
        for _ in range(20):
            try:
                return worker.api.create(path, {"spec": spec})["status"]["token"].encode()
            except ApiError as e:
                if e.status != 403:
                    raise VolumeError(f"failed to fetch token: {e.message}") from e
                time.sleep(0.25)
        raise VolumeError(f"failed to fetch token: forbidden for node {worker.node.name}")

    def prepare_volumes(self, worker: PodWorker) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        for volume in worker.pod["spec"].get("volumes") or []:
            name = volume["name"]
            target = worker.dir / "volumes" / name
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            paths[name] = target
            if "emptyDir" in volume:
                target.chmod(0o777)
            elif "configMap" in volume or "secret" in volume:
                kind = "configMap" if "configMap" in volume else "secret"
                src = volume[kind]
                ref = src.get("name") or src.get("secretName")
                data = self.source_data(worker, kind, ref, src.get("optional", False)) or {}
                self.keyed_files(target, data, src.get("items"), src.get("defaultMode", 0o644), ref)
            elif "projected" in volume:
                mode = volume["projected"].get("defaultMode", 0o644)
                for source in volume["projected"].get("sources") or []:
                    if "serviceAccountToken" in source:
                        sat = source["serviceAccountToken"]
                        self.write_file(target / sat["path"], self.service_account_token(worker, sat), mode)
                    elif "configMap" in source or "secret" in source:
                        kind = "configMap" if "configMap" in source else "secret"
                        src = source[kind]
                        data = self.source_data(worker, kind, src["name"], src.get("optional", False)) or {}
                        self.keyed_files(target, data, src.get("items"), mode, src["name"])
                    elif "downwardAPI" in source:
                        for item in source["downwardAPI"].get("items") or []:
                            value = self.field_value(worker, item["fieldRef"]["fieldPath"])
                            self.write_file(target / item["path"], value.encode(), item.get("mode", mode))
                    else:
                        raise VolumeError(f"volume {name}: projected source {sorted(source)} not supported (stand-in)")
            else:
                kinds = sorted(k for k in volume if k != "name")
                raise VolumeError(f"volume {name}: {kinds} volumes are not supported by the stand-in kubelet")
        return paths

    # -- the container's process: argv, env, mounts, user ----------------------------------------------------------
    def container_env(self, worker: PodWorker, c: Container, image: Image) -> dict[str, str]:
        port = self.server.rsplit(":", 1)[1]
        env = {
            "PATH": ":".join([*image.path, str(self.bin), "/usr/local/bin", "/usr/bin", "/bin"]),
            "HOSTNAME": worker.pod_name,
            **image.env,
            # the image has the project installed; here it is the checkout (and the pod network's stand-in)
            "PYTHONPATH": f"{PODNET}:{self.repo}:{self.repo / 'operator'}",
            PODNET_ENV: worker.ip,
            **STAND_IN_ENV,
            "KUBERNETES_SERVICE_HOST": POD_IP,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://{POD_IP}:{port}",
        }
        for source in c.spec.get("envFrom") or []:
            kind = "configMap" if "configMapRef" in source else "secret"
            ref = source.get("configMapRef") or source.get("secretRef") or {}
            try:
                data = self.source_data(worker, kind, ref["name"], ref.get("optional", False)) or {}
            except VolumeError as e:
                raise ContainerConfigError(str(e)) from e
            for key, value in data.items():
                env[source.get("prefix", "") + key] = value.decode()
        for var in c.spec.get("env") or []:
            if "valueFrom" not in var:
                env[var["name"]] = expand(var.get("value", ""), env)
                continue
            source = var["valueFrom"]
            if "fieldRef" in source:
                env[var["name"]] = self.field_value(worker, source["fieldRef"]["fieldPath"])
            else:
                kind = "configMap" if "configMapKeyRef" in source else "secret"
                ref = source.get("configMapKeyRef") or source.get("secretKeyRef") or {}
                label = "ConfigMap" if kind == "configMap" else "Secret"
                try:
                    data = self.source_data(worker, kind, ref["name"], ref.get("optional", False))
                except VolumeError as e:
                    raise ContainerConfigError(str(e)) from e
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise ContainerConfigError(
                        f"couldn't find key {ref['key']} in {label} {worker.namespace}/{ref['name']}"
                    )
                env[var["name"]] = data[ref["key"]].decode()
        for name in MASTER_HOST_VARS:
            if name in env and not re.fullmatch(r"[\d.]+|[\da-fA-F:]+", env[name]):
                env[name] = POD_IP  # stand-in for cluster DNS: the master's Service resolves to this machine
        return env

    def container_spec(self, worker: PodWorker, c: Container, image: Image) -> dict[str, Any]:
        spec, pod_spec = c.spec, worker.pod["spec"]
        pod_sc, sc = pod_spec.get("securityContext") or {}, spec.get("securityContext") or {}
        run_as_user = sc.get("runAsUser", pod_sc.get("runAsUser"))
        run_as_group = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
        image_uid, image_gid, image_user = image.uid_gid()
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            who = f"(pod: {json.dumps(f'{worker.pod_name}_{worker.namespace}({worker.uid})')}, container: {c.name})"
            if run_as_user is not None:
                if run_as_user == 0:
                    raise ContainerConfigError(f"container's runAsUser breaks non-root policy {who}")
            elif image_uid is None:
                raise ContainerConfigError(
                    f"container has runAsNonRoot and image has non-numeric user ({image_user}), cannot verify user "
                    f"is non-root {who}"
                )
            elif image_uid == 0:
                raise ContainerConfigError(f"container has runAsNonRoot and image will run as root {who}")
        uid = run_as_user if run_as_user is not None else (image_uid or 0)
        gid = run_as_group if run_as_group is not None else (image_gid if run_as_user is None and image_gid else 0)
        groups = [gid, *pod_sc.get("supplementalGroups", [])]
        if pod_sc.get("fsGroup") is not None:
            groups.append(pod_sc["fsGroup"])

        env = self.container_env(worker, c, image)
        command = spec.get("command") or image.entrypoint
        args = spec.get("args") if spec.get("args") is not None else ([] if spec.get("command") else image.cmd)
        argv = [expand(a, env) for a in [*command, *args]]
        if not argv:
            raise ContainerConfigError("no command specified")
        argv[0] = self.resolve(argv[0], env["PATH"])

        cdir = worker.dir / "containers" / c.name
        cdir.mkdir(parents=True, exist_ok=True)
        termination_log = cdir / "termination-log"
        termination_log.touch()
        termination_log.chmod(0o666)
        mounts = [
            {"source": str(termination_log), "target": spec.get("terminationMessagePath", "/dev/termination-log")}
        ]
        # The image's HOME and WORKDIR: per-container writable folders (stand-in for the image's filesystem).
        cwd = spec.get("workingDir") or image.workdir or "/"
        for place in {env.get("HOME", ""), cwd} - {"", "/"}:
            if not Path(place).exists() or place.startswith("/home/"):
                folder = cdir / "fs" / place.strip("/")
                folder.mkdir(parents=True, exist_ok=True)
                os.chown(folder, uid, gid)
                mounts.append({"source": str(folder), "target": place})
        mounts += self.reveal(uid)
        for mount in spec.get("volumeMounts") or []:
            source = worker.volumes[mount["name"]]  # type: ignore[index]
            if mount.get("subPath"):
                source = source / mount["subPath"]
            mounts.append(
                {"source": str(source), "target": mount["mountPath"], "readOnly": mount.get("readOnly", False)}
            )
        mounts += self.keep_visible([m["mountPath"] for m in spec.get("volumeMounts") or []])
        return {"argv": argv, "env": env, "cwd": cwd, "uid": uid, "gid": gid, "groups": groups, "mounts": mounts}

    def reveal(self, uid: int) -> list[dict[str, Any]]:
        """Mounts that let a non-root container reach the host's Python and the checkout: a folder on the way that
        only root may enter (e.g. /root above a pyenv install) becomes, in the container's namespace only, an empty
        tmpfs holding just those paths."""
        if uid == 0:
            return []
        mounts: list[dict[str, Any]] = []
        for path in self.host_paths():
            for ancestor in reversed(path.parents):
                if not ancestor.stat().st_mode & 0o001:
                    if {"target": str(ancestor), "tmpfs": True} not in mounts:
                        mounts.append({"target": str(ancestor), "tmpfs": True})
                    mounts.append({"source": str(path), "target": str(path), "readOnly": True})
                    break
        return mounts

    def host_paths(self) -> list[Path]:
        """What stands in for the image's files: the host's Python, the venv and the checkout."""
        return sorted({Path(sys.base_prefix).resolve(), self.repo.resolve(), self.bin.resolve().parent})

    def keep_visible(self, volume_targets: list[str]) -> list[dict[str, Any]]:
        """A volume mounted over a folder that holds the host's Python, venv or checkout (an emptyDir at /tmp, with
        the checkout under /tmp) would hide the stand-in's "image": bind those paths again on top of it (the shim
        mounts parents before children). In a real container the image's files are elsewhere than its volumes."""
        targets = [Path(t) for t in volume_targets]
        return [
            {"source": str(path), "target": str(path)}
            for path in self.host_paths()
            if any(t == path or t in path.parents for t in targets)
        ]

    def resolve(self, program: str, path: str) -> str:
        if "/" in program:
            if Path(program).exists():
                return program
            program = Path(program).name  # an image path, e.g. /opt/spin/bin/spin: the venv's instead
        found = shutil.which(program, path=path)
        return found or program

    # -- main -------------------------------------------------------------------------------------------------------
    def run(self) -> None:
        threads = [threading.Thread(target=n.run, name=f"node {n.name}", daemon=True) for n in self.nodes]
        for t in threads:
            t.start()
        self.log(f"stand-in kubelet: nodes {[n.name for n in self.nodes]} registered against {self.server}")
        self.stopping.wait()
        for node in self.nodes:
            for worker in list(node.workers.values()):
                for c in [*worker.init, *worker.main]:
                    if c.proc is not None:
                        worker.stop(c, 2.0)


def expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion: defined variables are replaced, $$(VAR) escapes, undefined ones stay."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        value,
    )


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    kubelet = Kubelet(config)
    signal.signal(signal.SIGTERM, lambda *_: kubelet.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: kubelet.stopping.set())
    kubelet.run()
    sys.exit(1 if kubelet.failed else 0)


if __name__ == "__main__":
    main()

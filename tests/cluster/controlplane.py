"""A real Kubernetes control plane on this machine, for the tests: `ControlPlane(workdir).start()`.

Real components, built from Go modules by tests/cluster/build.py: etcd; kube-apiserver (secure serving, client
certificates, Node+RBAC authorization, ServiceAccount tokens signed with a key generated here, the default admission
plugins plus NodeRestriction); kube-controller-manager (every default controller: Job, garbage collector, namespace,
serviceaccount, deployment, replicaset, node lifecycle, root CA publisher...; each controller with its own
ServiceAccount credentials); kube-scheduler; the Kubeflow Training Operator v1.9.4 (PyTorchJob controller and its
validating webhook, reached by the apiserver at https://127.0.0.1:<port> with a CA made here), running as its
ServiceAccount with its upstream ClusterRole. The one stand-in is the kubelet (tests/cluster/kubelet.py).

Every component listens on free loopback ports and logs to `<workdir>/logs/<component>.log`; `python -m
tests.cluster.controlplane` starts one and prints its kubeconfig, for poking at by hand.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from tests.cluster import build, pki
from tests.cluster.api import Api, ApiError, Credentials

ROOT = Path(__file__).resolve().parent.parent.parent
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.96.0.0/16"
TRAINING_NAMESPACE = "kubeflow"
TRAINING_WEBHOOK = "validator.training-operator.kubeflow.org"  # the name the operator's cert rotator looks for
TRAINING_CERT_DIR = "/tmp/k8s-webhook-server/serving-certs"  # hard-coded in the operator (pkg/cert/cert.go)
START_TIMEOUT = 180.0
STOP_GRACE = 10.0


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies, so a crashed session leaves no component behind."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class NodeSpec:
    name: str
    cpu: str = "64"
    memory: str = "512Gi"
    pods: int = 110
    gpus: int = 0
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Component:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class ControlPlane:
    workdir: Path
    nodes: list[NodeSpec] = field(default_factory=lambda: [NodeSpec("node-1")])
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    training_operator: bool = True
    apiserver_args: list[str] = field(default_factory=list)
    """Extra kube-apiserver flags (e.g. an audit log, for the latency benchmark)."""
    components: dict[str, Component] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pki_dir = self.workdir / "pki"
        self.logs = self.workdir / "logs"
        self.kubelet_root = self.workdir / "kubelet"
        for d in (self.pki_dir, self.logs, self.kubelet_root):
            d.mkdir(parents=True, exist_ok=True)
        self.kubeconfig = self.workdir / "admin.kubeconfig"

    # -- life cycle ---------------------------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> None:
        started = time.monotonic()
        kube = build.build("kube", log=lambda _m: None) / "bin"
        self.bins = {n: kube / n for n in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")}
        if self.training_operator:
            self.training_dir = build.build("training-operator", log=lambda _m: None)
        names = (
            "etcd",
            "etcd-peer",
            "apiserver",
            "controller-manager",
            "scheduler",
            "webhook",
            "to-metrics",
            "to-health",
        )
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.make_pki()
        self.start_etcd()
        self.wait("etcd", lambda: requests.get(f"http://127.0.0.1:{self.ports['etcd']}/health", timeout=2).ok, timeout)
        self.start_apiserver()
        self.api = Api(self.admin, user_agent="spin-tests")
        self.wait(
            "kube-apiserver /readyz", lambda: self.api.session.get(f"{self.server}/readyz", timeout=5).ok, timeout
        )
        self.start_controller_manager()
        self.start_scheduler()
        self.start_kubelet()
        for name in ("controller-manager", "scheduler"):
            url = f"https://127.0.0.1:{self.ports[name]}/healthz"
            self.wait(f"kube-{name} /healthz", lambda u=url: self.api.session.get(u, timeout=2).ok, timeout)
        for what, path in (
            ("the default ServiceAccount", "/api/v1/namespaces/default/serviceaccounts/default"),
            ("the kube-root-ca.crt ConfigMap", "/api/v1/namespaces/default/configmaps/kube-root-ca.crt"),
        ):
            self.wait(what, lambda p=path: self.api.find(p), timeout)
        for node in self.nodes:
            self.wait(f"node {node.name} Ready", lambda n=node.name: self.node_ready(n), timeout)
        if self.training_operator:
            self.start_training_operator()
            url = f"http://127.0.0.1:{self.ports['to-health']}/readyz"
            self.wait("the Training Operator /readyz", lambda: requests.get(url, timeout=2).ok, timeout)
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        """SIGTERM to every component's process group (the kubelet stops its containers), SIGKILL after a grace."""
        for component in reversed(list(self.components.values())):
            if component.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(component.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for component in self.components.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                component.process.wait(max(0.1, deadline - time.monotonic()))
            if component.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(component.process.pid, signal.SIGKILL)
                component.process.wait()

    def __enter__(self) -> ControlPlane:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers ------------------------------------------------------------------------------------------------
    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=cwd or self.workdir,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        self.components[name] = Component(name, process, log)

    def wait(self, what: str, probe: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            dead = [c.name for c in self.components.values() if c.process.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}\n{self.log_tails()}")
            try:
                result = probe()
                if result:
                    return result
            except (ApiError, requests.RequestException, OSError) as e:
                last = e
            time.sleep(0.25)
        raise TimeoutError(
            f"timed out after {timeout:.0f} s waiting for {what} (last error: {last})\n{self.log_tails()}"
        )

    def log_tails(self, lines: int = 40) -> str:
        """The last lines of every component's log (for failure messages)."""
        parts = []
        for log in sorted(self.logs.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"----- {log.name} (last {len(tail)} lines) -----\n" + "\n".join(tail))
        return "\n".join(parts)

    def node_ready(self, name: str) -> bool:
        node = self.api.find(f"/api/v1/nodes/{name}")
        conditions = (node or {}).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    # -- certificates -------------------------------------------------------------------------------------------
    def make_pki(self) -> None:
        d = self.pki_dir
        self.ca = pki.new_ca("spin-test-cluster-ca")
        self.ca_file = d / "ca.crt"
        self.ca_file.write_bytes(self.ca.cert_pem)
        (d / "ca.key").write_bytes(self.ca.key_pem())
        serving = pki.issue(
            self.ca,
            "kube-apiserver",
            server=True,
            dns_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                       "kubernetes.default.svc.cluster.local"),
            ips=("127.0.0.1", "10.96.0.1"),
        )  # fmt: skip
        serving.write(d, "apiserver")
        for component in ("kube-controller-manager", "kube-scheduler"):
            pki.issue(self.ca, component, server=True, dns_names=("localhost",), ips=("127.0.0.1",)).write(
                d, f"{component}-serving"
            )
        # The front proxy's CA (requestheader authentication), as kubeadm sets it up: the controller-manager's and
        # scheduler's delegated authentication read it from the extension-apiserver-authentication ConfigMap.
        front_proxy = pki.new_ca("front-proxy-ca")
        (d / "front-proxy-ca.crt").write_bytes(front_proxy.cert_pem)
        pki.issue(front_proxy, "front-proxy-client", client=True).write(d, "front-proxy-client")
        sa_key = pki.new_key()
        (d / "sa.key").write_bytes(pki.key_pem(sa_key))
        (d / "sa.pub").write_bytes(pki.public_pem(sa_key))
        self.server = f"https://127.0.0.1:{self.ports['apiserver']}"
        self.admin = self.client_credentials("admin", "spin-test-admin", ("system:masters",))
        self.admin.kubeconfig(self.kubeconfig)
        for user in ("kube-controller-manager", "kube-scheduler"):
            self.client_credentials(user, f"system:{user}").kubeconfig(d / f"{user}.kubeconfig", user)

    def client_credentials(self, stem: str, user: str, groups: tuple[str, ...] = ()) -> Credentials:
        cert, key = pki.issue(self.ca, user, groups, client=True).write(self.pki_dir, stem)
        return Credentials(self.server, self.ca_file, cert, key)

    # -- components ---------------------------------------------------------------------------------------------
    def start_etcd(self) -> None:
        client, peer = (f"http://127.0.0.1:{self.ports[p]}" for p in ("etcd", "etcd-peer"))
        self.spawn("etcd", [
            str(self.bins["etcd"]), "--name=default", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            # test data: no fsync (a loaded 2-core machine would otherwise crawl), quiet logs
            "--unsafe-no-fsync", "--log-level=warn",
        ])  # fmt: skip

    def start_apiserver(self) -> None:
        d = self.pki_dir
        self.spawn("kube-apiserver", [
            str(self.bins["kube-apiserver"]),
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports['apiserver']}", "--advertise-address=127.0.0.1",
            # the `kubernetes` Service's endpoints would be 127.0.0.1, which Endpoints validation refuses
            "--endpoint-reconciler-type=none",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={d / 'apiserver.crt'}", f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--client-ca-file={self.ca_file}",
            "--authorization-mode=Node,RBAC",
            # on top of the default admission plugins, what kubeadm adds
            "--enable-admission-plugins=NodeRestriction",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={d / 'sa.pub'}", f"--service-account-signing-key-file={d / 'sa.key'}",
            f"--requestheader-client-ca-file={d / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client", "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group", "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={d / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={d / 'front-proxy-client.key'}",
            "--allow-privileged=true", "--profiling=false", "--v=1", *self.apiserver_args,
        ])  # fmt: skip

    def start_controller_manager(self) -> None:
        d = self.pki_dir
        config = d / "kube-controller-manager.kubeconfig"
        self.spawn("kube-controller-manager", [
            str(self.bins["kube-controller-manager"]),
            f"--kubeconfig={config}", f"--authentication-kubeconfig={config}", f"--authorization-kubeconfig={config}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports['controller-manager']}",
            f"--tls-cert-file={d / 'kube-controller-manager-serving.crt'}",
            f"--tls-private-key-file={d / 'kube-controller-manager-serving.key'}",
            "--leader-elect=false", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={d / 'sa.key'}", f"--root-ca-file={self.ca_file}",
            f"--cluster-signing-cert-file={self.ca_file}", f"--cluster-signing-key-file={d / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--profiling=false", "--v=1",
        ])  # fmt: skip

    def start_scheduler(self) -> None:
        config = self.pki_dir / "kube-scheduler.kubeconfig"
        self.spawn("kube-scheduler", [
            str(self.bins["kube-scheduler"]),
            f"--kubeconfig={config}", f"--authentication-kubeconfig={config}", f"--authorization-kubeconfig={config}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports['scheduler']}",
            f"--tls-cert-file={self.pki_dir / 'kube-scheduler-serving.crt'}",
            f"--tls-private-key-file={self.pki_dir / 'kube-scheduler-serving.key'}",
            "--leader-elect=false", "--profiling=false", "--v=1",
        ])  # fmt: skip

    def start_kubelet(self) -> None:
        nodes = []
        for node in self.nodes:
            creds = self.client_credentials(f"node-{node.name}", f"system:node:{node.name}", ("system:nodes",))
            nodes.append({**node.__dict__, "cert": str(creds.cert), "key": str(creds.key)})
        config = {
            "server": self.server,
            "ca": str(self.ca_file),
            "root": str(self.kubelet_root),
            "version": build.KUBE_VERSION,
            "repo": str(ROOT),
            "nodes": nodes,
            "images": self.images,
        }
        path = self.workdir / "kubelet.json"
        path.write_text(json.dumps(config, indent=1))
        self.spawn("kubelet", [sys.executable, "-m", "tests.cluster.kubelet", str(path)],
                   env={"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}, cwd=ROOT)  # fmt: skip

    # -- the Kubeflow Training Operator -------------------------------------------------------------------------
    def start_training_operator(self) -> None:
        api, ns = self.api, TRAINING_NAMESPACE
        for crd in sorted((self.training_dir / "crds").glob("kubeflow.org_*.yaml")):
            api.apply(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{yaml.safe_load(crd.read_text())['metadata']['name']}",
                      yaml.safe_load(crd.read_text()))  # fmt: skip
        api.apply(f"/api/v1/namespaces/{ns}", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "training-operator", "namespace": ns}}
        api.apply(f"/api/v1/namespaces/{ns}/serviceaccounts/training-operator", sa)
        role = yaml.safe_load((self.training_dir / "rbac" / "role.yaml").read_text())
        api.apply("/apis/rbac.authorization.k8s.io/v1/clusterroles/training-operator", role)
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "training-operator"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "training-operator"},
            "subjects": [{"kind": "ServiceAccount", "name": "training-operator", "namespace": ns}],
        }
        api.apply("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/training-operator", binding)

        # The webhook's certificates, made here so the apiserver can reach it at https://127.0.0.1 (no Service
        # routing without a kube-proxy): the operator's cert rotator finds them valid in its Secret and keeps them.
        ca = pki.new_ca("training-operator-ca", dns_names=("training-operator-ca",), key_kind="rsa")
        serving = pki.issue(ca, f"training-operator.{ns}.svc", server=True,
                            dns_names=(f"training-operator.{ns}.svc",), ips=("127.0.0.1",))  # fmt: skip
        certs = self.workdir / "training-operator-certs"
        certs.mkdir(exist_ok=True)
        (certs / "tls.crt").write_bytes(serving.cert_pem)
        (certs / "tls.key").write_bytes(serving.key_pem())
        (certs / "ca.crt").write_bytes(ca.cert_pem)
        secret_data = {"ca.crt": ca.cert_pem, "ca.key": ca.key_pem(pkcs1=True), "tls.crt": serving.cert_pem,
                       "tls.key": serving.key_pem()}  # fmt: skip
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "training-operator-webhook-cert", "namespace": ns},
            "data": {k: base64.b64encode(v).decode() for k, v in secret_data.items()},
        }
        api.apply(f"/api/v1/namespaces/{ns}/secrets/training-operator-webhook-cert", secret)
        api.apply(f"/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/{TRAINING_WEBHOOK}",
                  self.training_webhook(ca.cert_pem))  # fmt: skip

        token_request = {"spec": {"expirationSeconds": 86400}}
        token = api.create(f"/api/v1/namespaces/{ns}/serviceaccounts/training-operator/token", token_request)
        config = Credentials(self.server, self.ca_file, token=token["status"]["token"])
        kubeconfig = config.kubeconfig(self.workdir / "training-operator.kubeconfig", "training-operator")
        argv = [
            str(self.training_dir / "bin" / "training-operator"),
            "--enable-scheme=pytorchjob",
            f"--webhook-server-port={self.ports['webhook']}",
            f"--metrics-bind-address=127.0.0.1:{self.ports['to-metrics']}",
            f"--health-probe-bind-address=127.0.0.1:{self.ports['to-health']}",
        ]
        # Its cert directory is a fixed path: a private mount namespace (the kubelet stand-in's shim) puts ours there.
        spec = {
            "argv": argv,
            "env": {"KUBECONFIG": str(kubeconfig), "MY_POD_NAMESPACE": ns, "PATH": "/usr/bin:/bin"},
            "cwd": str(self.workdir),
            "uid": 0,
            "gid": 0,
            "groups": [],
            "mounts": [{"source": str(certs), "target": TRAINING_CERT_DIR, "readOnly": True}],
        }
        spec_file = self.workdir / "training-operator.json"
        spec_file.write_text(json.dumps(spec))
        self.spawn(
            "training-operator", [sys.executable, "-I", str(ROOT / "tests" / "cluster" / "shim.py"), str(spec_file)]
        )

    def training_webhook(self, ca_pem: bytes) -> dict[str, Any]:
        """The operator's own ValidatingWebhookConfiguration (manifests/base/webhook), for PyTorchJobs, by URL."""
        upstream = yaml.safe_load((self.training_dir / "webhook" / "manifests.yaml").read_text())
        hook = copy.deepcopy(next(w for w in upstream["webhooks"] if "pytorchjob" in w["name"]))
        path = hook["clientConfig"]["service"]["path"]
        hook["clientConfig"] = {
            "url": f"https://127.0.0.1:{self.ports['webhook']}{path}",
            "caBundle": base64.b64encode(ca_pem).decode(),
        }
        return {**upstream, "metadata": {"name": TRAINING_WEBHOOK}, "webhooks": [hook]}


def main() -> None:
    """Start a control plane in a temporary folder and keep it up until Ctrl-C."""
    import tempfile

    from tests.fixtures.cluster import default_images

    workdir = Path(tempfile.mkdtemp(prefix="spin-cluster-"))
    with ControlPlane(workdir, images=default_images()) as cp:
        print(f"up in {cp.startup_seconds:.1f} s\nexport KUBECONFIG={cp.kubeconfig}\nlogs: {cp.logs}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()

"""Kueue v0.17.0's controller-manager on the test control plane: `KueueManager(control_plane).start()`.

Real: the `kueue` binary built from sigs.k8s.io/kueue v0.17.0 (tests/cluster/build.py), installed the way its
release manifests install it, from the files of its own module (config/components/, copied out at build time):
its CRDs; its upstream ClusterRole (`manager-role`, kustomize's `kueue-` prefix added) bound to the ServiceAccount
`kueue-system/kueue-controller-manager`, whose token from the TokenRequest API is all it authenticates with; its
mutating and validating webhooks; and its Configuration (config/components/manager), changed only where a pod
network or a cert-manager is missing here:

- `internalCertManagement.enable: false` with a serving certificate made here, and the webhooks registered with
  `clientConfig.url: https://127.0.0.1:<port>/...` (no Service routing without a kube-proxy), like the Training
  Operator's (tests/cluster/controlplane.py); the metrics certificate goes to the path Kueue reads it from
  (/etc/kueue/metrics/certs), bind-mounted there by tests/cluster/shim.py in a private mount namespace;
- every address on 127.0.0.1 and free ports, no leader election, `integrations.frameworks` = `batch/job` and
  `kubeflow.org/pytorchjob` (what the operator's children need);
- of the webhooks, those for Kueue's own kinds and for the enabled integrations' kinds: Kueue serves the others
  (pods, deployments, statefulsets, other frameworks) with no-op handlers while their integration is off, and
  registering them would only put every pod of the cluster behind this one process;
- the on-demand visibility API (an aggregated API server behind an APIService) off (`VisibilityOnDemand=false`):
  the aggregation layer cannot reach it here and nothing here reads it;
- the CRDs without the conversion-webhook patch (strategy None): everything here uses v1beta2, their storage
  version, so no conversion is ever asked for.

`stop()` removes the webhook configurations first, so that the control plane works on without Kueue.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from tests.cluster import build, pki
from tests.cluster.api import ApiError, Credentials, path_of
from tests.cluster.controlplane import ROOT, ControlPlane, free_ports

NAMESPACE = "kueue-system"
PREFIX = "kueue-"  # config/default's namePrefix
SERVICE_ACCOUNT = "kueue-controller-manager"
RBAC_FILES = ("service_account.yaml", "role.yaml", "role_binding.yaml", "manager_secrets_role.yaml",
              "manager_secrets_role_binding.yaml")  # fmt: skip
METRICS_CERT_DIR = "/etc/kueue/metrics/certs"  # fixed in cmd/kueue/main.go when internalCertManagement is off
INTEGRATIONS = ("batch/job", "kubeflow.org/pytorchjob")
# Which webhooks to register: Kueue's own kinds, and the kinds of the enabled integrations.
WEBHOOK_RESOURCES = {"kueue.x-k8s.io": None, "batch": {"jobs"}, "kubeflow.org": {"pytorchjobs"}}
GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
START_TIMEOUT = 180.0


def kueue_path(plural: str, name: str | None = None, namespace: str | None = None) -> str:
    """API path of a kueue.x-k8s.io/v1beta2 object (or collection)."""
    base = f"/apis/{GROUP}/{VERSION}" + (f"/namespaces/{namespace}" if namespace else "")
    return f"{base}/{plural}" + (f"/{name}" if name else "")


@dataclass
class KueueManager:
    cp: ControlPlane
    integrations: tuple[str, ...] = INTEGRATIONS
    ports: dict[str, int] = field(default_factory=dict)
    webhooks: list[str] = field(default_factory=list)  # paths of the webhook configurations registered

    name = "kueue"

    def start(self, timeout: float = START_TIMEOUT) -> None:
        started = time.monotonic()
        self.dir = build.build("kueue", log=lambda _m: None)
        self.workdir = self.cp.workdir / "kueue"
        self.workdir.mkdir(exist_ok=True)
        self.ports = dict(zip(("webhook", "health", "metrics"), free_ports(3), strict=True))
        self.install_crds(timeout)
        self.install_rbac()
        ca = self.make_certs()
        self.spawn()
        url = f"http://127.0.0.1:{self.ports['health']}/readyz"
        self.cp.wait("Kueue's /readyz", lambda: requests.get(url, timeout=2).ok, timeout)
        self.register_webhooks(ca.cert_pem)
        self.startup_seconds = time.monotonic() - started

    @property
    def log(self) -> Path:
        return self.cp.logs / f"{self.name}.log"

    def log_tail(self, lines: int = 80) -> str:
        text = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return f"----- {self.log.name} (last {min(lines, len(text))} lines) -----\n" + "\n".join(text[-lines:])

    # -- installation -------------------------------------------------------------------------------------------
    def install_crds(self, timeout: float) -> None:
        api = self.cp.api
        names = []
        for path in sorted((self.dir / "crds").glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            names.append(crd["metadata"]["name"])
            api.apply(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{names[-1]}", crd)
        for name in names:
            self.cp.wait(f"the CRD {name} Established", lambda n=name: self._established(n), timeout)

    def _established(self, name: str) -> bool:
        crd = self.cp.api.find(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}") or {}
        conditions = (crd.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    def install_rbac(self) -> None:
        """Upstream's ServiceAccount, ClusterRole and namespaced secrets Role with their bindings
        (config/components/rbac), renamed as config/default does (namespace kueue-system, prefix kueue-). Leader
        election is off, so its Role is not needed."""
        api = self.cp.api
        if not api.find(f"/api/v1/namespaces/{NAMESPACE}"):
            api.create("/api/v1/namespaces", {"metadata": {"name": NAMESPACE}})
        for name in RBAC_FILES:
            obj = yaml.safe_load((self.dir / "rbac" / name).read_text())
            obj["metadata"]["name"] = PREFIX + obj["metadata"]["name"]
            if "namespace" in obj["metadata"]:
                obj["metadata"]["namespace"] = NAMESPACE
            if "roleRef" in obj:
                obj["roleRef"]["name"] = PREFIX + obj["roleRef"]["name"]
            for subject in obj.get("subjects", []):
                subject.update(name=PREFIX + subject["name"], namespace=NAMESPACE)
            api.apply(path_of(obj), obj)

    def make_certs(self) -> pki.Issued:
        ca = pki.new_ca("kueue-webhook-ca")
        for what in ("webhook", "metrics"):
            serving = pki.issue(ca, f"kueue-{what}-service.{NAMESPACE}.svc", server=True,
                                dns_names=(f"kueue-{what}-service.{NAMESPACE}.svc",), ips=("127.0.0.1",))  # fmt: skip
            d = self.workdir / f"{what}-certs"
            d.mkdir(exist_ok=True)
            (d / "tls.crt").write_bytes(serving.cert_pem)
            (d / "tls.key").write_bytes(serving.key_pem())
            (d / "ca.crt").write_bytes(ca.cert_pem)
        return ca

    def configuration(self) -> dict[str, Any]:
        """Upstream's Configuration (config/components/manager/controller_manager_config.yaml), changed as the module
        docstring says."""
        config = yaml.safe_load((self.dir / "manager" / "controller_manager_config.yaml").read_text())
        config["namespace"] = NAMESPACE
        config["health"]["healthProbeBindAddress"] = f"127.0.0.1:{self.ports['health']}"
        config["metrics"]["bindAddress"] = f"127.0.0.1:{self.ports['metrics']}"
        config["webhook"] = {
            "host": "127.0.0.1",
            "port": self.ports["webhook"],
            "certDir": str(self.workdir / "webhook-certs"),
        }
        config["leaderElection"]["leaderElect"] = False
        config["internalCertManagement"] = {"enable": False}
        config["integrations"]["frameworks"] = list(self.integrations)
        return config

    def spawn(self) -> None:
        api = self.cp.api
        token = api.create(f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{SERVICE_ACCOUNT}/token",
                           {"spec": {"expirationSeconds": 86400}})["status"]["token"]  # fmt: skip
        kubeconfig = Credentials(self.cp.server, self.cp.ca_file, token=token).kubeconfig(
            self.workdir / "kubeconfig", SERVICE_ACCOUNT
        )
        config_file = self.workdir / "controller_manager_config.yaml"
        config_file.write_text(yaml.safe_dump(self.configuration()))
        argv = [
            str(self.dir / "bin" / "kueue"),
            f"--config={config_file}",
            "--feature-gates=VisibilityOnDemand=false",
            "--zap-log-level=2",  # upstream's manager.yaml
        ]
        spec = {
            "argv": argv,
            "env": {"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin"},
            "cwd": str(self.workdir),
            "uid": 0,
            "gid": 0,
            "groups": [],
            "mounts": [{"source": str(self.workdir / "metrics-certs"), "target": METRICS_CERT_DIR, "readOnly": True}],
        }
        spec_file = self.workdir / "shim.json"
        spec_file.write_text(json.dumps(spec))
        self.cp.spawn(self.name, [sys.executable, "-I", str(ROOT / "tests" / "cluster" / "shim.py"), str(spec_file)])

    def register_webhooks(self, ca_pem: bytes) -> None:
        """Upstream's webhook configurations (config/components/webhook/manifests.yaml), by URL (see the docstring)."""
        bundle = base64.b64encode(ca_pem).decode()
        for upstream in yaml.safe_load_all((self.dir / "webhook" / "manifests.yaml").read_text()):
            config = copy.deepcopy(upstream)
            config["metadata"] = {"name": PREFIX + upstream["metadata"]["name"]}
            config["webhooks"] = []
            for hook in upstream["webhooks"]:
                if not all(self._wanted(rule) for rule in hook["rules"]):
                    continue
                hook = copy.deepcopy(hook)
                path = hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {"url": f"https://127.0.0.1:{self.ports['webhook']}{path}", "caBundle": bundle}
                config["webhooks"].append(hook)
            plural = config["kind"].lower() + "s"
            path = f"/apis/admissionregistration.k8s.io/v1/{plural}/{config['metadata']['name']}"
            self.cp.api.apply(path, config)
            self.webhooks.append(path)

    @staticmethod
    def _wanted(rule: dict[str, Any]) -> bool:
        for group in rule["apiGroups"]:
            if group not in WEBHOOK_RESOURCES:
                return False
            wanted = WEBHOOK_RESOURCES[group]
            if wanted is not None and not set(rule["resources"]) <= wanted:
                return False
        return True

    # -- teardown -----------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Unregister the webhooks, stop the process, and drop Kueue's finalizers from what is left of its objects
        (Workloads of namespaces being deleted, queues being deleted: they would stay Terminating for ever)."""
        api = self.cp.api
        for path in self.webhooks:
            with contextlib.suppress(ApiError, requests.RequestException):
                api.delete(path)
        component = self.cp.components.pop(self.name, None)
        if component is not None and component.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(component.process.pid, signal.SIGTERM)
            try:
                component.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(component.process.pid, signal.SIGKILL)
                component.process.wait()
        with contextlib.suppress(ApiError, requests.RequestException):
            for wl in api.get(kueue_path("workloads"))["items"]:
                if wl["metadata"].get("finalizers"):
                    api.patch(kueue_path("workloads", wl["metadata"]["name"], wl["metadata"]["namespace"]),
                              {"metadata": {"finalizers": None}})  # fmt: skip
            for plural in ("clusterqueues", "resourceflavors"):
                for obj in api.get(kueue_path(plural))["items"]:
                    if obj["metadata"].get("deletionTimestamp"):
                        api.patch(kueue_path(plural, obj["metadata"]["name"]), {"metadata": {"finalizers": None}})

"""Opt-in end-to-end test on a real Kubernetes cluster: the chart, the operator, its Jobs and PyTorchJobs, and S3.

Skipped unless SPIN_E2E_KUBECONFIG names a kubeconfig. The cluster needs the Kubeflow Training Operator (the
`kubeflow.org/v1` PyTorchJob CRD), the three images built from images/ and pullable by its nodes (with kind:
`kind load docker-image ...`), and an S3-compatible store that both the pods and this machine can reach. See
docs/operations.md, "Running the end-to-end test on a real cluster".

What it does, in order (every step's failure says what to look at):

1. builds the tiny demo (`spin_core.demo.prepare`: a weak SFT model and its data, about 2 minutes of CPU) and
   uploads the model, the training and the held-out data to `s3://<bucket>/<prefix>/<run>/inputs/` with
   `spin_core.store` (creating the bucket when missing);
2. creates the namespace (unless it exists) and installs charts/spin-operator into it with the pinned helm, in
   namespaced mode (watchNamespaces: [it]) with the images given below, and waits for the operator to be ready;
3. creates a Secret with the S3 credentials (the keys the pods expect: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)
   and applies a SpinRun adapted from manifests/examples/spinrun-tiny.yaml: s3:// URIs, storage.endpoint and
   storage.credentialsSecret, CPU only (gpus 0, the hf engine), small pods; checked by `spin_core.resource.parse`
   first;
4. waits until status.phase is Succeeded or Failed, and checks: Succeeded, one Succeeded record per iteration with a
   checkpoint URI under the run's storage, every such checkpoint published in the store (a MANIFEST.json listing
   the model's files), the latest checkpoint being the last iteration's, and each iteration's metrics.json;
5. cleans up in finalizers (the SpinRun and its children, the Secret, the release, the namespace if it created it);
   the artefacts in the bucket are left for inspection. SPIN_E2E_KEEP=1 leaves the cluster objects as well.

Settings (environment variables):

    SPIN_E2E_KUBECONFIG         path of the kubeconfig (required: the test is skipped without it)
    SPIN_E2E_CONTEXT            kubeconfig context (default: its current context)
    SPIN_E2E_NAMESPACE          namespace of the release, the Secret and the SpinRun (default spin-e2e)
    SPIN_E2E_RELEASE            helm release name (default spin-e2e)
    SPIN_E2E_OPERATOR_IMAGE     default ghcr.io/spin-selfplay/spin-operator:<chart appVersion>
    SPIN_E2E_GENERATOR_IMAGE    default ghcr.io/spin-selfplay/spin-generator:<chart appVersion>
    SPIN_E2E_TRAINER_IMAGE      default ghcr.io/spin-selfplay/spin-trainer:<chart appVersion>
    SPIN_E2E_IMAGE_PULL_POLICY  of the operator pod (default IfNotPresent; the Jobs' pods use Kubernetes' default,
                                IfNotPresent for any tag but :latest)
    SPIN_E2E_S3_ENDPOINT        S3 endpoint as the pods reach it, e.g. http://seaweedfs-s3.s3.svc:8333 (default:
                                none, i.e. AWS S3)
    SPIN_E2E_S3_LOCAL_ENDPOINT  the same store as this machine reaches it, e.g. http://127.0.0.1:8333 through
                                `kubectl port-forward` (default: SPIN_E2E_S3_ENDPOINT)
    SPIN_E2E_S3_BUCKET          bucket (default spin-e2e; created when missing)
    SPIN_E2E_S3_PREFIX          key prefix inside it (default spin-e2e)
    SPIN_E2E_S3_REGION          region (default: none)
    SPIN_E2E_S3_ACCESS_KEY      access key id (default: $AWS_ACCESS_KEY_ID)
    SPIN_E2E_S3_SECRET_KEY      secret access key (default: $AWS_SECRET_ACCESS_KEY)
    SPIN_E2E_POD_CPU            CPU request of every generation/training/evaluation pod (default 1)
    SPIN_E2E_POD_MEMORY         memory request and limit of those pods (default 4Gi)
    SPIN_E2E_TIMEOUT            seconds to wait for the run to finish (default 1800)
    SPIN_E2E_KEEP               1: leave the release, the namespace, the Secret and the SpinRun in place

Run it with:

    SPIN_E2E_KUBECONFIG=~/.kube/config SPIN_E2E_S3_ENDPOINT=... .venv/bin/python -m pytest \
        tests/test_cluster_e2e.py -v -rs -p no:cacheprovider
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from tests.e2e import (
    CHART,
    GROUP,
    PLURAL,
    PYTORCHJOB_CRD,
    SPINRUN_CRD,
    VERSION,
    app_version,
    check_artefacts,
    check_status,
    ensure_bucket,
    pod_resources,
    upload_inputs,
)
from tests.e2e import chart_values as e2e_chart_values
from tests.e2e import spinrun_document as e2e_spinrun_document

POLL_SECONDS = 10.0
HELM_TIMEOUT = "5m"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("SPIN_E2E_KUBECONFIG"),
        reason="end-to-end test on a real cluster: set SPIN_E2E_KUBECONFIG to a kubeconfig to run it "
        "(see docs/operations.md, 'Running the end-to-end test on a real cluster')",
    ),
]


# -- settings ---------------------------------------------------------------------------------------------------------
def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, "").strip() or default


@dataclass(frozen=True)
class Settings:
    kubeconfig: Path
    context: str
    namespace: str
    release: str
    operator_image: str
    generator_image: str
    trainer_image: str
    pull_policy: str
    s3_endpoint: str  # as the pods reach it; "" is AWS
    s3_local_endpoint: str  # as this machine reaches it
    bucket: str
    prefix: str
    region: str
    access_key: str
    secret_key: str
    pod_cpu: str
    pod_memory: str
    timeout: float
    keep: bool

    @classmethod
    def from_env(cls) -> Settings:
        version = app_version()
        endpoint = _env("SPIN_E2E_S3_ENDPOINT")
        return cls(
            kubeconfig=Path(_env("SPIN_E2E_KUBECONFIG")).expanduser(),
            context=_env("SPIN_E2E_CONTEXT"),
            namespace=_env("SPIN_E2E_NAMESPACE", "spin-e2e"),
            release=_env("SPIN_E2E_RELEASE", "spin-e2e"),
            operator_image=_env("SPIN_E2E_OPERATOR_IMAGE", f"ghcr.io/spin-selfplay/spin-operator:{version}"),
            generator_image=_env("SPIN_E2E_GENERATOR_IMAGE", f"ghcr.io/spin-selfplay/spin-generator:{version}"),
            trainer_image=_env("SPIN_E2E_TRAINER_IMAGE", f"ghcr.io/spin-selfplay/spin-trainer:{version}"),
            pull_policy=_env("SPIN_E2E_IMAGE_PULL_POLICY", "IfNotPresent"),
            s3_endpoint=endpoint,
            s3_local_endpoint=_env("SPIN_E2E_S3_LOCAL_ENDPOINT", endpoint),
            bucket=_env("SPIN_E2E_S3_BUCKET", "spin-e2e"),
            prefix=_env("SPIN_E2E_S3_PREFIX", "spin-e2e").strip("/"),
            region=_env("SPIN_E2E_S3_REGION"),
            access_key=_env("SPIN_E2E_S3_ACCESS_KEY", _env("AWS_ACCESS_KEY_ID")),
            secret_key=_env("SPIN_E2E_S3_SECRET_KEY", _env("AWS_SECRET_ACCESS_KEY")),
            pod_cpu=_env("SPIN_E2E_POD_CPU", "1"),
            pod_memory=_env("SPIN_E2E_POD_MEMORY", "4Gi"),
            timeout=float(_env("SPIN_E2E_TIMEOUT", "1800")),
            keep=_env("SPIN_E2E_KEEP") in ("1", "true", "yes"),
        )

    def problems(self) -> list[str]:
        out = []
        if not self.kubeconfig.is_file():
            out.append(f"SPIN_E2E_KUBECONFIG={self.kubeconfig} is not a file")
        if not (self.access_key and self.secret_key):
            out.append("no S3 credentials: set SPIN_E2E_S3_ACCESS_KEY and SPIN_E2E_S3_SECRET_KEY")
        for name, value in (
            ("SPIN_E2E_S3_ENDPOINT", self.s3_endpoint),
            ("SPIN_E2E_S3_LOCAL_ENDPOINT", self.s3_local_endpoint),
        ):
            if value and urlparse(value).scheme not in ("http", "https"):
                out.append(f"{name}={value} is not an http:// or https:// URL")
        return out

    def pod_resources(self) -> dict[str, Any]:
        return pod_resources(self.pod_cpu, self.pod_memory)


# -- what the test installs and applies (tests/e2e.py, shared with tests/test_control_plane_e2e.py) --------------------
def chart_values(s: Settings) -> dict[str, Any]:
    """Values for charts/spin-operator: the given images, namespaced mode, small default pods, quick retries."""
    return e2e_chart_values(
        [s.namespace], s.pod_resources(), s.operator_image, s.generator_image, s.trainer_image, s.pull_policy
    )


def spinrun_document(s: Settings, name: str, inputs_uri: str, storage_uri: str, secret: str) -> dict[str, Any]:
    """manifests/examples/spinrun-tiny.yaml for the cluster: s3:// inputs and storage, CPU-only small pods."""
    storage: dict[str, Any] = {"uri": storage_uri, "credentialsSecret": secret}
    if s.s3_endpoint:
        storage["endpoint"] = s.s3_endpoint
    if s.region:
        storage["region"] = s.region
    return e2e_spinrun_document(name, s.namespace, inputs_uri, storage, s.pod_resources())


def s3_store(s: Settings, uri: str):
    """A Store at `uri` as this machine reaches the bucket (credentials: the AWS_* environment variables)."""
    from spin_core.store import Store

    return Store.open(uri, endpoint=s.s3_local_endpoint or None, region=s.region or None)


# -- cluster helpers --------------------------------------------------------------------------------------------------
class Cluster:
    """The kubernetes client on the given kubeconfig, plus helm and diagnostics."""

    def __init__(self, s: Settings, helm: Path):
        from kubernetes import client, config

        self.s, self.helm_bin = s, helm
        api = config.new_client_from_config(config_file=str(s.kubeconfig), context=s.context or None)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.extensions = client.ApiextensionsV1Api(api)

    def helm(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        command = [str(self.helm_bin), *args, "--kubeconfig", str(self.s.kubeconfig), "--namespace", self.s.namespace]
        if self.s.context:
            command += ["--kube-context", self.s.context]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)

    def crd(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.extensions.read_custom_resource_definition(name).to_dict()
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def wait_established(self, name: str, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            crd = self.crd(name) or {}
            conditions = (crd.get("status") or {}).get("conditions") or []
            if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
                return True
            time.sleep(2)
        return False

    def spinrun(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.s.namespace, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def delete_spinrun(self, name: str, timeout: float = 180) -> None:
        """Delete the run (its ConfigMap, Jobs and PyTorchJobs go with it: they are owned) and wait until gone."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.s.namespace, PLURAL, name, propagation_policy="Foreground"
            )
        except ApiException as e:
            if e.status != 404:
                raise
        deadline = time.monotonic() + timeout
        while self.spinrun(name) is not None:
            if time.monotonic() > deadline:  # a finalizer nobody removes: drop it so the namespace can go
                patch = {"metadata": {"finalizers": None}}
                self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.s.namespace, PLURAL, name, patch)
                break
            time.sleep(3)

    def diagnostics(self, run_name: str | None = None) -> str:
        """What to look at when something fails: the run's status, the pods, their logs' tails, recent events."""
        out: list[str] = []

        def section(title: str, fn: Callable[[], str]) -> None:
            try:
                out.append(f"--- {title}\n{fn()}")
            except Exception as e:  # diagnostics must never hide the real failure
                out.append(f"--- {title}: cannot read ({type(e).__name__}: {e})")

        ns = self.s.namespace
        if run_name:
            section(
                f"SpinRun {run_name} status", lambda: json.dumps((self.spinrun(run_name) or {}).get("status"), indent=1)
            )
        pods = []
        with_pods = []
        try:
            pods = self.core.list_namespaced_pod(ns).items
        except Exception as e:
            out.append(f"--- pods: cannot list ({e})")
        for pod in pods:
            reasons = [
                (cs.state.waiting.reason if cs.state and cs.state.waiting else None)
                or (cs.state.terminated.reason if cs.state and cs.state.terminated else None)
                or ""
                for cs in pod.status.container_statuses or []
            ]
            with_pods.append(f"{pod.metadata.name}: {pod.status.phase} {' '.join(r for r in reasons if r)}")
        out.append("--- pods\n" + ("\n".join(with_pods) or "(none)"))
        for pod in pods:
            if pod.status.phase in ("Failed", "Pending") or "operator" in pod.metadata.name:
                name = pod.metadata.name
                section(
                    f"log of {name} (tail)",
                    lambda name=name: self.core.read_namespaced_pod_log(name, ns, tail_lines=60, _request_timeout=20),
                )

        def events() -> str:
            items = sorted(
                self.core.list_namespaced_event(ns).items,
                key=lambda e: str(e.last_timestamp or e.event_time or e.metadata.creation_timestamp),
            )
            return "\n".join(
                f"{e.type} {e.reason} {e.involved_object.kind}/{e.involved_object.name}: {e.message}"
                for e in items[-40:]
            )

        section("events (latest 40)", events)
        return "\n".join(out)


# -- the test ---------------------------------------------------------------------------------------------------------
def test_tiny_spinrun_on_a_cluster(helm_bin: Path, tmp_path: Path, monkeypatch, request) -> None:
    from botocore.exceptions import BotoCoreError, ClientError
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from spin_core import demo
    from spin_core.store import StoreError

    s = Settings.from_env()
    if problems := s.problems():
        pytest.fail("the end-to-end settings are incomplete:\n  " + "\n  ".join(problems), pytrace=False)
    cluster = Cluster(s, helm_bin)

    # 0. The cluster must have the Training Operator's PyTorchJob (the operator's training children).
    if cluster.crd(PYTORCHJOB_CRD) is None:
        pytest.fail(
            f"the cluster has no {PYTORCHJOB_CRD} CRD: install the Kubeflow Training Operator (kubeflow.org/v1)",
            pytrace=False,
        )

    # 1. The demo's inputs, in the bucket (before anything changes in the cluster).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s.secret_key)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    run_name = f"e2e-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    base = f"s3://{s.bucket}/{s.prefix}/{run_name}" if s.prefix else f"s3://{s.bucket}/{run_name}"
    inputs_uri, storage_uri = f"{base}/inputs", f"{base}/run"
    demo.prepare(tmp_path / "demo")
    try:
        inputs = s3_store(s, inputs_uri)
        ensure_bucket(inputs)
        upload_inputs(inputs, tmp_path / "demo")
    except (StoreError, ClientError, BotoCoreError) as e:
        at = s.s3_local_endpoint or "AWS S3"
        pytest.fail(
            f"cannot upload the demo's inputs to {inputs_uri} at {at}: {e}\n(check SPIN_E2E_S3_LOCAL_ENDPOINT, "
            "SPIN_E2E_S3_ACCESS_KEY and SPIN_E2E_S3_SECRET_KEY)",
            pytrace=False,
        )

    # 2. Namespace and release.
    try:
        cluster.core.read_namespace(s.namespace)
        created_namespace = False
    except ApiException as e:
        if e.status != 404:
            raise
        cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=s.namespace)))
        created_namespace = True

    def delete_namespace() -> None:
        if created_namespace and not s.keep:
            cluster.core.delete_namespace(s.namespace)

    request.addfinalizer(delete_namespace)

    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(chart_values(s), sort_keys=False))
    installed = cluster.helm(
        "install", s.release, str(CHART), "-f", str(values), "--wait=watcher", "--timeout", HELM_TIMEOUT
    )

    def uninstall() -> None:
        if not s.keep:
            cluster.helm("uninstall", s.release, "--wait", "--timeout", HELM_TIMEOUT)

    if installed.returncode == 0 or "a name that is still in use" not in installed.stderr:
        request.addfinalizer(uninstall)  # also after a failed --wait (the objects exist), never for a release not ours
    if installed.returncode != 0:
        pytest.fail(
            f"helm install {s.release} failed ({installed.returncode}):\n{installed.stderr}\n{cluster.diagnostics()}",
            pytrace=False,
        )
    assert cluster.wait_established(SPINRUN_CRD), f"the {SPINRUN_CRD} CRD (from the chart's crds/) is not Established"

    # 3. Credentials and the SpinRun.
    secret = f"{run_name}-s3"
    cluster.core.create_namespaced_secret(
        s.namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=secret),
            type="Opaque",
            string_data={"AWS_ACCESS_KEY_ID": s.access_key, "AWS_SECRET_ACCESS_KEY": s.secret_key},
        ),
    )

    def delete_secret() -> None:
        if not s.keep:
            cluster.core.delete_namespaced_secret(secret, s.namespace)

    request.addfinalizer(delete_secret)
    doc = spinrun_document(s, run_name, inputs_uri, storage_uri, secret)
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, s.namespace, PLURAL, doc)

    def delete_spinrun() -> None:  # first of the finalizers: the operator is still there to see it go
        if not s.keep:
            cluster.delete_spinrun(run_name)

    request.addfinalizer(delete_spinrun)

    # 4. Wait for the end, then check the status and the store.
    deadline, seen, status = time.monotonic() + s.timeout, None, {}
    while True:
        status = (cluster.spinrun(run_name) or {}).get("status") or {}
        now = (status.get("phase"), status.get("progress"))
        if now != seen:
            print(f"{run_name}: phase {now[0]}, progress {now[1]}: {status.get('message') or ''}", flush=True)
            seen = now
        if status.get("phase") in ("Succeeded", "Failed"):
            break
        if time.monotonic() > deadline:
            pytest.fail(
                f"SpinRun {run_name} did not finish within {s.timeout:.0f} s (SPIN_E2E_TIMEOUT)\n"
                f"{cluster.diagnostics(run_name)}",
                pytrace=False,
            )
        time.sleep(POLL_SECONDS)

    iterations = doc["spec"]["iterations"]
    problems = check_status(status, storage_uri, iterations)
    if not problems:
        problems = check_artefacts(s3_store(s, storage_uri), status)
    if problems:
        pytest.fail(
            f"SpinRun {run_name} ({storage_uri}):\n  " + "\n  ".join(problems) + "\n" + cluster.diagnostics(run_name),
            pytrace=False,
        )

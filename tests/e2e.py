"""What the end-to-end tests share: the tiny SpinRun adapted for a cluster, its inputs in S3, the chart's values,
and the checks of a finished run.

Used by tests/test_control_plane_e2e.py (the test control plane of tests/fixtures/cluster.py, every CI run) and
tests/test_cluster_e2e.py (opt-in, a real cluster named by SPIN_E2E_* variables). Plain functions: they can be
checked without a cluster.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "spin-operator"
TINY_SPINRUN = ROOT / "manifests" / "examples" / "spinrun-tiny.yaml"
GROUP, VERSION, PLURAL = "selfplay.dev", "v1alpha1", "spinruns"
PYTORCHJOB_CRD = "pytorchjobs.kubeflow.org"
SPINRUN_CRD = f"{PLURAL}.{GROUP}"


def app_version() -> str:
    return str(yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])


def split_image(ref: str) -> tuple[str, str]:
    """`registry:port/name:tag` -> (repository, tag); a reference without a tag gets the chart's appVersion."""
    if "@" in ref:
        raise ValueError(f"image {ref!r}: the chart takes repository and tag, not a digest")
    repository, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:  # no colon, or the colon was a registry port
        return ref, app_version()
    return repository, tag


def pod_resources(cpu: str, memory: str) -> dict[str, Any]:
    """Requests (and the memory limit) of every generation, training and evaluation pod."""
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}}


def chart_values(
    namespaces: list[str],
    resources: dict[str, Any],
    operator_image: str = "",
    generator_image: str = "",
    trainer_image: str = "",
    pull_policy: str = "IfNotPresent",
) -> dict[str, Any]:
    """Values for charts/spin-operator: namespaced mode (the given namespaces), small default pods, quick retries,
    and the given images (empty: the chart's own)."""
    values: dict[str, Any] = {
        "image": {"pullPolicy": pull_policy},
        "generator": {"resources": resources},
        "trainer": {"resources": resources},
        "watchNamespaces": list(namespaces),
        "extraArgs": ["--verbose"],
        "extraEnv": [{"name": "SPIN_RETRY_BACKOFF_SECONDS", "value": "5"}],
    }
    for key, ref in (("image", operator_image), ("generator", generator_image), ("trainer", trainer_image)):
        if ref:
            repository, tag = split_image(ref)
            target = values[key] if key == "image" else values[key].setdefault("image", {})
            target.update(repository=repository, tag=tag)
    return values


def spinrun_document(
    name: str,
    namespace: str,
    inputs_uri: str,
    storage: dict[str, Any],
    resources: dict[str, Any],
    train_rows: int = 128,
    heldout_rows: int = 64,
    **spec_changes: dict[str, Any],
) -> dict[str, Any]:
    """manifests/examples/spinrun-tiny.yaml for a cluster: s3:// inputs (`<inputs_uri>/sft-model`, `train.jsonl`,
    `heldout.jsonl`), the given `storage` (uri, endpoint, region, credentialsSecret), CPU only, small pods.

    Generation and evaluation use the hf engine: the generator image's vLLM is a CUDA build and these pods get no
    GPU. `spec_changes` update the spec's sections (e.g. `generation={"shards": 1}`). Validated with
    spin_core.resource.parse (SpecError says what is wrong).
    """
    from spin_core import resource

    (doc,) = resource.load_documents(TINY_SPINRUN)
    doc = copy.deepcopy(doc)
    doc["metadata"] = {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "spin-e2e"}}
    spec = doc["spec"]
    spec["model"]["uri"] = f"{inputs_uri}/sft-model"
    spec["dataset"].update(uri=f"{inputs_uri}/train.jsonl", maxSamples=train_rows)
    spec["storage"] = dict(storage)
    spec["generation"].update(backend="hf", gpusPerShard=0, resources=resources)
    spec["training"].update(gpusPerNode=0, resources=resources)
    evaluation = spec["evaluation"]
    evaluation["dataset"]["uri"] = f"{inputs_uri}/heldout.jsonl"
    evaluation.update(backend="hf", maxSamples=heldout_rows)
    for section, change in spec_changes.items():
        if isinstance(spec.get(section), dict) and isinstance(change, dict):
            spec[section].update(change)
        else:
            spec[section] = change
    resource.parse(doc, f"{TINY_SPINRUN.name} (adapted for the cluster)")
    return doc


def prepare_inputs(folder: Path, train_rows: int = 512, heldout_rows: int = 128, sft_steps: int = 150) -> Path:
    """The demo's inputs (spin_core.demo.prepare: a weak SFT model, training and held-out data) in `folder`; fewer
    rows and SFT steps make a quicker, weaker version of the same."""
    from spin_core import demo

    demo.prepare(folder, train_size=train_rows, heldout_size=heldout_rows, sft_steps=sft_steps)
    return folder


def ensure_bucket(store: Any) -> None:
    """Create the store's bucket when it does not exist (MinIO and SeaweedFS start empty)."""
    from botocore.exceptions import ClientError

    backend = store.backend
    try:
        backend.client.head_bucket(Bucket=backend.bucket)
        return
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
    region = backend.client.meta.region_name
    extra = {"CreateBucketConfiguration": {"LocationConstraint": region}} if region not in (None, "us-east-1") else {}
    backend.client.create_bucket(Bucket=backend.bucket, **extra)


def upload_inputs(store: Any, demo_dir: Path) -> list[str]:
    """The demo's SFT model folder and data files as plain objects (no manifest: they are user inputs)."""
    files = {"train.jsonl": demo_dir / "train.jsonl", "heldout.jsonl": demo_dir / "heldout.jsonl"}
    model = demo_dir / "sft-model"
    files.update({f"sft-model/{p.relative_to(model).as_posix()}": p for p in sorted(model.rglob("*")) if p.is_file()})
    for key, path in files.items():
        store.backend.put_file(key, path)
    return sorted(files)


def check_status(status: dict[str, Any], storage_uri: str, iterations: int) -> list[str]:
    """Problems with a finished run's status (an empty list: fine): phase, per-iteration records, checkpoints, and
    the trainer's metrics (read by the operator from the Master pod's termination message)."""
    problems = []
    if status.get("phase") != "Succeeded":
        problems.append(f"status.phase is {status.get('phase')!r}, not 'Succeeded': {status.get('message')!r}")
    records = {r.get("iteration"): r for r in status.get("iterations") or []}
    if sorted(records) != list(range(1, iterations + 1)):
        problems.append(f"status.iterations has records for {sorted(records)}, expected 1..{iterations}")
    for t, record in sorted(records.items()):
        if record.get("phase") != "Succeeded":
            problems.append(f"iteration {t} is {record.get('phase')!r}: {record.get('message')!r}")
        checkpoint = record.get("checkpoint") or ""
        if not checkpoint.startswith(storage_uri.rstrip("/") + "/"):
            problems.append(f"iteration {t}: checkpoint {checkpoint!r} is not under the run's storage {storage_uri}")
        metrics = record.get("metrics") or {}
        if not {"loss", "pairs/trained"} <= set(metrics):
            problems.append(
                f"iteration {t}: status metrics {sorted(metrics)} lack the trainer's loss and pairs/trained "
                f"(summary: {record.get('summary')!r})"
            )
    last = records.get(iterations, {}).get("checkpoint")
    if last and status.get("latestCheckpoint") != last:
        problems.append(f"status.latestCheckpoint is {status.get('latestCheckpoint')!r}, expected {last!r}")
    return problems


def check_artefacts(store: Any, status: dict[str, Any]) -> list[str]:
    """Problems with what the run published: each record's checkpoint (MANIFEST.json + model files), metrics.json."""
    from spin_core import layout

    problems = []
    for record in status.get("iterations") or []:
        t, uri = record.get("iteration"), record.get("checkpoint") or ""
        if not uri.startswith(store.uri + "/"):
            continue  # reported by check_status
        key = uri[len(store.uri) + 1 :].rstrip("/")
        if not store.is_published(key):
            problems.append(f"iteration {t}: checkpoint {uri} is not published (no MANIFEST.json)")
            continue
        names = set(store.manifest(key).files)
        if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
            problems.append(f"iteration {t}: checkpoint {uri} lacks config.json or safetensors: {sorted(names)}")
        if isinstance(t, int) and not store.exists(layout.metrics(t)):
            problems.append(f"iteration {t}: {store.uri_of(layout.metrics(t))} does not exist")
    return problems

"""manifests/: the plain-YAML operator install (generated from the chart) and the example SpinRuns and Secret."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from openapi_schema_validator import OAS30Validator

from spin_core import tools
from spin_core.resource import load_all

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
EXAMPLES = MANIFESTS / "examples"
CRD_FILE = MANIFESTS / "crd" / "spinruns.selfplay.dev.yaml"
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_operator_manifests_equal_the_chart_rendering(helm_bin):
    rendered = tools.render_operator_manifests(helm_bin)
    committed = tools.OPERATOR_MANIFEST.read_text()
    assert committed == rendered, (
        "manifests/operator/spin-operator.yaml is stale: regenerate it with `make manifests` "
        "(python -m spin_core.tools manifests)"
    )


def test_operator_manifests_content():
    objects = documents(tools.OPERATOR_MANIFEST)
    assert [o["kind"] for o in objects] == [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
    ]  # fmt: skip (the operator's ClusterRole, and the users' two aggregated into view/edit/admin)
    assert objects[0]["metadata"]["name"] == "spin-system"
    assert all(o["metadata"].get("namespace") in (None, "spin-system") for o in objects)
    # Only the operator manifests live in manifests/operator (the CRD comes from manifests/crd).
    assert sorted(p.name for p in tools.OPERATOR_MANIFEST.parent.iterdir()) == ["spin-operator.yaml"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_plain_manifests_match_kubernetes_schemas(version):
    files = [tools.OPERATOR_MANIFEST, CRD_FILE, EXAMPLES / "s3-credentials-secret.yaml"]
    for path in files:
        for obj in documents(path):
            kubernetes_validate.validate(obj, version, strict=True)


def _crd_schema() -> dict[str, Any]:
    (crd,) = documents(CRD_FILE)
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("name", ["spinrun-zephyr-7b.yaml", "spinrun-tiny.yaml"])
def test_example_spinruns_match_the_crd_schema(name):
    validator = OAS30Validator(_crd_schema())
    for doc in documents(EXAMPLES / name):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, "\n".join(errors)


def test_zephyr_example_passes_spin_validate():
    done = subprocess.run(
        [sys.executable, "-m", "spin_core", "validate", str(EXAMPLES / "spinrun-zephyr-7b.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is valid (4 iterations)" in done.stdout


def test_zephyr_example_is_the_official_recipe():
    (run,) = load_all(EXAMPLES / "spinrun-zephyr-7b.yaml")
    spec = run.spec
    assert spec.model.uri.startswith("s3://") and "zephyr-7b-sft-full" in spec.model.uri
    assert spec.dataset.uri.startswith("s3://") and "ultrachat" in spec.dataset.uri
    assert spec.dataset.format == "messages" and spec.dataset.max_samples == 50_000
    assert spec.storage.uri.startswith("s3://")
    assert spec.iterations == 4 and spec.mix_previous_iterations == 1
    t = spec.training
    assert (t.nodes * t.processes_per_node, t.gpus_per_node) == (8, 8)
    assert (t.zero_stage, t.optimizer, t.dtype, t.loss) == (3, "rmsprop", "bfloat16", "sigmoid")
    assert (t.max_length, t.max_prompt_length, t.global_batch_size, t.micro_batch_size) == (1024, 512, 64, 8)
    assert spec.generation.backend == "vllm" and spec.generation.dtype == "bfloat16"
    # uclaml/SPIN scripts/finetune.sh, finetune_iter{1,2,3}.sh: lr 5e-7 for the first two trainings, 1e-7 from the
    # third, beta 0.1 except 5.0 at the fourth, 6 epochs each.
    settings = [run.iteration_settings(i) for i in (1, 2, 3, 4)]
    assert settings == [(0.1, 5e-7, 6), (0.1, 5e-7, 6), (0.1, 1e-7, 6), (5.0, 1e-7, 6)]
    assert (t.warmup_ratio, t.seed, t.gradient_checkpointing) == (0.1, 42, True)
    g = spec.generation
    assert (g.temperature, g.top_p, g.max_new_tokens) == (1.0, 1.0, 256)
    # The Secret it names is the example Secret.
    (secret,) = documents(EXAMPLES / "s3-credentials-secret.yaml")
    assert spec.storage.credentials_secret == secret["metadata"]["name"]
    assert "CHANGE" in (EXAMPLES / "spinrun-zephyr-7b.yaml").read_text()


def test_s3_secret_example_has_placeholders_only():
    (secret,) = documents(EXAMPLES / "s3-credentials-secret.yaml")
    assert secret["kind"] == "Secret" and secret["type"] == "Opaque"
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(v.startswith("REPLACE-WITH-") for v in secret["stringData"].values())
    assert "namespace" not in secret["metadata"]  # applied into the SpinRun's namespace with -n

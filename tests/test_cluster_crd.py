"""The SpinRun CRD and SpinRuns on a real kube-apiserver (issue 14).

Real: etcd, kube-apiserver v1.37.2 (its apiextensions code validates the CRD, its defaulting, OpenAPI schema and CEL
rules), the pinned kubectl. Nothing stands in: these tests run no pods.
"""

from __future__ import annotations

import copy
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spin_core import crd as crd_module
from spin_core import resource, spec
from spin_core.errors import SpinError
from tests import test_spec
from tests.cluster.api import ApiError
from tests.fixtures.cluster import Cluster, spinruns_path

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parent.parent
CRD_NAME = f"{spec.PLURAL}.{spec.GROUP}"
CRD_PATH = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}"


def delete_crd(cluster: Cluster, name: str = CRD_NAME) -> None:
    """Delete a CRD and wait until it is gone (its objects with it)."""
    path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
    cluster.api.delete(path)
    cluster.api.wait_for(f"CRD {name} to be deleted", lambda: cluster.api.find(path) is None, timeout=60)


def established(cluster: Cluster, name: str = CRD_NAME) -> bool:
    crd = cluster.api.find(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
    conditions = (crd or {}).get("status", {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="module")
def spinrun_crd(cluster: Cluster) -> dict[str, Any]:
    """The CRD as `kubectl apply -f manifests/crd/` creates it (freshly: any earlier copy is deleted first)."""
    delete_crd(cluster)
    done = cluster.kubectl("apply", "-f", "manifests/crd/", check=False)
    assert f"customresourcedefinition.apiextensions.k8s.io/{CRD_NAME} created" in done.stdout, done
    cluster.api.wait_for("the SpinRun CRD to be Established", lambda: established(cluster), timeout=60)
    # The new resource is served once discovery has it; the first create may otherwise 404.
    cluster.api.wait_for(
        "spinruns to be served", lambda: cluster.api.get(f"/apis/{spec.GROUP}/{spec.VERSION}/spinruns")
    )
    return cluster.api.get(CRD_PATH)


def test_the_crd_manifest_is_accepted_and_established(cluster: Cluster) -> None:
    """`kubectl apply -f manifests/crd/` creates the CRD and it becomes Established; it carries the CEL rules and
    the spelled-out object defaults. The chart ships the very same file (helm installs charts/spin-operator/crds/)."""
    chart_crd = ROOT / "charts" / "spin-operator" / "crds" / f"{CRD_NAME}.yaml"
    assert chart_crd.read_text() == (ROOT / "manifests" / "crd" / f"{CRD_NAME}.yaml").read_text()
    delete_crd(cluster)
    done = cluster.kubectl("apply", "-f", "manifests/crd/", check=False)
    assert done.returncode == 0, done.stderr
    assert f"customresourcedefinition.apiextensions.k8s.io/{CRD_NAME} created" in done.stdout, done.stdout
    cluster.api.wait_for("the SpinRun CRD to be Established", lambda: established(cluster), timeout=60)
    stored = cluster.api.get(CRD_PATH)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    training = stored["properties"]["training"]
    assert [r["rule"] for r in training["x-kubernetes-validations"]] == [r["rule"] for r in spec.TRAINING_RULES]
    assert training["default"]["maxPromptLength"] < training["default"]["maxLength"]


def _under_another_group(group: str) -> dict[str, Any]:
    crd = crd_module.crd()
    crd["metadata"]["name"] = f"{spec.PLURAL}.{group}"
    crd["spec"]["group"] = group
    return crd


def _refused(cluster: Cluster, crd: dict[str, Any]) -> str:
    with pytest.raises(ApiError) as refused:
        cluster.api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    assert refused.value.status == 422, refused.value
    return refused.value.message


def test_what_the_apiserver_refused_in_earlier_crds(cluster: Cluster) -> None:
    """Why the CRD spells out its object defaults and bounds integers at 2**53-1: kube-apiserver refuses the same
    CRD with `default: {}` on spec.training (it evaluates the CEL rules on the raw default at creation), and with a
    `maximum` of 2**63-1 (held as a float64, no longer an integer). Tried under another group; the form in the
    repository is accepted there."""
    crd = _under_another_group("oldform.selfplay.dev")
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    spelled_out = props["training"]["default"]
    props["training"]["default"] = {}
    message = _refused(cluster, crd)
    assert "spec.validation.openAPIV3Schema.properties[spec].properties[training].default" in message, message
    assert "no such key: maxPromptLength" in message, message
    props["training"]["default"] = spelled_out
    steps = props["training"]["properties"]["checkpointEverySteps"]
    assert steps["maximum"] == spec.MAX_INTEGER
    steps["maximum"] = 2**63 - 1
    message = _refused(cluster, crd)
    assert "Maximum boundary value must be of type integer (default format) in checkpointEverySteps" in message
    steps["maximum"] = spec.MAX_INTEGER  # the form in the repository: accepted
    cluster.api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    try:
        cluster.api.wait_for(
            "the repository's CRD to be Established", lambda: established(cluster, crd["metadata"]["name"])
        )
    finally:
        delete_crd(cluster, crd["metadata"]["name"])


def tiny_spinrun(namespace: str, name: str = "tiny") -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "manifests" / "examples" / "spinrun-tiny.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": namespace}
    return doc


def test_a_valid_spinrun_is_accepted_and_defaulted(
    cluster: Cluster, spinrun_crd: dict[str, Any], cluster_namespace: str
) -> None:
    """The tiny example SpinRun is created; the apiserver fills in the schema's defaults, which equal the models'."""
    doc = tiny_spinrun(cluster_namespace)
    resource.parse(doc)  # `spin validate` accepts it too
    created = cluster.api.create(spinruns_path(cluster_namespace), doc)
    training_schema = spinrun_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["training"]["properties"]
    defaulted = [k for k, p in training_schema.items() if "default" in p and k not in doc["spec"]["training"]]
    assert defaulted, "the example sets every training field: nothing to check defaulting with"
    for key in defaulted:
        assert created["spec"]["training"][key] == training_schema[key]["default"], key
    model = spec.Training.model_validate(doc["spec"]["training"])
    assert spec.Training.model_validate(created["spec"]["training"]) == model


# Each invalid SpinRun: a change to the tiny example, the field the apiserver names, its message.
INVALID = {
    "maxPromptLength not below maxLength (CEL)": (
        {"training": {"maxPromptLength": 64}},
        "spec.training.maxPromptLength",
        "maxPromptLength must be smaller than maxLength",
    ),
    "globalBatchSize not a multiple (CEL)": (
        {"training": {"globalBatchSize": 33}},
        "spec.training.globalBatchSize",
        "globalBatchSize must be a multiple of microBatchSize x nodes x processesPerNode",
    ),
    "schedule beyond the iterations (CEL)": (
        {"schedule": [{"iteration": 3, "learningRate": 1e-5}]},
        "spec.schedule",
        "every schedule entry must name an iteration between 1 and spec.iterations",
    ),
    "zero iterations (schema)": ({"iterations": 0}, "spec.iterations", "should be greater than or equal to 1"),
}


def _merged(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in change.items():
        out[key] = _merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


@pytest.mark.parametrize("case", list(INVALID))
def test_an_invalid_spinrun_is_rejected_by_the_apiserver_and_by_spin_validate(
    cluster: Cluster, spinrun_crd: dict[str, Any], cluster_namespace: str, case: str
) -> None:
    """The apiserver refuses the SpinRun with the CRD's message for the field; `spin validate` refuses it too."""
    change, field, message = INVALID[case]
    doc = tiny_spinrun(cluster_namespace, name=f"bad-{int(time.time() * 1000) % 100000}")
    doc["spec"] = _merged(doc["spec"], change)
    with pytest.raises(ApiError) as refused:
        cluster.api.create(spinruns_path(cluster_namespace), doc)
    assert refused.value.status == 422, refused.value
    causes = refused.value.body.get("details", {}).get("causes", [])
    assert any(c.get("field") == field and message in c.get("message", "") for c in causes), refused.value.body
    with pytest.raises(SpinError):
        resource.parse(doc)


# -- spin validate and kube-apiserver agree, on drawn SpinRuns ----------------------------------------------------
# The same strategies as tests/test_spec.py's properties (there against an offline model of the apiserver), here
# against the real one: every drawn valid SpinRun is created, every drawn mistake is refused by both, and the
# apiserver's message names the field. Unknown fields are refused as kubectl does (fieldValidation=Strict).

AGREEMENT = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _create(cluster: Cluster, namespace: str, doc: dict[str, Any]) -> dict[str, Any]:
    return cluster.api.create(spinruns_path(namespace), doc, fieldValidation="Strict")


@AGREEMENT
@given(doc=test_spec.documents())
def test_every_drawn_valid_spinrun_is_accepted_by_the_apiserver(
    cluster: Cluster, spinrun_crd: dict[str, Any], cluster_namespace: str, doc: dict[str, Any]
) -> None:
    doc = copy.deepcopy(doc)
    doc["metadata"] = {"name": f"v{uuid.uuid4().hex[:12]}"}  # the namespace is the test's
    parsed = resource.parse(doc)
    created = _create(cluster, cluster_namespace, doc)
    # What the apiserver stored, defaults filled in, is the SpinRun pydantic resolves (the operator's view of it).
    stored = {k: created[k] for k in ("apiVersion", "kind", "spec")} | {
        "metadata": {"name": created["metadata"]["name"]}
    }
    assert resource.parse(stored).spec == parsed.spec


@pytest.mark.parametrize("kind", test_spec.MUTATIONS)
@AGREEMENT
@given(data=st.data())
def test_every_drawn_mistake_is_refused_by_the_apiserver_and_spin_validate(
    cluster: Cluster, spinrun_crd: dict[str, Any], cluster_namespace: str, kind: str, data: st.DataObject
) -> None:
    doc, field, api_field = data.draw(test_spec.mutations(kind))
    doc = copy.deepcopy(doc)
    if isinstance(doc.get("metadata"), dict) and "name" in doc["metadata"] and kind != "name":
        doc["metadata"]["name"] = f"m{uuid.uuid4().hex[:12]}"
    doc.get("metadata", {}).pop("namespace", None)
    with pytest.raises(SpinError) as mine:
        resource.parse(doc)
    assert any(p.startswith(f"{field}:") for p in mine.value.problems), mine.value.problems
    with pytest.raises(ApiError) as refused:
        _create(cluster, cluster_namespace, doc)
    assert refused.value.status in (400, 422), refused.value
    causes = refused.value.body.get("details", {}).get("causes", [])
    named = [c.get("field", "") for c in causes] + [refused.value.message]
    top = api_field.split("[")[0] if api_field != "(object)" else ""
    assert any(top in text for text in named), (
        f"{kind}: the apiserver's refusal does not name {top}: {refused.value.body}"
    )

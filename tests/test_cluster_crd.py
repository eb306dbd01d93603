"""The SpinRun CRD and SpinRuns on a real kube-apiserver (issue 14).

Real: etcd, kube-apiserver v1.37.2 (its apiextensions code validates the CRD, its defaulting, OpenAPI schema and CEL
rules), the pinned kubectl. Nothing stands in: these tests run no pods.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from spin_core import crd as crd_module
from spin_core import resource, spec
from spin_core.errors import SpinError
from tests.cluster.api import ApiError
from tests.fixtures.cluster import Cluster

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


# Defect (reported to the lead): spin_core/spec.py bounds several integers with `le=INT64_MAX`, so the CRD says
# `maximum: 9223372036854775807`. kube-apiserver holds a maximum as a float64 (2^63 after rounding, beyond int64) and
# refuses to check a default against it, rejecting the whole CRD with this message (kube-openapi
# pkg/validation/validate: IsValueValidAgainstRange) for each such field that has a default.
INT64_MAXIMUM_REJECTION = "Maximum boundary value must be of type integer (default format)"


def without_int64_maximum(node: Any) -> Any:
    """A copy of a CRD (or schema) without the `maximum: INT64_MAX` bounds: the workaround for the defect above."""
    if isinstance(node, list):
        return [without_int64_maximum(v) for v in node]
    if isinstance(node, dict):
        return {k: without_int64_maximum(v) for k, v in node.items() if not (k == "maximum" and v == spec.INT64_MAX)}
    return node


@pytest.fixture(scope="module")
def spinrun_crd(cluster: Cluster) -> dict[str, Any]:
    """The CRD as `kubectl apply -f manifests/crd/` creates it (freshly: any earlier copy is deleted first). While
    the apiserver refuses it for INT64_MAX maxima (see above), the same CRD without those bounds, so that the SpinRun
    tests still run against the CRD's schema and CEL rules."""
    delete_crd(cluster)
    done = cluster.kubectl("apply", "-f", "manifests/crd/", check=False)
    if done.returncode and INT64_MAXIMUM_REJECTION in done.stderr:
        cluster.api.create(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", without_int64_maximum(crd_module.crd())
        )
    else:
        assert f"customresourcedefinition.apiextensions.k8s.io/{CRD_NAME} created" in done.stdout, done
    cluster.api.wait_for("the SpinRun CRD to be Established", lambda: established(cluster), timeout=60)
    # The new resource is served once discovery has it; the first create may otherwise 404.
    cluster.api.wait_for(
        "spinruns to be served", lambda: cluster.api.get(f"/apis/{spec.GROUP}/{spec.VERSION}/spinruns")
    )
    return cluster.api.get(CRD_PATH)


@pytest.mark.xfail(
    strict=True,
    reason="defect: kube-apiserver rejects the CRD: 'spec.validation.openAPIV3Schema.properties[spec].properties"
    '[training].default: Invalid value: "": Maximum boundary value must be of type integer (default format) in '
    "checkpointEverySteps' (and 5 more such fields), from `le=INT64_MAX` in spin_core/spec.py",
)
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


def test_a_raw_object_default_with_cel_rules_is_what_the_apiserver_rejects(cluster: Cluster) -> None:
    """Why the CRD spells out its object defaults: the same CRD with `default: {}` on spec.training (as it was
    before) is refused by kube-apiserver, which evaluates the CEL rules on the raw default at creation. (Tried under
    another group, without the INT64_MAX maxima of the defect above, so that the default is the only problem.)"""
    old = without_int64_maximum(crd_module.crd())
    group = "oldform.selfplay.dev"
    old["metadata"]["name"] = f"{spec.PLURAL}.{group}"
    old["spec"]["group"] = group
    props = old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    spelled_out = props["training"]["default"]
    props["training"]["default"] = {}
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    with pytest.raises(ApiError) as refused:
        cluster.api.create(path, old)
    assert refused.value.status == 422, refused.value
    message = refused.value.message
    assert "spec.validation.openAPIV3Schema.properties[spec].properties[training].default" in message, message
    assert "no such key: maxPromptLength" in message, message
    props["training"]["default"] = spelled_out  # the form in the repository: accepted
    cluster.api.create(path, old)
    try:
        cluster.api.wait_for(
            "the spelled-out CRD to be Established", lambda: established(cluster, old["metadata"]["name"])
        )
    finally:
        delete_crd(cluster, old["metadata"]["name"])


def tiny_spinrun(namespace: str, name: str = "tiny") -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "manifests" / "examples" / "spinrun-tiny.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": namespace}
    return doc


def spinruns_path(namespace: str) -> str:
    return f"/apis/{spec.GROUP}/{spec.VERSION}/namespaces/{namespace}/spinruns"


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

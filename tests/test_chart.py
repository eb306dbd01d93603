"""The Helm chart, rendered by the real (pinned) helm: lint, schemas, security settings, modes, least-privilege RBAC.

No API server is needed: `helm lint`, `helm template` and `helm install --dry-run=client` work offline, and every
rendered object is validated against the Kubernetes OpenAPI schemas shipped by kubernetes-validate.
"""

from __future__ import annotations

import json
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "spin-operator"
REQUEST_LOG = ROOT / "tests" / "data" / "operator_api_requests.json"
NAMESPACE = "spin-system"
RELEASE = "spin-operator"

# The chart says kubeVersion >=1.29; validate against that and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
# Custom resources whose schema kubernetes-validate does not ship (prometheus-operator's CRD is not ours to vendor).
NO_OFFLINE_SCHEMA = {"ServiceMonitor"}

SCENARIOS: dict[str, list[str]] = {
    "default": [],
    "namespaced": ["--set-json", 'watchNamespaces=["team-a","team-b"]'],
    "ha": ["--set", "ha.enabled=true", "--set", "replicas=2"],
    "ha-namespaced": [
        "--set", "ha.enabled=true", "--set", "replicas=3", "--set-json", 'watchNamespaces=["team-a","team-b"]',
    ],
    "custom-images": [
        "--set", "image.repository=registry.example.com/ml/spin-operator", "--set", "image.tag=1.2.3",
        "--set", "generator.image.repository=registry.example.com/ml/spin-generator",
        "--set", "generator.image.tag=1.2.3-cu129",
        "--set", "trainer.image.repository=registry.example.com/ml/spin-trainer", "--set", "trainer.image.tag=1.2.3",
        "--set-json", 'imagePullSecrets=[{"name":"regcred"}]', "--set", "jobServiceAccount=spin-jobs",
    ],
    "metrics": [
        "--set", "metrics.enabled=true", "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "metrics.serviceMonitor.labels.release=prometheus",
    ],
    "namespaced-no-observer": ["--set-json", 'watchNamespaces=["team-a"]', "--set", "rbac.clusterObserver=false"],
}  # fmt: skip


def _helm(helm_bin: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm_bin), *args], capture_output=True, text=True, timeout=120)


@cache
def _render_cached(helm_bin: Path, args: tuple[str, ...]) -> str:
    done = _helm(helm_bin, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert done.returncode == 0, f"helm template {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout


def render(helm_bin: Path, *args: str) -> list[dict[str, Any]]:
    """Every object `helm template` renders (fresh copies: tests may mutate them)."""
    return [d for d in yaml.safe_load_all(_render_cached(helm_bin, tuple(args))) if d]


def render_error(helm_bin: Path, *args: str) -> str:
    done = _helm(helm_bin, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert done.returncode != 0, f"helm template {' '.join(args)} should have failed but rendered:\n{done.stdout}"
    return done.stderr


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


def is_user_role(obj: dict[str, Any]) -> bool:
    """The ClusterRoles that give namespace users access to SpinRuns (aggregated into view/edit/admin)."""
    return any(k.startswith(AGGREGATE) for k in (obj["metadata"].get("labels") or {}))


def operator_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The release's objects minus the users' aggregated ClusterRoles: what the operator itself runs with."""
    return [o for o in objects if not is_user_role(o)]


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(objects)["env"]}


# ---------------------------------------------------------------------------------------------------- lint, schemas


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict(helm_bin, scenario):
    done = _helm(helm_bin, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *SCENARIOS[scenario])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


def _short(error: Exception) -> str:
    path = "/".join(str(p) for p in getattr(error, "absolute_path", []))
    return f"{path}: {getattr(error, 'message', error)}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_objects_match_kubernetes_schemas(helm_bin, scenario, version):
    objects = render(helm_bin, *SCENARIOS[scenario])
    crds = {
        (o["spec"]["group"], o["spec"]["names"]["kind"]): o for o in objects if o["kind"] == "CustomResourceDefinition"
    }
    problems = []
    for obj in objects:
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
        if (group, obj["kind"]) in crds:  # a custom resource whose CRD is in this same rendering (kopf peering)
            schema = crds[group, obj["kind"]]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            try:
                jsonschema.validate(obj, schema)
            except jsonschema.ValidationError as e:
                problems.append(f"{what}: {_short(e)}")
            continue
        if obj["kind"] in NO_OFFLINE_SCHEMA:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{what}: {_short(e)}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{what}: no Kubernetes {version} schema for {obj['apiVersion']} {obj['kind']}")
    assert not problems, "\n".join(problems)


def test_chart_crd_is_a_valid_crd(helm_bin):
    objects = [o for o in render(helm_bin, "--include-crds") if o["kind"] == "CustomResourceDefinition"]
    names = {o["metadata"]["name"] for o in objects}
    assert names == {"spinruns.selfplay.dev"}, names
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(objects[0], version, strict=True)
    # Its openAPIV3Schema is itself a valid JSON schema.
    schema = objects[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.Draft4Validator.check_schema(schema)  # OpenAPI 3.0 schemas are draft-4 style (boolean exclusiveMinimum)


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == "0.1.0"
    assert chart["type"] == "application"


def test_kube_version_floor_enforced(helm_bin):
    err = render_error(helm_bin, "--kube-version", "1.28.0")
    assert "kubeVersion" in err or "1.29" in err, err


# ---------------------------------------------------------------------------------------------------- values.schema


BAD_VALUES = [
    (["--set", "replicas=two"], "/replicas"),
    (["--set", "watchNamespaces=ns"], "/watchNamespaces"),
    (["--set", "unknownTopLevel=1"], "unknownTopLevel"),
    (["--set", "ha.enabled=yes"], "/ha/enabled"),
    (["--set", "ha.replicas=2"], "replicas"),  # no such key: HA uses the top-level replicas
    (["--set", "replicas=0"], "/replicas"),
    (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    (["--set", "image.tag=has space"], "/image/tag"),
    (["--set", "metrics.port=99999"], "/metrics/port"),
    (["--set", "metrics.serviceMonitor.interval=often"], "/metrics/serviceMonitor/interval"),
    (["--set-json", 'watchNamespaces=["Team_A"]'], "/watchNamespaces/0"),
    (["--set-json", 'watchNamespaces=["a","a"]'], "/watchNamespaces"),
    (["--set-json", 'generator={"image":{"repository":"x"},"gpus":1}'], "gpus"),
    (["--set", "trainer.resources.requests.memory=lots"], "/trainer/resources/requests/memory"),
    (["--set", "extraArgs=--verbose"], "/extraArgs"),
    (["--set", "rbac.create=no"], "/rbac/create"),
    (["--set", "jobServiceAccount=Not Valid"], "/jobServiceAccount"),
    (["--set-json", 'podDefaults={"nodeSelecter":{"a":"b"}}'], "nodeSelecter"),
    (["--set-json", 'podDefaults={"activeDeadlineSeconds":0}'], "/podDefaults/activeDeadlineSeconds"),
    (["--set-json", 'podDefaults={"volumes":[{"name":"x","mountPath":"/x","hostPath":"/"}]}'], "hostPath"),
    (["--set-json", 'policy={"allowedSecrets":["Bad_Name"]}'], "/policy/allowedSecrets/0"),
]


@pytest.mark.parametrize(("args", "named"), BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_values_schema_rejects_wrong_values(helm_bin, args, named):
    err = render_error(helm_bin, *args)
    assert "schema" in err, err
    assert named in err, f"the error does not name {named!r}:\n{err}"


def test_more_replicas_need_ha(helm_bin):
    err = render_error(helm_bin, "--set", "replicas=2")
    assert "ha.enabled" in err and "replicas" in err, err


def test_values_yaml_is_documented_line_by_line():
    """Every setting in values.yaml has a comment right above it (nested requests/limits and security contexts
    are documented by their parent's comment)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][A-Za-z0-9_.-]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parents = [k for _, k in stack]
        stack.append((indent, key))
        if {"resources", "podSecurityContext", "securityContext"} & set(parents):
            continue
        above = lines[i - 1].strip() if i else ""
        is_section = not line.split(":", 1)[1].strip() and i + 1 < len(lines) and lines[i + 1].startswith(" ")
        if not above.startswith("#") and not (is_section and parents):
            undocumented.append(f"values.yaml:{i + 1}: {'.'.join([*parents, key])}")
    assert not undocumented, "settings without a comment:\n" + "\n".join(undocumented)


def test_values_schema_covers_every_default():
    """Every key in values.yaml is declared by values.schema.json (helm lint only checks types it knows)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(values, schema)

    def undeclared(node: dict[str, Any], sch: dict[str, Any], path: str) -> list[str]:
        props = sch.get("properties")
        if props is None:  # a free-form object (securityContext, affinity) or a map (requests)
            return []
        out = []
        for key, value in node.items():
            if key not in props:
                out.append(f"{path}{key}")
            elif isinstance(value, dict):
                out += undeclared(value, props[key], f"{path}{key}.")
        return out

    missing = undeclared(values, schema, "")
    assert not missing, f"values.yaml keys missing from values.schema.json: {missing}"


# ---------------------------------------------------------------------------------------------------- the Deployment


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_deployment_security(helm_bin, scenario):
    objects = render(helm_bin, *SCENARIOS[scenario])
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    c = container(objects)
    psc, csc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert csc["runAsNonRoot"] is True and csc["runAsUser"] != 0
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc.get("privileged", False) is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(host)
    # /tmp is writable through an emptyDir, nothing else is mounted.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts == {"/tmp": "tmp"}
    assert {v["name"]: v for v in pod["volumes"]}["tmp"]["emptyDir"] is not None
    # Requests and limits are set.
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]


def test_deployment_runs_spin_operator_with_kopf_health(helm_bin):
    objects = render(helm_bin)
    c = container(objects)
    assert c["command"] == ["spin"]
    assert c["args"][0] == "operator"
    assert c["args"][c["args"].index("--liveness") + 1] == "http://0.0.0.0:8080/healthz"
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in c["ports"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    env = env_of(objects)
    assert env["SPIN_GENERATOR_IMAGE"] == "ghcr.io/spin-selfplay/spin-generator:0.1.0"
    assert env["SPIN_TRAINER_IMAGE"] == "ghcr.io/spin-selfplay/spin-trainer:0.1.0"
    assert json.loads(env["SPIN_GENERATOR_RESOURCES"])["requests"]["memory"] == "48Gi"
    assert json.loads(env["SPIN_TRAINER_RESOURCES"])["limits"]["memory"] == "256Gi"
    assert env["POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert c["image"] == "ghcr.io/spin-selfplay/spin-operator:0.1.0"
    assert "HF_HUB_OFFLINE" not in env and "SPIN_JOB_SERVICE_ACCOUNT" not in env


def test_default_is_cluster_wide_standalone(helm_bin):
    objects = operator_objects(render(helm_bin))
    assert kinds(objects) == ["ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount"]
    deployment = only(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    args = container(objects)["args"]
    assert "--all-namespaces" in args and "--standalone" in args
    assert "--peering" not in args and "--namespace" not in args and "--metrics-port" not in args
    binding = only(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "spin-operator", "namespace": NAMESPACE}]
    assert binding["roleRef"]["name"] == only(objects, "ClusterRole")["metadata"]["name"]
    assert all(o["metadata"].get("namespace") in (None, NAMESPACE) for o in objects)


def test_namespaced_mode(helm_bin):
    objects = operator_objects(render(helm_bin, *SCENARIOS["namespaced"]))
    args = container(objects)["args"]
    assert "--all-namespaces" not in args
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == ["team-a", "team-b"]
    roles = {o["metadata"]["namespace"]: o for o in objects if o["kind"] == "Role"}
    bindings = {o["metadata"]["namespace"]: o for o in objects if o["kind"] == "RoleBinding"}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    for ns, binding in bindings.items():
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "spin-operator"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "spin-operator", "namespace": NAMESPACE}]
        assert roles[ns]["rules"] == roles["team-a"]["rules"]
    # The only cluster-wide grant is kopf's read-only observer.
    observer = only(objects, "ClusterRole")
    assert observer["metadata"]["name"] == "spin-operator-observer"
    assert grants(observer) == {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
    }
    no_observer = operator_objects(render(helm_bin, *SCENARIOS["namespaced-no-observer"]))
    assert "ClusterRole" not in kinds(no_observer) and "ClusterRoleBinding" not in kinds(no_observer)


def test_ha_mode(helm_bin):
    objects = render(helm_bin, *SCENARIOS["ha"])
    deployment = only(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    args = container(objects)["args"]
    assert args[args.index("--peering") + 1] == "spin-operator"
    assert "--standalone" not in args
    crds = {o["metadata"]["name"] for o in objects if o["kind"] == "CustomResourceDefinition"}
    assert crds == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    peering = only(objects, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "spin-operator"
    assert peering["metadata"]["annotations"]["helm.sh/hook"] == "post-install"
    assert only(objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    affinity = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert affinity["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"]
    # Namespaced HA: one KopfPeering per watched namespace, no cluster peering object.
    ns_objects = render(helm_bin, *SCENARIOS["ha-namespaced"])
    assert sorted(o["metadata"]["namespace"] for o in ns_objects if o["kind"] == "KopfPeering") == ["team-a", "team-b"]
    assert "ClusterKopfPeering" not in kinds(ns_objects)
    # Peering CRDs can be left to another kopf operator's installation.
    shared = render(helm_bin, *SCENARIOS["ha"], "--set", "ha.createPeeringCRDs=false")
    assert "CustomResourceDefinition" not in kinds(shared)


def test_custom_images(helm_bin):
    objects = render(helm_bin, *SCENARIOS["custom-images"])
    c = container(objects)
    assert c["image"] == "registry.example.com/ml/spin-operator:1.2.3"
    env = env_of(objects)
    assert env["SPIN_GENERATOR_IMAGE"] == "registry.example.com/ml/spin-generator:1.2.3-cu129"
    assert env["SPIN_TRAINER_IMAGE"] == "registry.example.com/ml/spin-trainer:1.2.3"
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert env["SPIN_JOB_SERVICE_ACCOUNT"] == "spin-jobs"


def test_metrics(helm_bin):
    objects = render(helm_bin, *SCENARIOS["metrics"])
    c = container(objects)
    assert c["args"][c["args"].index("--metrics-port") + 1] == "9090"
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in c["ports"]
    service = only(objects, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    pod_labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = only(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    # A ServiceMonitor needs the metrics Service.
    assert "ServiceMonitor" not in kinds(render(helm_bin, "--set", "metrics.serviceMonitor.enabled=true"))


def test_notes_tell_how_to_apply_and_watch(helm_bin):
    done = _helm(helm_bin, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n <namespace> apply -f manifests/examples/spinrun-zephyr-7b.yaml" in notes
    assert "get spinruns -w" in notes and "describe spinrun" in notes
    assert "s3-credentials" in notes


# ---------------------------------------------------------------------------------------------------- RBAC

PEERING_GROUPS = {"kopf.dev", "zalando.org"}
# kopf lists and watches namespaces only when serving a list of namespaces (never with --all-namespaces).
NAMESPACE_SCAN = {("", "namespaces", "list"), ("", "namespaces", "watch")}
# Granted although no request uses it: with the OwnerReferencesPermissionEnforcement admission plugin, setting
# blockOwnerDeletion on a child's ownerReference to a SpinRun needs `update` on spinruns/finalizers.
ADMISSION_ONLY = {("selfplay.dev", "spinruns/finalizers", "update")}
CLUSTER_SCOPED = {"namespaces", "customresourcedefinitions", "clusterkopfpeerings"}
RBAC_KINDS = {"Role", "ClusterRole"}


def grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples a Role/ClusterRole grants."""
    out = set()
    for rule in role.get("rules", []):
        assert "nonResourceURLs" not in rule, f"{role['metadata']['name']}: nonResourceURLs granted: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rbac_has_no_wildcards_secrets_or_escalation(helm_bin, scenario):
    objects = operator_objects(render(helm_bin, *SCENARIOS[scenario]))
    roles = [o for o in objects if o["kind"] in RBAC_KINDS]
    assert roles
    args = SCENARIOS[scenario]
    ha = "ha.enabled=true" in args
    peering_kind = "Role" if any("watchNamespaces" in a for a in args) else "ClusterRole"
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{role['metadata']['name']}: wildcard in {field}: {rule}"
            assert "resourceNames" not in rule or rule["resourceNames"], rule
        triples = grants(role)
        assert not {t for t in triples if t[1].split("/")[0] == "secrets"}, f"{role['metadata']['name']} has secrets"
        assert not {t for t in triples if t[2] in ("escalate", "bind", "impersonate", "deletecollection")}
        assert not {t for t in triples if t[1] in ("roles", "clusterroles", "rolebindings", "clusterrolebindings")}
        peering = {t for t in triples if t[0] in PEERING_GROUPS}
        expect_peering = ha and role["kind"] == peering_kind and not role["metadata"]["name"].endswith("-observer")
        assert bool(peering) == expect_peering, f"{scenario}: peering rules {peering} in {role['kind']}"
        if role["kind"] == "Role":
            assert not {t for t in triples if t[1] in CLUSTER_SCOPED}, f"cluster-scoped resource in a Role: {role}"


def test_rbac_create_false_renders_no_rbac(helm_bin):
    objects = render(helm_bin, "--set", "rbac.create=false")
    assert not [o for o in objects if o["kind"] in RBAC_KINDS | {"RoleBinding", "ClusterRoleBinding"}]


def _split_path(path: str) -> dict[str, Any] | None:
    """Parse a Kubernetes API URL path into group, version, resource, subresource, namespace, name."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest:
        return None  # discovery (/api/v1, /apis/batch/v1)
    return {
        "group": group,
        "version": version,
        "resource": rest[0],
        "name": rest[1] if len(rest) > 1 else None,
        "subresource": rest[2] if len(rest) > 2 else None,
        "namespace": namespace,
        "watch": "watch=true" in path or "watch=1" in path,
    }


def _gvr(entry: dict[str, Any]) -> tuple[str, str] | None:
    """(group, resource) of a logged request, from whichever fields the log has; None for discovery requests."""
    for key in ("path", "url"):
        if isinstance(entry.get(key), str) and entry[key]:
            parsed = _split_path(re.sub(r"^[a-z]+://[^/]+", "", entry[key]))
            if parsed is None:
                return None
            entry.setdefault("name", parsed["name"])
            entry.setdefault("subresource", parsed["subresource"])
            entry.setdefault("watch", parsed["watch"])
            return parsed["group"], parsed["resource"]
    resource = entry.get("resource") or entry.get("plural")
    group = entry.get("group")
    if isinstance(resource, dict):
        group, resource = resource.get("group"), resource.get("plural") or resource.get("resource")
    if not resource:
        return None
    if "/" in resource:  # "batch/v1/jobs", "v1/pods"
        parts = resource.split("/")
        group, resource = (parts[0], parts[2]) if len(parts) == 3 else ("", parts[-1])
    if group is None:
        api_version = entry.get("apiVersion") or entry.get("api_version") or entry.get("groupVersion") or ""
        group = api_version.split("/")[0] if "/" in api_version else ""
    return group or "", resource


def _verb(entry: dict[str, Any]) -> str:
    if entry.get("verb"):
        return str(entry["verb"]).lower()
    method = str(entry.get("method", "")).upper().removeprefix("METHOD.")
    action = str(entry.get("action") or "").upper().removeprefix("ACTION.")
    if action:
        if action == "UPDATE":
            return "patch" if method == "PATCH" else "update"
        return {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "DELETE": "delete"}[action]
    params = entry.get("params") or {}
    watch = entry.get("watch") or str(params.get("watch", "")).lower() in ("true", "1")
    named = bool(entry.get("name"))
    return {
        "GET": "watch" if watch else ("get" if named else "list"),
        "POST": "create",
        "PATCH": "patch",
        "PUT": "update",
        "DELETE": "delete" if named else "deletecollection",
    }[method]


def requested_permissions(entries: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource[/subresource], verb) of every resource request in the operator's request log."""
    out = set()
    for raw in entries:
        entry = dict(raw)
        gvr = _gvr(entry)
        if gvr is None:
            continue
        group, resource = gvr
        if entry.get("subresource"):
            resource = f"{resource}/{entry['subresource']}"
        out.add((group, resource, _verb(entry)))
    return out


def test_request_log_parser_understands_the_log_shapes():
    log = [
        {"method": "GET", "path": "/apis"},  # discovery
        {"method": "GET", "path": "/apis/selfplay.dev/v1alpha1/spinruns?watch=true&resourceVersion=1"},
        {"method": "GET", "path": "/apis/selfplay.dev/v1alpha1/spinruns"},
        {"method": "PATCH", "url": "http://127.0.0.1:1/apis/selfplay.dev/v1alpha1/namespaces/a/spinruns/r/status"},
        {"method": "GET", "path": "/api/v1/namespaces"},
        {"method": "GET", "group": "", "version": "v1", "resource": "pods", "namespaced": True, "name": "p"},
        {"method": "POST", "resource": "batch/v1/jobs", "namespace": "a", "subresource": None},
        {"method": "DELETE", "group": "kubeflow.org", "version": "v1", "resource": "pytorchjobs", "name": "x"},
        {"method": "method.GET", "action": "WATCH", "resource": "v1/events", "namespace": None},
        {"method": "PATCH", "action": "UPDATE", "group": "kopf.dev", "resource": "clusterkopfpeerings", "name": "p"},
        {"verb": "create", "group": "", "resource": "configmaps"},
    ]
    assert requested_permissions(log) == {
        ("selfplay.dev", "spinruns", "watch"),
        ("selfplay.dev", "spinruns", "list"),
        ("selfplay.dev", "spinruns/status", "patch"),
        ("", "namespaces", "list"),
        ("", "pods", "get"),
        ("batch", "jobs", "create"),
        ("kubeflow.org", "pytorchjobs", "delete"),
        ("", "events", "watch"),
        ("kopf.dev", "clusterkopfpeerings", "patch"),
        ("", "configmaps", "create"),
    }


def _describe(triples: set[tuple[str, str, str]]) -> str:
    return "\n".join(f"  {g or 'core'} {r} {v}" for g, r, v in sorted(triples)) or "  (none)"


def test_rbac_grants_exactly_what_the_operator_requests(helm_bin):
    """The ClusterRole grants every (apiGroup, resource, verb) the operator's tests saw it request, and nothing else
    (plus kopf peering in HA mode only, and the one admission-time permission in ADMISSION_ONLY)."""
    if not REQUEST_LOG.exists():
        pytest.fail(
            f"{REQUEST_LOG.relative_to(ROOT)} does not exist: the operator tests have to run first (they record "
            "every Kubernetes API request the operator makes there; the RBAC of the chart is checked against it). "
            "Run the operator tests, e.g. `.venv/bin/python -m pytest tests -k operator`, then this test.",
            pytrace=False,
        )
    entries = json.loads(REQUEST_LOG.read_text())
    if isinstance(entries, dict):
        entries = entries.get("requests", [])
    requested = requested_permissions(entries)
    assert ("selfplay.dev", "spinruns", "watch") in requested, (
        f"{REQUEST_LOG.name} has no watch on spinruns: it looks incomplete; requested:\n{_describe(requested)}"
    )
    peering_requested = {t for t in requested if t[0] in PEERING_GROUPS}
    needed = requested - peering_requested - NAMESPACE_SCAN

    # Cluster-wide (the default): one ClusterRole.
    granted = grants(only(operator_objects(render(helm_bin)), "ClusterRole"))
    missing, extra = needed - granted, granted - needed - ADMISSION_ONLY
    assert not missing and not extra, (
        f"the chart's ClusterRole and the operator's requests differ.\nrequested but not granted:\n"
        f"{_describe(missing)}\ngranted but never requested:\n{_describe(extra)}\n"
        "(fix the rules in charts/spin-operator/templates/_helpers.tpl)"
    )

    # HA adds exactly the peering rules, and they cover what the operator asked of peering objects.
    granted_ha = grants(only(operator_objects(render(helm_bin, *SCENARIOS["ha"])), "ClusterRole"))
    assert granted_ha - granted == {("kopf.dev", "clusterkopfpeerings", v) for v in ("list", "watch", "patch")}
    peering_cluster = {("kopf.dev", "clusterkopfpeerings", verb) for _, _, verb in peering_requested}
    assert peering_cluster <= granted_ha, f"peering requests not granted:\n{_describe(peering_cluster - granted_ha)}"

    # Namespaced: the Role of each namespace plus the observer ClusterRole cover the same needs; the only extras
    # are kopf's namespace list/watch, which it does in this mode.
    objects = operator_objects(render(helm_bin, *SCENARIOS["namespaced"]))
    role = {t for o in objects if o["kind"] == "Role" for t in grants(o)}
    observer = grants(only(objects, "ClusterRole"))
    union = role | observer
    assert not needed - union, f"namespaced mode lacks:\n{_describe(needed - union)}"
    assert not union - needed - ADMISSION_ONLY - NAMESPACE_SCAN, _describe(union - needed - ADMISSION_ONLY)


def test_the_operations_guide_lists_exactly_the_rbac_the_chart_grants(helm_bin):
    """docs/operations.md's RBAC table (resource -> verbs) says what the chart grants in its modes: cluster-wide,
    namespaced (plus kopf's namespace scan) and HA (plus peering)."""
    text = (ROOT / "docs" / "operations.md").read_text()
    table = text[text.index("### What the operator may do (RBAC)") :].split("\n\n")[2]
    documented = set()
    for row in table.splitlines()[2:]:
        resources, verbs = row.split("|")[1:3]
        for resource in re.findall(r"`([a-z/]+)`", resources):
            documented |= {(resource, verb.strip()) for verb in verbs.split(",")}
    granted = set()
    for scenario in ("default", "namespaced", "ha", "ha-namespaced"):
        for role in operator_objects(render(helm_bin, *SCENARIOS[scenario])):
            if role["kind"] in RBAC_KINDS:
                granted |= {(resource, verb) for _, resource, verb in grants(role)}
    assert documented == granted, (
        f"docs/operations.md's RBAC table differs from the chart.\ndocumented, not granted: "
        f"{sorted(documented - granted)}\ngranted, not documented: {sorted(granted - documented)}"
    )


def test_namespace_users_get_spinruns_through_the_default_roles(helm_bin):
    """view/edit/admin users of a namespace may see SpinRuns, edit/admin users create and delete them; nobody but the
    operator writes their status, and the aggregated roles grant nothing else."""
    roles = {o["metadata"]["name"]: o for o in render(helm_bin) if is_user_role(o)}
    view, edit = roles["spin-operator-spinruns-view"], roles["spin-operator-spinruns-edit"]
    aggregated = {name: {k.removeprefix(AGGREGATE) for k in r["metadata"]["labels"] if k.startswith(AGGREGATE)}
                  for name, r in roles.items()}  # fmt: skip
    assert aggregated == {
        view["metadata"]["name"]: {"view", "edit", "admin"},
        edit["metadata"]["name"]: {"edit", "admin"},
    }
    assert grants(view) == {
        ("selfplay.dev", r, v) for r in ("spinruns", "spinruns/status") for v in ("get", "list", "watch")
    }
    assert grants(edit) == {
        ("selfplay.dev", "spinruns", v) for v in ("create", "update", "patch", "delete", "deletecollection")
    }
    assert not [o for o in render(helm_bin, "--set", "rbac.aggregateToDefaultRoles=false") if is_user_role(o)]


def test_pod_defaults_share_the_spinrun_schema_and_reach_the_operator(helm_bin):
    """values.schema.json's podDefaults is spec.pods' schema (generated: `make crd`), and the chart hands the value,
    the registry allow-list and the Secret allow-list to the operator as the environment its Config reads."""
    from spin_core.crd import CHART_VALUES_SCHEMA, pod_settings_schema

    assert json.loads(CHART_VALUES_SCHEMA.read_text())["properties"]["podDefaults"] == pod_settings_schema(), (
        "charts/spin-operator/values.schema.json podDefaults is stale: run `make crd`"
    )
    pods = {"priorityClassName": "batch-low", "podLabels": {"team": "nlp"}, "scratchSize": "200Gi"}
    objects = render(
        helm_bin,
        "--set-json", f"podDefaults={json.dumps(pods)}",
        "--set-json", 'policy={"allowedRegistries":["registry.example.com/ml/"],"restrictSecrets":true,'
        '"allowedSecrets":["s3-credentials","hf-token"]}',
    )  # fmt: skip
    env = env_of(objects)
    assert json.loads(env["SPIN_POD_DEFAULTS"]) == pods
    assert env["SPIN_ALLOWED_REGISTRIES"] == "registry.example.com/ml/"
    assert env["SPIN_ALLOWED_SECRETS"] == "s3-credentials,hf-token"
    defaults = env_of(render(helm_bin))
    assert not {"SPIN_POD_DEFAULTS", "SPIN_ALLOWED_REGISTRIES", "SPIN_ALLOWED_SECRETS"} & set(defaults)

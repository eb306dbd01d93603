"""Build the Kubernetes control plane for the cluster tests, once: `python -m tests.cluster.build [TARGET...]`.

Each target is a small Go module under tests/cluster/ (go.mod + go.sum pinned and committed) whose `tool`
directives name what to compile; its binaries land in `.cache/cluster/<target>-<hash>/` (or under
`$SPIN_CLUSTER_CACHE`), where the hash covers the module's go.mod, go.sum and the build flags. A finished folder is
never rebuilt, so a second run is a no-op. Targets:

- `kube` (default): kube-apiserver, kube-controller-manager, kube-scheduler (k8s.io/kubernetes v1.37.2) and etcd
  (go.etcd.io/etcd/server/v3 v3.7.0, the version Kubernetes pins), in one `go build` so the shared packages compile
  once;
- `training-operator` (default): the Kubeflow Training Operator v1.9.4, with its CRDs and webhook manifest copied
  out of the module (manifests/base/) so the tests need no Go at run time;
- `trainer` (default, data only): Kubeflow Trainer v2.0.0's CRDs and ClusterTrainingRuntimes, copied out of its
  module (its controller, which needs JobSet, is not built);
- `kueue` (optional, not built by default): Kueue v0.17.0's manager, with its CRDs.

Go's own caches are used (GOCACHE, GOMODCACHE; set them to keep everything under one folder). The binaries are
stripped (`-trimpath -ldflags=-s -w`, CGO_ENABLED=0) to keep a cold build on a small CI machine short.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
KUBE_VERSION = "v1.37.2"

# What `go version` must report at least (the modules say `go 1.26.0`).
GO_MIN = (1, 26)


@dataclass(frozen=True)
class Target:
    name: str
    binaries: dict[str, str]  # output name -> Go package (each listed as a `tool` in the module's go.mod)
    ldflags: tuple[str, ...] = ()
    data: dict[str, tuple[str, str]] = field(default_factory=dict)  # output folder -> (module, folder inside it)
    default: bool = True

    @property
    def module_dir(self) -> Path:
        return HERE / self.name


_VERSION_PKG = "k8s.io/component-base/version"
TARGETS = {
    t.name: t
    for t in (
        Target(
            name="kube",
            binaries={
                "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
                "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
                "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
                "etcd": "go.etcd.io/etcd/server/v3",
            },
            # What hack/lib/version.sh stamps into a release build: without it /version says v0.0.0-master and
            # helm refuses charts with a kubeVersion constraint.
            ldflags=(
                f"-X {_VERSION_PKG}.gitVersion={KUBE_VERSION}",
                f"-X {_VERSION_PKG}.gitMajor={KUBE_VERSION[1:].split('.')[0]}",
                f"-X {_VERSION_PKG}.gitMinor={KUBE_VERSION.split('.')[1]}",
                f"-X {_VERSION_PKG}.gitTreeState=clean",
            ),
        ),
        Target(
            name="training-operator",
            binaries={"training-operator": "github.com/kubeflow/training-operator/cmd/training-operator.v1"},
            data={
                "crds": ("github.com/kubeflow/training-operator", "manifests/base/crds"),
                "webhook": ("github.com/kubeflow/training-operator", "manifests/base/webhook"),
                "rbac": ("github.com/kubeflow/training-operator", "manifests/base/rbac"),
            },
        ),
        Target(
            name="trainer",
            binaries={},  # data only: Kubeflow Trainer v2's CRDs and runtimes (its controller needs JobSet; not run)
            data={
                "crds": ("github.com/kubeflow/trainer/v2", "manifests/base/crds"),
                "runtimes": ("github.com/kubeflow/trainer/v2", "manifests/base/runtimes"),
            },
        ),
        Target(
            name="kueue",
            binaries={"kueue": "sigs.k8s.io/kueue/cmd/kueue"},
            data={"crds": ("sigs.k8s.io/kueue", "config/components/crd/bases")},
            default=False,
        ),
    )
}
DEFAULT_TARGETS = tuple(name for name, t in TARGETS.items() if t.default)

GO_FLAGS = ("-trimpath",)
BASE_LDFLAGS = ("-s", "-w")


class BuildError(RuntimeError):
    """The control plane cannot be built; the message says why."""


def cache_root() -> Path:
    return Path(os.environ.get("SPIN_CLUSTER_CACHE") or ROOT / ".cache" / "cluster")


def _go() -> str:
    go = shutil.which("go")
    if not go:
        raise BuildError("the Go toolchain (go >= 1.26) is not on PATH; install it from https://go.dev/dl/")
    return go


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["CGO_ENABLED"] = "0"
    env.setdefault("GOFLAGS", "-buildvcs=false")
    if "-buildvcs" not in env["GOFLAGS"]:
        env["GOFLAGS"] += " -buildvcs=false"
    return env


def _ldflags(target: Target) -> str:
    return " ".join((*BASE_LDFLAGS, *target.ldflags))


def target_hash(target: Target) -> str:
    """A digest of what determines the binaries: go.mod, go.sum and the build flags."""
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum"):
        digest.update((target.module_dir / name).read_bytes())
    digest.update(json.dumps([GO_FLAGS, _ldflags(target), sorted(target.binaries.items()), target.data]).encode())
    return digest.hexdigest()[:16]


def target_dir(name: str) -> Path:
    """Where `name`'s binaries live once built (`<dir>/bin/<binary>`; data folders beside bin/)."""
    target = TARGETS[name]
    return cache_root() / f"{target.name}-{target_hash(target)}"


def is_built(name: str) -> bool:
    return (target_dir(name) / "DONE").is_file()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One build at a time across processes (pytest workers, another checkout sharing the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    if done.returncode:
        raise BuildError(f"`{' '.join(cmd)}` in {cwd} failed ({done.returncode}):\n{done.stderr[-6000:]}")
    return done.stdout


def _module_dir(target: Target, module: str) -> Path:
    info = json.loads(_run([_go(), "list", "-m", "-json", module], target.module_dir))
    if not info.get("Dir"):
        _run([_go(), "mod", "download", module], target.module_dir)
        info = json.loads(_run([_go(), "list", "-m", "-json", module], target.module_dir))
    return Path(info["Dir"])


def build(name: str, log=print) -> Path:
    """Build target `name` unless its folder exists; returns the folder."""
    if name not in TARGETS:
        raise BuildError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    target = TARGETS[name]
    final = target_dir(name)
    if is_built(name):
        log(f"{name}: cached in {final}")
        return final
    with _locked(cache_root() / f".{name}.lock"):
        if is_built(name):
            log(f"{name}: cached in {final}")
            return final
        go = _go()
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root()))
        try:
            bin_dir = staging / "bin"
            bin_dir.mkdir()
            if target.binaries:
                _run(
                    [
                        go,
                        "build",
                        *GO_FLAGS,
                        f"-ldflags={_ldflags(target)}",
                        "-o",
                        f"{bin_dir}/",
                        *target.binaries.values(),
                    ],
                    target.module_dir,
                )
            for out, pkg in target.binaries.items():
                built = bin_dir / _go_binary_name(pkg)
                if built != bin_dir / out:
                    built.rename(bin_dir / out)
            for out, (module, folder) in target.data.items():
                shutil.copytree(_module_dir(target, module) / folder, staging / out)
                for path in (staging / out).rglob("*"):
                    path.chmod(0o755 if path.is_dir() else 0o644)
            (staging / "DONE").write_text(json.dumps({"seconds": round(time.monotonic() - started, 1)}) + "\n")
            if final.exists():
                shutil.rmtree(final)
            staging.chmod(0o755)
            staging.rename(final)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        log(f"{name}: built in {time.monotonic() - started:.0f} s -> {final}")
        return final


def _go_binary_name(pkg: str) -> str:
    """The file name `go build -o DIR/` gives a main package (a trailing /vN major suffix is skipped)."""
    parts = pkg.split("/")
    last = parts[-1]
    if len(parts) > 1 and last.startswith("v") and last[1:].isdigit():
        last = parts[-2]
    return last


def binary(target: str, name: str) -> Path:
    """Path of a built binary; builds the target first when needed."""
    return build(target, log=lambda _msg: None) / "bin" / name


def check_go() -> str:
    out = subprocess.run([_go(), "env", "GOVERSION"], capture_output=True, text=True, env=_env()).stdout.strip()
    digits = out.removeprefix("go").split(".")
    try:
        version = (int(digits[0]), int(digits[1]))
    except (IndexError, ValueError) as e:
        raise BuildError(f"cannot read the Go version from {out!r}") from e
    if version < GO_MIN:
        raise BuildError(f"{out} is too old: the cluster modules need go >= {GO_MIN[0]}.{GO_MIN[1]}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(f"usage: python -m tests.cluster.build [{'|'.join(TARGETS)}]...  (default: {' '.join(DEFAULT_TARGETS)})")
        return 0
    try:
        print(f"go: {check_go()}, cache: {cache_root()}")
        total = time.monotonic()
        for name in args or DEFAULT_TARGETS:
            started = time.monotonic()
            build(name, log=lambda msg, s=started: print(f"{msg} ({time.monotonic() - s:.1f} s)", flush=True))
        print(f"total {time.monotonic() - total:.1f} s")
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

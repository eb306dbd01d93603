"""Stand-in for a container runtime's last step: `python tests/cluster/shim.py SPEC.json` becomes the container.

SPEC (written by the stand-in kubelet) holds `argv`, `env`, `cwd`, `uid`, `gid`, `groups` and `mounts`
(`source`, `target`, `readOnly`; or `target` and `tmpfs`). The shim enters a private mount namespace
(unshare(CLONE_NEWNS), the mounts made private so nothing propagates back), bind-mounts every source at its target
(an empty tmpfs for `tmpfs`), so the process sees its volumes at their real paths (/etc/spin/run.json,
/var/run/secrets/kubernetes.io/serviceaccount/token, /dev/termination-log), drops to the container's user and
groups, and execs argv. No image filesystem, no network or PID namespace, no
cgroups: the process sees the host's files and network.

The container gets a private /dev (a tmpfs with the host's standard devices). Any other mount target missing on
the host is created there first (an empty directory, left in place: only a mount point; its contents exist inside
the container's namespace alone).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_NOSUID = 0x2
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, flags: int, fstype: str | None = None, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source or fstype} on {target}",
    )


def _ensure_target(target: Path, is_dir: bool) -> None:
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        target.mkdir(exist_ok=True)
    else:
        target.touch(exist_ok=True)


# A container's /dev as a runtime makes it: a fresh tmpfs with the host's standard devices bound in. (Then a
# /dev/termination-log mount point exists in the container alone: on the host its existence would tell every local
# `spin` process that it runs in a pod.)
DEVICES = ("null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "mqueue")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}  # fmt: skip


def _private_dev() -> None:
    devices = [(name, os.open(f"/dev/{name}", os.O_PATH)) for name in DEVICES if os.path.exists(f"/dev/{name}")]
    _mount("tmpfs", "/dev", MS_NOSUID, "tmpfs", "mode=755")
    for name, fd in devices:
        _ensure_target(Path("/dev") / name, os.path.isdir(f"/proc/self/fd/{fd}"))
        _mount(f"/proc/self/fd/{fd}", f"/dev/{name}", MS_BIND | MS_REC)
        os.close(fd)
    for name, target in DEV_LINKS.items():
        os.symlink(target, f"/dev/{name}")


def enter(spec: dict) -> None:
    """Everything but the exec: namespace, mounts, user."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", MS_REC | MS_PRIVATE)
    # Open every source before the first mount (in the new namespace: a bind source must belong to it), so that a
    # mount over /tmp cannot hide a source that lives under /tmp.
    sources = []
    for mount in sorted(spec["mounts"], key=lambda m: len(Path(m["target"]).parts)):  # parents before children
        fd = os.open(mount["source"], os.O_PATH) if "source" in mount else -1
        sources.append((fd, mount, fd < 0 or os.path.isdir(mount["source"])))
    _private_dev()
    for fd, mount, is_dir in sources:
        target = mount["target"]
        _ensure_target(Path(target), is_dir)
        if fd < 0:  # {"target": path, "tmpfs": true}: an empty folder over the host's
            _mount("tmpfs", target, 0, "tmpfs", "mode=755")
            continue
        _mount(f"/proc/self/fd/{fd}", target, MS_BIND | MS_REC)
        if mount.get("readOnly"):
            _mount(None, target, MS_BIND | MS_REMOUNT | MS_RDONLY)
        os.close(fd)
    os.setgroups(spec.get("groups") or [])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
    # After the user change (which clears it): die with the stand-in kubelet that started us.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.chdir(spec["cwd"])


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        enter(spec)
    except OSError as e:
        print(f"stand-in runtime: cannot create the container: {e}", file=sys.stderr)
        sys.exit(128)
    argv = spec["argv"]
    try:
        os.execve(argv[0], argv, spec["env"])
    except OSError as e:
        print(f"stand-in runtime: exec {argv[0]}: {e}", file=sys.stderr)
        sys.exit(127 if isinstance(e, FileNotFoundError) else 126)


if __name__ == "__main__":
    main()

"""Processes of `spin run`: no orphans when it dies, no build lock left behind by a killed build.

* `ChildGroup`: a job's processes (the `spin` child and everything it starts: vLLM's EngineCore and workers,
  torchrun's ranks) run in a process group of their own, led by a tiny janitor process. The janitor waits on a
  pipe that only `spin run` holds: when `spin run` is done with the job, or dies in any way (kill -9 included), the
  pipe closes and the janitor ends whatever is left in the group (SIGTERM, then SIGKILL), then exits.
* `clear_stale_build_locks`: torch's JIT extension builds (DeepSpeed's `deepspeed_shm_comm` on CPU) hold a lock
  file in `TORCH_EXTENSIONS_DIR/<op>/lock` and every later build waits for it with no timeout. A build killed with
  kill -9 leaves the file behind and every later training hangs; a lock no live process holds open is removed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The janitor: ignores the signals meant for the job, waits for EOF on its pipe, then empties its process group.
JANITOR = r"""
import os, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
fd, me, group = int(sys.argv[1]), os.getpid(), os.getpgrp()
while True:
    try:
        if not os.read(fd, 64):
            break
    except InterruptedError:
        continue
def members():
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(int(entry))
    return found
for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
    left = members()
    if not left:
        break
    for pid in left:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while members() and time.monotonic() < deadline:
        time.sleep(0.1)
"""


@dataclass
class ChildGroup:
    """A process group for one job: `pgid` to start the job in (`subprocess.Popen(process_group=pgid)`)."""

    janitor: subprocess.Popen
    pipe: int

    @property
    def pgid(self) -> int:
        return self.janitor.pid

    @classmethod
    def start(cls, python: str = sys.executable) -> ChildGroup:
        read, write = os.pipe()
        try:
            janitor = subprocess.Popen(
                [python, "-S", "-c", JANITOR, str(read)],
                pass_fds=(read,),
                process_group=0,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # holds none of the caller's pipes open
                stderr=subprocess.DEVNULL,
            )
        finally:
            os.close(read)
        return cls(janitor, write)

    def signal(self, sig: int) -> None:
        """Send a signal to every process of the job (the janitor ignores it)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    def close(self, wait: float = 15.0) -> None:
        """The job is over: the janitor ends what it left behind, then exits."""
        with contextlib.suppress(OSError):
            os.close(self.pipe)
        try:
            self.janitor.wait(wait)
        except subprocess.TimeoutExpired:
            self.janitor.kill()
            self.janitor.wait()


def build_roots() -> list[Path]:
    """Where torch puts JIT-built extensions: $TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return [Path(root)] if root else [Path.home() / ".cache" / "torch_extensions"]


def _open_files() -> set[Path]:
    """Every file some process we can see holds open (other users' processes are not readable: skipped)."""
    held: set[Path] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        folder = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(folder)
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                held.add(Path(os.readlink(f"{folder}/{fd}")))
    return held


def stale_build_locks(roots: list[Path] | None = None) -> list[Path]:
    """Lock files of torch extension builds (`<root>/<op>/lock`, `<root>/<py-tag>/<op>/lock`) that no live process
    holds open: a build holds its lock's file descriptor from taking it to releasing it, so these were left by a
    killed build."""
    locks = []
    for root in roots if roots is not None else build_roots():
        if root.is_dir():
            locks += [p for pattern in ("*/lock", "*/*/lock") for p in root.glob(pattern) if p.is_file()]
    if not locks:
        return []
    held = _open_files()
    return [lock for lock in locks if lock.resolve() not in held and lock.absolute() not in held]


def clear_stale_build_locks(roots: list[Path] | None = None, settle: float = 0.5) -> list[Path]:
    """Remove the stale build locks (`stale_build_locks`); returns them. A lock must look stale twice, `settle`
    seconds apart: a build releasing its lock closes the file an instant before removing it."""
    first = stale_build_locks(roots)
    if not first:
        return []
    time.sleep(settle)
    removed = []
    for lock in set(first) & set(stale_build_locks(roots)):
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
            removed.append(lock)
    return sorted(removed)


def describe_exit(code: int) -> str:
    """'exit code 3' or 'killed by SIGKILL' for a Popen return code."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"

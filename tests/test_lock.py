"""requirements/lock.txt is what a fresh machine installs (`make venv`: `pip install --no-deps -r`), so it must pin
exactly what PyPI serves and hold every package the venv needs; the venv the tests run in must be exactly the lock."""

from __future__ import annotations

import re
import sysconfig
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+)$")
# What `python -m venv` brings and the editable install of this project: not pinned in the lock.
NOT_LOCKED = {"pip", "spin-selfplay"}


def lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for number, line in enumerate((ROOT / "requirements/lock.txt").read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"lock.txt line {number} is not an exact pin (name==version): {line!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"lock.txt pins {name} twice"
        pins[name] = match[2]
    return pins


def test_every_pin_is_a_plain_release_pypi_can_serve():
    # A local version label (torch==2.13.0+cpu) is served by no index a fresh machine reaches: the install fails.
    local = {name: version for name, version in lock().items() if Version(version).local}
    assert not local, f"pins with a local version label, which PyPI does not serve: {local}"


def installed_in_venv() -> dict[str, str]:
    """What pip installed into the venv's site-packages. Not `metadata.distributions()` over sys.path: once anything
    imports setuptools (DeepSpeed, torch's extension builder), setuptools appends its `_vendor` folder to sys.path, and
    its vendored copies (packaging 24.2, typing_extensions 4.12.2) would read as installed."""
    folders = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions(path=folders)}


def test_the_venv_is_exactly_the_lock():
    import setuptools  # noqa: F401  (the order-independent worst case: its _vendor folder on sys.path)

    installed = installed_in_venv()
    pins = lock()
    # torch from a CPU-only index (make TORCH_INDEX_URL=...) is 2.13.0+cpu: the same release, without the CUDA wheels.
    cpu_torch = Version(installed.get("torch", "0")).local == "cpu"
    wrong = {
        name: (version, installed.get(name))
        for name, version in pins.items()
        if installed.get(name) != version
        and not (cpu_torch and name == "torch" and Version(installed[name]).public == version)
        and not (cpu_torch and re.match(r"(nvidia-|cuda-|triton$)", name))
    }
    assert not wrong, f"installed versions differ from the lock (pinned, installed): {wrong}; run `make clean venv`"
    unpinned = sorted(set(installed) - set(pins) - NOT_LOCKED)
    assert not unpinned, f"installed but not in requirements/lock.txt: {unpinned}"

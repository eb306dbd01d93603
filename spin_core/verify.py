"""`spin verify RUN_URI` and the checks `spin run` makes of what a run has published.

Every artefact has a manifest (names, sizes, sha256 of its files) and every JSON document carries its own checksum
(`store.document_checksum`), so everything a run published can be checked byte for byte. Each problem names the
artefact and the one command that regenerates it: `spin run RUN --redo KEY` (`redo_target` says which step makes
KEY again).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from spin_core import layout
from spin_core.errors import SpinError
from spin_core.store import CHECKSUM, MANIFEST, IntegrityError, Store, StoreError

_SHARD = re.compile(r"^iter-(\d+)/generated/shard-(\d+)-of-(\d+)$")
_CHECKPOINT = re.compile(r"^iter-(\d+)/checkpoint$")
_METRICS = re.compile(r"^iter-(\d+)/metrics\.json$")
_EVAL = re.compile(r"^iter-(\d+)/eval\.json$")
_STATE = re.compile(r"^iter-(\d+)/train-state(/.*)?$")


@dataclass(frozen=True)
class RedoTarget:
    """What `--redo KEY` regenerates: `kind` is shard, checkpoint, metrics, evaluation, train-state or run."""

    key: str
    kind: str
    iteration: int = 0
    shard: int = 0
    shards: int = 0


def redo_target(key: str) -> RedoTarget:
    """The artefact or document a key (or a path inside it) names; a SpinError for anything else."""
    key = key.strip().strip("/")
    if key == layout.RUN:
        return RedoTarget(key, "run")
    parts = key.split("/")
    for n in range(len(parts), 0, -1):  # the key itself, or the artefact a file path lies in
        head = "/".join(parts[:n])
        if m := _SHARD.match(head):
            t, i, count = int(m[1]), int(m[2]), int(m[3])
            if i >= count:
                break
            return RedoTarget(head, "shard", t, i, count)
        if m := _CHECKPOINT.match(head):
            return RedoTarget(head, "checkpoint", int(m[1]))
        if m := _METRICS.match(head):
            return RedoTarget(head, "metrics", int(m[1]))
        if m := _EVAL.match(head):
            return RedoTarget(head, "evaluation", int(m[1]))
        if m := _STATE.match(head):
            t = int(m[1])
            return RedoTarget(layout.train_state_prefix(t).rstrip("/"), "train-state", t)
    raise SpinError(
        f"--redo {key!r}: not an artefact of a run; give one of run.json, iter-<t>/generated/shard-<i>-of-<n>, "
        "iter-<t>/checkpoint, iter-<t>/metrics.json, iter-<t>/eval.json, iter-<t>/train-state"
    )


def redo_command(run: str, key: str) -> str:
    """The command that regenerates `key` (run.json: only from the SpinRun file, since the run's copy is broken)."""
    target = redo_target(key).key
    if target == layout.RUN and "://" in run:
        run = "SPINRUN.yaml"
    return f"spin run {run} --redo {target}"


def repair_hint(run: str, store_uri: str, uri: str | None) -> str:
    """'; regenerate it with: spin run RUN --redo KEY' when `uri` is an artefact of the run at `store_uri`, else ''."""
    prefix = store_uri.rstrip("/") + "/"
    if not uri or not uri.startswith(prefix):
        return ""
    try:
        return f"; regenerate it with: {redo_command(run, uri[len(prefix) :])}"
    except SpinError:
        return ""


@dataclass
class Finding:
    key: str
    problem: str


@dataclass
class Verification:
    """What `verify_run` found."""

    artefacts: int = 0
    files: int = 0
    bytes: int = 0
    documents: int = 0
    corrupt: list[Finding] = field(default_factory=list)
    unverifiable: list[str] = field(default_factory=list)  # documents without a checksum (older versions)
    orphans: list[str] = field(default_factory=list)  # attempt folders no manifest names (killed writers)


def check_artefact(store: Store, key: str, *, full: bool = True) -> list[str]:
    """What is wrong with a published artefact, [] when intact: its manifest, each listed file's presence and size
    and, with `full`, every byte (sha256, read as a stream: nothing is cached)."""
    try:
        manifest = store.manifest(key)
    except IntegrityError as e:
        return [str(e)]
    folder = f"{key}/{manifest.attempt}/"
    stored = dict(store.backend.list(folder))
    problems = []
    for name, info in sorted(manifest.files.items()):
        size = stored.get(folder + name)
        if size is None:
            problems.append(f"{name} listed in the manifest is missing")
        elif size != info["size"]:
            problems.append(f"{name} has {size} bytes, the manifest says {info['size']}")
        elif full and store.backend.sha256(folder + name)[1] != info["sha256"]:
            problems.append(f"{name} does not match its sha256 in the manifest")
    return problems


def check_document(store: Store, key: str) -> str | None:
    """What is wrong with a JSON document (None when intact); raises nothing for a document without a checksum."""
    try:
        store.read_json(key)
    except IntegrityError as e:
        return str(e).replace(f"{store.uri_of(key)} ", "", 1)
    return None


def has_checksum(store: Store, key: str) -> bool:
    try:
        document = store.read_json(key, verified=False)
    except StoreError:
        return True  # reported as corrupt by check_document
    return isinstance(document, dict) and CHECKSUM in document


def verify_run(store: Store, *, full: bool = True) -> Verification:
    """Check every artefact (manifest, files, sizes and, with `full`, every byte) and every JSON document of a run."""
    keys = dict(store.backend.list(""))
    if layout.RUN not in keys:
        raise SpinError(f"{store.uri} holds no run (no {layout.RUN}): is this the run's storage.uri?")
    suffix = "/" + MANIFEST
    artefacts = sorted(k[: -len(suffix)] for k in keys if k.endswith(suffix))
    result = Verification()
    inside: set[str] = set()
    for key in artefacts:
        result.artefacts += 1
        for problem in check_artefact(store, key, full=full):
            result.corrupt.append(Finding(key, problem))
        try:
            manifest = store.manifest(key)
        except IntegrityError:
            continue
        result.files += len(manifest.files)
        result.bytes += manifest.size
        inside |= {f"{key}/{manifest.attempt}/{name}" for name in manifest.files}
    for key in sorted(keys):
        if key in inside or key.endswith(suffix):
            continue
        if key.endswith(".json") and not _in_attempt(key):
            result.documents += 1
            if (problem := check_document(store, key)) is not None:
                result.corrupt.append(Finding(key, problem))
            elif not has_checksum(store, key):
                result.unverifiable.append(key)
            continue
        folder = _attempt_folder(key)
        if folder and folder not in result.orphans:
            result.orphans.append(folder)
    return result


def _attempt_folder(key: str) -> str | None:
    parts = key.split("/")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("a-"):
            return "/".join(parts[: i + 1])
    return None


def _in_attempt(key: str) -> bool:
    return _attempt_folder(key) is not None


def report_lines(result: Verification, store: Store, run: str) -> tuple[list[str], bool]:
    """The lines `spin verify` prints and whether everything is intact."""
    lines = []
    repairs: dict[str, str] = {}
    for finding in result.corrupt:
        lines.append(f"CORRUPT {store.uri_of(finding.key)}: {finding.problem}")
        try:
            repairs.setdefault(redo_target(finding.key).key, redo_command(run, finding.key))
        except SpinError:
            continue
    for key in result.unverifiable:
        lines.append(f"unverifiable {store.uri_of(key)}: no checksum (published by an older spin)")
    if result.orphans:
        lines.append(
            f"note: {len(result.orphans)} attempt folder(s) no manifest names (left by killed writers; harmless, "
            f"never read), e.g. {store.uri_of(result.orphans[0])}"
        )
    size = f"{result.bytes / 1e6:.1f} MB"
    if result.corrupt:
        lines.append(
            f"{store.uri}: {len(repairs) or len(result.corrupt)} artefact(s) corrupt, of {result.artefacts} artefacts "
            f"({result.files} files, {size}) and {result.documents} documents. Repair with:"
        )
        lines += [f"  {command}" for command in repairs.values()]
        return lines, False
    lines.append(
        f"{store.uri}: intact: {result.artefacts} artefacts ({result.files} files, {size}, every byte checked) and "
        f"{result.documents} documents"
    )
    return lines, True

"""The artefact store against a local folder (`file://`) and a real S3 server (SeaweedFS, see fixtures/s3.py)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from spin_core.store import (
    MANIFEST,
    AlreadyPublished,
    IntegrityError,
    LocalBackend,
    NotPublished,
    Store,
    StoreError,
    fetch_input,
    sha256_file,
)

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    """Each test downloads into its own cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SPIN_CACHE_DIR", str(path))
    return path


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "file":
        return Store.open(f"file://{tmp_path / 'store'}")
    return request.getfixturevalue("s3_store")


def make_folder(folder: Path, seed: int = 0, big: int = 200_000) -> Path:
    """A small model-like folder: a config, a binary blob, a nested file."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"seed": seed, "hidden": 128}))
    (folder / "model.safetensors").write_bytes(os.urandom(big))
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer.json").write_text(f'{{"vocab": {seed}}}')
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def count_calls(monkeypatch, obj, name: str) -> list:
    """Record each call of obj.name (still calling through)."""
    calls: list = []
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


# -- publish / fetch -------------------------------------------------------------------------------------------


def test_publish_then_fetch_is_byte_identical(store, tmp_path):
    src = make_folder(tmp_path / "src")
    manifest = store.publish("iter-1/checkpoint", src, meta={"step": 7})

    assert store.is_published("iter-1/checkpoint")
    assert store.published("iter-1/") == ["iter-1/checkpoint"]
    assert store.published("") == ["iter-1/checkpoint"]
    read = store.manifest("iter-1/checkpoint")
    assert read == manifest
    assert read.meta == {"step": 7}
    assert sorted(read.files) == ["config.json", "model.safetensors", "tokenizer/tokenizer.json"]
    for name, info in read.files.items():
        assert info == {"size": (src / name).stat().st_size, "sha256": sha256_file(src / name)}
    assert read.size == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())

    fetched = store.fetch("iter-1/checkpoint")
    assert files_of(fetched) == files_of(src)  # nothing more, nothing less
    assert store.fetch_file("iter-1/checkpoint", "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert store.orphans("iter-1/checkpoint") == []


def test_publish_from_a_mapping_of_names(store, tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.txt"
    a.write_bytes(b"\x00\x01")
    b.write_text("hello")
    store.publish("k", {"rows.jsonl": a, "deep/er/b.txt": str(b)})
    assert files_of(store.fetch("k")) == {"rows.jsonl": b"\x00\x01", "deep/er/b.txt": b"hello"}


def test_listing_is_a_string_prefix_on_both_backends(store, tmp_path):
    src = make_folder(tmp_path / "src", big=10)
    for key in ("iter-1/generated/shard-0-of-2", "iter-1/generated/shard-1-of-2", "iter-10/checkpoint"):
        store.publish(key, src)
    assert store.published("iter-1/generated/") == ["iter-1/generated/shard-0-of-2", "iter-1/generated/shard-1-of-2"]
    assert store.published("iter-1/") == ["iter-1/generated/shard-0-of-2", "iter-1/generated/shard-1-of-2"]
    assert store.published("iter-1") == [
        "iter-1/generated/shard-0-of-2",
        "iter-1/generated/shard-1-of-2",
        "iter-10/checkpoint",
    ]
    assert store.published("iter-2/") == []
    assert store.published("nothing-here/at/all/") == []


def test_multipart_upload_above_the_part_size(s3_env, tmp_path, monkeypatch):
    endpoint, bucket = s3_env
    monkeypatch.setenv("SPIN_S3_PART_SIZE", str(5 * MiB))  # S3's smallest part
    store = Store.open(f"s3://{bucket}/runs/x", endpoint)
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(12 * MiB))

    store.publish("ckpt", src)

    head = store.backend.client.head_object(
        Bucket=bucket, Key=f"runs/x/ckpt/{store.manifest('ckpt').attempt}/weights.bin"
    )
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # 5 + 5 + 2 MiB: three parts
    assert head["ContentLength"] == 12 * MiB
    assert files_of(store.fetch("ckpt")) == files_of(src)


def test_listing_pages_past_1000_keys(store, tmp_path):
    src = tmp_path / "many"
    src.mkdir()
    for i in range(1100):
        (src / f"f{i:04d}").write_bytes(b"%d" % i)
    store.publish("big", src)
    store.publish("zz", make_folder(tmp_path / "small", big=10))  # its manifest sorts after the 1100 files

    assert store.published("") == ["big", "zz"]
    assert len(store.manifest("big").files) == 1100
    assert len(list(store.backend.list("big/"))) == 1101  # the files and the manifest
    if isinstance(store.backend, LocalBackend):  # (1100 downloads from S3 add seconds and test nothing new)
        assert files_of(store.fetch("big")) == files_of(src)

    store.delete_artefact("big")  # S3 deletes in batches of 1000
    assert list(store.backend.list("big/")) == []
    assert store.published("") == ["zz"]


# -- errors a person can act on ---------------------------------------------------------------------------------


def test_wrong_credentials_give_a_clear_error(s3_env, tmp_path, monkeypatch):
    endpoint, bucket = s3_env
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = Store.open(f"s3://{bucket}/p", endpoint)
    for action in (
        lambda: store.is_published("k"),
        lambda: store.read_json("doc.json"),
        lambda: store.publish_json("doc.json", {}),
        lambda: store.published(""),
        lambda: store.publish("k", make_folder(tmp_path / "src", big=10)),
    ):
        with pytest.raises(StoreError, match="credentials") as info:
            action()
        assert not isinstance(info.value, NotPublished)
        assert "Traceback" not in str(info.value)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NO-SUCH-KEY")
    with pytest.raises(StoreError, match="credentials"):
        Store.open(f"s3://{bucket}/p", endpoint).is_published("k")


def test_missing_credentials_give_a_clear_error(s3_env, monkeypatch):
    endpoint, bucket = s3_env
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError, match="AWS_ACCESS_KEY_ID"):
        Store.open(f"s3://{bucket}/p", endpoint).is_published("k")


def test_unreachable_endpoint_gives_a_clear_error(s3_env, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = Store.open("s3://some-bucket/p", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(StoreError, match=f"cannot reach S3.*127.0.0.1:{port}"):
        store.is_published("k")
    with pytest.raises(StoreError, match="cannot reach S3"):
        store.read_json("run.json")
    assert time.monotonic() - started < 10


def test_missing_bucket_gives_a_clear_error(s3_env, tmp_path):
    endpoint, _ = s3_env
    store = Store.open("s3://no-such-bucket-here/p", endpoint)
    for action in (
        lambda: store.is_published("k"),
        lambda: store.read_json("run.json"),
        lambda: store.publish_json("run.json", {}),
        lambda: store.published(""),
        lambda: store.publish("k", make_folder(tmp_path / "src", big=10)),
        lambda: fetch_input("s3://no-such-bucket-here/data.jsonl", endpoint),
    ):
        with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist") as info:
            action()
        assert not isinstance(info.value, NotPublished)


def test_unsupported_uri():
    with pytest.raises(StoreError, match="unsupported storage URI"):
        Store.open("gs://bucket/x")
    with pytest.raises(StoreError, match="unsupported input URI"):
        fetch_input("hf://org/model")


def test_unpublished_artefact_and_document(store):
    assert not store.is_published("iter-3/checkpoint")
    with pytest.raises(NotPublished, match=r"iter-3/checkpoint is not published \(no MANIFEST.json\)"):
        store.fetch("iter-3/checkpoint")
    with pytest.raises(NotPublished, match="iter-3/checkpoint"):
        store.manifest("iter-3/checkpoint")
    with pytest.raises(NotPublished, match=r"iter-3/eval.json does not exist"):
        store.read_json("iter-3/eval.json")
    assert not store.exists("iter-3/eval.json")
    assert store.orphans("iter-3/checkpoint") == []


def test_invalid_file_names_are_refused(store, tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    for name in ("../escape", "/abs", "a//b", "./a", MANIFEST, f"sub/{MANIFEST}", ""):
        with pytest.raises(StoreError, match="file name"):
            store.publish("k", {name: f})
    with pytest.raises(StoreError, match="no files"):
        store.publish("k", {})
    with pytest.raises(StoreError, match="not a folder"):
        store.publish("k", f)
    assert not store.is_published("k")


def test_local_backend_refuses_keys_escaping_its_root(tmp_path):
    (tmp_path / "root").mkdir()
    backend = LocalBackend(tmp_path / "root")
    for key in ("../x", "a/../../x", "/etc/passwd"):
        with pytest.raises(StoreError, match="escapes the store root"):
            backend.put_bytes(key, b"x")
        with pytest.raises(StoreError, match="escapes the store root"):
            backend.get_bytes(key)
    assert not (tmp_path / "x").exists()
    backend.put_bytes("a/../b", b"fine")  # stays inside
    assert (tmp_path / "root" / "b").read_bytes() == b"fine"


# -- never half-published, never overwritten -----------------------------------------------------------------


def failing_on_call(monkeypatch, backend, name: str, n: int) -> list:
    """Make backend.name raise on its n-th call (thread-safe); the other calls go through."""
    original = getattr(backend, name)
    calls: list = []
    lock = threading.Lock()

    def wrapper(*args, **kwargs):
        with lock:
            calls.append(args)
            mine = len(calls)
        if mine == n:
            raise StoreError("simulated failure: connection reset")
        return original(*args, **kwargs)

    monkeypatch.setattr(backend, name, wrapper)
    return calls


def test_interrupted_publish_leaves_nothing_published(store, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"part-{i}").write_bytes(os.urandom(1000))
    with monkeypatch.context() as m:
        failing_on_call(m, store.backend, "put_file", 3)
        with pytest.raises(StoreError, match="simulated failure"):
            store.publish("iter-1/checkpoint", src)

    assert not store.is_published("iter-1/checkpoint")
    assert store.published("") == []
    with pytest.raises(NotPublished):
        store.fetch("iter-1/checkpoint")
    assert list(store.backend.list("iter-1/")) == []  # the attempt's uploaded files were discarded

    store.publish("iter-1/checkpoint", src)
    assert files_of(store.fetch("iter-1/checkpoint")) == files_of(src)


def test_crashed_publish_leaves_an_orphan_attempt_only(store, tmp_path, monkeypatch):
    """A writer killed mid-upload cannot clean up: its files stay in an attempt folder no manifest names."""
    src = make_folder(tmp_path / "src", big=10)
    with monkeypatch.context() as m:
        m.setattr(store, "_discard", lambda folder: None)  # the process died
        failing_on_call(m, store.backend, "put_file", 2)
        with pytest.raises(StoreError):
            store.publish("ckpt", src)
    assert not store.is_published("ckpt")
    [orphan] = store.orphans("ckpt")

    manifest = store.publish("ckpt", src)
    assert store.orphans("ckpt") == [orphan]
    assert manifest.attempt != orphan
    assert files_of(store.fetch("ckpt")) == files_of(src)


def test_publishing_twice_never_overwrites(store, tmp_path):
    first = make_folder(tmp_path / "first", seed=1)
    second = make_folder(tmp_path / "second", seed=2)
    manifest = store.publish("ckpt", first)
    with pytest.raises(AlreadyPublished, match="ckpt is already published"):
        store.publish("ckpt", second)
    assert store.manifest("ckpt") == manifest
    assert files_of(store.fetch("ckpt")) == files_of(first)


def test_a_retried_manifest_put_that_meets_itself_is_a_success(store, tmp_path, monkeypatch):
    """The manifest PUT landed but its answer was lost; the retry gets 412. The files must not be discarded."""
    src = make_folder(tmp_path / "src")
    put_bytes = store.backend.put_bytes

    def lost_answer(key, data, if_absent=False):
        put_bytes(key, data, if_absent)
        put_bytes(key, data, if_absent)  # the retry

    monkeypatch.setattr(store.backend, "put_bytes", lost_answer)
    manifest = store.publish("ckpt", src)
    monkeypatch.undo()
    assert store.manifest("ckpt") == manifest
    assert files_of(store.fetch("ckpt")) == files_of(src)


@pytest.mark.parametrize("hide_existing", [False, True], ids=["plain", "race-at-the-manifest"])
def test_concurrent_publishers_exactly_one_wins(store, tmp_path, monkeypatch, hide_existing):
    """Two writers of one key; with `hide_existing` both get past every existence check and only the atomic
    put-if-absent of the manifest (If-None-Match on S3, link(2) on a file system) can decide."""
    sources = [make_folder(tmp_path / f"src{i}", seed=i) for i in range(2)]
    if hide_existing:
        monkeypatch.setattr(store.backend, "stat", lambda key: None)
        barrier = threading.Barrier(2, timeout=30)
        put_bytes = store.backend.put_bytes

        def racing_put_bytes(key, data, if_absent=False):
            barrier.wait()  # both writers have uploaded their files: now both write the manifest
            return put_bytes(key, data, if_absent)

        monkeypatch.setattr(store.backend, "put_bytes", racing_put_bytes)
    outcomes: list = [None, None]

    def writer(i: int) -> None:
        try:
            outcomes[i] = store.publish("ckpt", sources[i])
        except AlreadyPublished as e:
            outcomes[i] = e

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    monkeypatch.undo()

    winners = [i for i, o in enumerate(outcomes) if not isinstance(o, Exception)]
    assert len(winners) == 1, outcomes
    assert all(isinstance(o, AlreadyPublished) for i, o in enumerate(outcomes) if i not in winners)
    assert store.manifest("ckpt") == outcomes[winners[0]]
    assert files_of(store.fetch("ckpt")) == files_of(sources[winners[0]])
    assert store.orphans("ckpt") == []  # the loser removed its attempt


# -- integrity and caching ---------------------------------------------------------------------------------------


def test_tampered_file_is_detected_on_a_file_store(tmp_path):
    store = Store.open(f"file://{tmp_path / 'store'}")
    src = make_folder(tmp_path / "src")
    manifest = store.publish("ckpt", src)
    stored = tmp_path / "store" / "ckpt" / manifest.attempt / "model.safetensors"
    data = bytearray(stored.read_bytes())
    data[1234] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model.safetensors does not match its sha256"):
        store.fetch("ckpt")
    stored.write_bytes(bytes(data) + b"x")
    with pytest.raises(IntegrityError, match=r"model.safetensors has"):
        store.fetch("ckpt")
    stored.unlink()
    with pytest.raises(IntegrityError, match=r"model.safetensors listed in the manifest is missing"):
        store.fetch("ckpt")


def test_tampered_object_is_detected_when_downloading_from_s3(s3_store, s3_env, tmp_path, monkeypatch, own_cache):
    _, bucket = s3_env
    src = make_folder(tmp_path / "src")
    manifest = s3_store.publish("ckpt", src)
    fetched = s3_store.fetch("ckpt")  # now cached, verified

    key = f"some/prefix/ckpt/{manifest.attempt}/model.safetensors"
    data = bytearray((src / "model.safetensors").read_bytes())
    data[1234] ^= 0xFF
    s3_store.backend.client.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    assert s3_store.fetch("ckpt") == fetched  # the verified cache is trusted
    monkeypatch.setenv("SPIN_CACHE_DIR", str(tmp_path / "fresh-cache"))
    with pytest.raises(IntegrityError, match=r"model.safetensors does not match its sha256"):
        s3_store.fetch("ckpt")
    assert not any((tmp_path / "fresh-cache" / "artefacts").iterdir())  # no half-downloaded folder is kept

    s3_store.backend.client.delete_object(Bucket=bucket, Key=key)
    with pytest.raises(IntegrityError, match=r"model.safetensors listed in the manifest is missing"):
        s3_store.fetch("ckpt")


def test_malformed_manifest_is_an_integrity_error(store):
    store.backend.put_bytes(f"ckpt/{MANIFEST}", b"{not json")
    with pytest.raises(IntegrityError, match=r"manifest .* is malformed"):
        store.fetch("ckpt")
    store.backend.put_bytes(
        f"evil/{MANIFEST}", json.dumps({"attempt": "a", "files": {"../../x": {}}, "createdAt": 0}).encode()
    )
    with pytest.raises(IntegrityError, match="malformed"):
        store.fetch("evil")


def test_s3_fetch_downloads_once(s3_store, s3_env, tmp_path, monkeypatch):
    src = make_folder(tmp_path / "src")
    s3_store.publish("ckpt", src)
    downloads = count_calls(monkeypatch, type(s3_store.backend), "get_file")

    first = s3_store.fetch("ckpt")
    assert len(downloads) == 3
    assert s3_store.fetch("ckpt") == first
    endpoint, bucket = s3_env
    assert Store.open(f"s3://{bucket}/some/prefix", endpoint).fetch("ckpt") == first  # another process, same cache
    assert len(downloads) == 3
    assert files_of(first) == files_of(src)


# -- JSON documents ----------------------------------------------------------------------------------------------


def test_publish_json_is_put_if_absent(store):
    store.publish_json("iter-1/eval.json", {"score": 0.5, "nested": [1, "two"]})
    assert store.read_json("iter-1/eval.json") == {"score": 0.5, "nested": [1, "two"]}
    assert store.exists("iter-1/eval.json")
    with pytest.raises(AlreadyPublished, match=r"iter-1/eval.json already exists"):
        store.publish_json("iter-1/eval.json", {"score": 0.9})
    assert store.read_json("iter-1/eval.json")["score"] == 0.5


def test_publish_json_is_atomic_without_the_existence_check(store, monkeypatch):
    """With the HEAD/stat check blinded, only the conditional write (If-None-Match: * / link(2)) refuses."""
    store.publish_json("run.json", {"v": 1})
    monkeypatch.setattr(store.backend, "stat", lambda key: None)
    with pytest.raises(AlreadyPublished):
        store.publish_json("run.json", {"v": 2})
    assert store.read_json("run.json") == {"v": 1}


def test_seaweedfs_honours_if_none_match(s3_server, s3_env):
    """Documents the server's behaviour that the S3 put-if-absent relies on."""
    from botocore.exceptions import ClientError

    _, bucket = s3_env
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="doc", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=bucket, Key="doc", Body=b"second", IfNoneMatch="*")
    assert info.value.response["Error"]["Code"] == "PreconditionFailed"
    assert client.get_object(Bucket=bucket, Key="doc")["Body"].read() == b"first"


def test_invalid_json_document(store):
    store.backend.put_bytes("bad.json", b"{oops")
    with pytest.raises(IntegrityError, match=r"bad.json is not valid JSON"):
        store.read_json("bad.json")


# -- user inputs (no manifest) -----------------------------------------------------------------------------------


def test_fetch_input_s3_object_and_folder(s3_server, s3_env, tmp_path, monkeypatch):
    endpoint, bucket = s3_env
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="inputs/data/train.jsonl", Body=b'{"a": 1}\n')
    client.put_object(Bucket=bucket, Key="inputs/model/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="inputs/model/sub/tokenizer.json", Body=b"tok")
    client.put_object(Bucket=bucket, Key="inputs/model/", Body=b"")  # a console's "folder" marker
    client.put_object(Bucket=bucket, Key="inputs/model-other/x", Body=b"not part of it")
    from spin_core.store import S3Backend

    downloads = count_calls(monkeypatch, S3Backend, "get_file")

    data = fetch_input(f"s3://{bucket}/inputs/data/train.jsonl", endpoint)
    assert data.name == "train.jsonl"
    assert data.read_bytes() == b'{"a": 1}\n'
    model = fetch_input(f"s3://{bucket}/inputs/model", endpoint)
    assert files_of(model) == {"config.json": b"{}", "sub/tokenizer.json": b"tok"}
    assert fetch_input(f"s3://{bucket}/inputs/model/", endpoint) == model
    assert len(downloads) == 3

    assert fetch_input(f"s3://{bucket}/inputs/data/train.jsonl", endpoint) == data  # cached
    assert len(downloads) == 3
    client.put_object(Bucket=bucket, Key="inputs/data/train.jsonl", Body=b'{"a": 2}\n')  # re-uploaded: new ETag
    changed = fetch_input(f"s3://{bucket}/inputs/data/train.jsonl", endpoint)
    assert changed != data
    assert changed.read_bytes() == b'{"a": 2}\n'

    for missing in ("inputs/data/nope.jsonl", "inputs/mod", "nothing/"):
        with pytest.raises(NotPublished, match="does not exist"):
            fetch_input(f"s3://{bucket}/{missing}", endpoint)


def test_fetch_input_file_paths(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    assert fetch_input(f"file://{tmp_path / 'train.jsonl'}") == tmp_path / "train.jsonl"
    assert fetch_input(f"file://{tmp_path}") == tmp_path
    with pytest.raises(NotPublished, match="does not exist"):
        fetch_input(f"file://{tmp_path / 'missing.jsonl'}")


def test_fetch_input_of_a_published_artefact_uses_its_manifest(store, tmp_path):
    """Another run's checkpoint as the starting model: its verified files, not the store's internals."""
    src = make_folder(tmp_path / "src")
    store.publish("old-run/iter-3/checkpoint", src)
    endpoint = getattr(store.backend, "endpoint", None)
    folder = fetch_input(store.uri_of("old-run/iter-3/checkpoint"), endpoint)
    assert files_of(folder) == files_of(src)


def test_cache_keys_differ_per_store(s3_env, tmp_path):
    """Two stores with the same key and attempt name never share a cache folder."""
    endpoint, bucket = s3_env
    a, b = (Store.open(f"s3://{bucket}/{p}", endpoint) for p in ("a", "b"))
    a.publish("k", make_folder(tmp_path / "a", seed=1))
    b.publish("k", make_folder(tmp_path / "b", seed=2))
    assert a.fetch("k") != b.fetch("k")
    assert json.loads((a.fetch("k") / "config.json").read_text())["seed"] == 1
    assert json.loads((b.fetch("k") / "config.json").read_text())["seed"] == 2

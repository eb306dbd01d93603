"""The artefact store: one small interface over `s3://` (boto3) and `file://` URIs.

Two kinds of published things, both immutable once published:

* **JSON documents** (`publish_json` / `read_json`): one object, written with put-if-absent. A single
  S3 PUT (or a hard link on a file system) is atomic, so a reader sees the whole document or nothing.
* **Artefacts** (`publish` / `fetch`): a folder of files. Files go to `<key>/<attempt-id>/<name>`, then
  `<key>/MANIFEST.json` (names, sizes, sha256, attempt) is written last with put-if-absent. Readers trust
  only what a manifest lists and verify every byte against it. A crashed or concurrent writer can leave an
  orphaned attempt folder, never a half-written or overwritten artefact.

Plain inputs the user uploaded (the SFT model, the dataset) carry no manifest: `fetch_input` downloads them
into the cache keyed by URI and ETag/mtime.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from spin_core.errors import SpinError

MANIFEST = "MANIFEST.json"
_CHUNK = 8 * 1024 * 1024


class StoreError(SpinError):
    """Any storage problem, with a message a person can act on."""


class NotPublished(StoreError):
    """The artefact or document has not been published (yet)."""


class AlreadyPublished(StoreError):
    """Publishing would overwrite something already published."""


class IntegrityError(StoreError):
    """Downloaded bytes do not match the manifest."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where downloads are kept: $SPIN_CACHE_DIR, else ~/.cache/spin."""
    return Path(os.environ.get("SPIN_CACHE_DIR") or Path.home() / ".cache" / "spin")


@dataclass(frozen=True)
class Manifest:
    """What a published artefact holds."""

    key: str
    attempt: str
    files: dict[str, dict[str, Any]]  # name -> {"size": int, "sha256": str}
    created_at: float
    meta: dict[str, Any]

    def to_json(self) -> bytes:
        doc = {"attempt": self.attempt, "files": self.files, "createdAt": self.created_at, "meta": self.meta}
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, key: str, data: bytes) -> Manifest:
        doc = json.loads(data)
        return cls(key, doc["attempt"], doc["files"], doc["createdAt"], doc.get("meta", {}))

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.files.values())


class Backend:
    """Byte-level operations on keys relative to a root. Keys use '/' separators."""

    uri: str

    def put_file(self, key: str, path: Path, if_absent: bool = False) -> None: ...
    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def stat(self, key: str) -> tuple[int, str] | None:
        """(size, version tag) or None when the key does not exist."""

    def list(self, prefix: str) -> Iterator[tuple[str, int]]: ...
    def delete(self, keys: list[str]) -> None: ...
    def local_path(self, key: str) -> Path | None:
        """The key as a local file, when the backend is a file system."""
        return None


class LocalBackend(Backend):
    """A folder on a local or shared file system."""

    def __init__(self, root: Path):
        self.root = root
        self.uri = f"file://{root}"

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve() if key else self.root.resolve()
        if path != self.root.resolve() and self.root.resolve() not in path.parents:
            raise StoreError(f"key {key!r} escapes the store root {self.root}")
        return path

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def _write(self, key: str, writer, if_absent: bool) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                try:
                    os.link(tmp, target)  # atomic, fails when the target exists
                except FileExistsError:
                    raise AlreadyPublished(f"{self.uri}/{key} already exists") from None
            else:
                os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put_file(self, key: str, path: Path, if_absent: bool = False) -> None:
        def copy(f):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, _CHUNK)

        self._write(key, copy, if_absent)

    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> None:
        self._write(key, lambda f: f.write(data), if_absent)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotPublished(f"{self.uri}/{key} does not exist") from None

    def get_file(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise NotPublished(f"{self.uri}/{key} does not exist") from None

    def stat(self, key: str) -> tuple[int, str] | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return (st.st_size, f"{st.st_mtime_ns}-{st.st_size}") if not os.path.isdir(self._path(key)) else None

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        base = self._path("")
        start = self._path(prefix.rstrip("/")) if prefix else base
        if start.is_file():
            yield prefix, start.stat().st_size
            return
        for dirpath, _, names in os.walk(start):
            for name in sorted(names):
                if ".tmp-" in name:
                    continue
                full = Path(dirpath) / name
                yield full.relative_to(base).as_posix(), full.stat().st_size

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                self._path(key).unlink()


class S3Backend(Backend):
    """An S3 bucket and prefix, through boto3 and its transfer manager (multipart, concurrency)."""

    def __init__(self, bucket: str, prefix: str, endpoint: str | None = None, region: str | None = None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix, self.endpoint = bucket, prefix.strip("/"), endpoint
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        config = Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32)
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)
        part = int(os.environ.get("SPIN_S3_PART_SIZE", 64 * 1024 * 1024))
        self.transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=8)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, key: str):
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = f"{self.uri}/{key}" + (f" (endpoint {self.endpoint})" if self.endpoint else "")
        try:
            yield
        except NoCredentialsError:
            raise StoreError(f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from None
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotPublished(f"{where} does not exist") from None
            if code in ("PreconditionFailed", "412") or status == 412:
                raise AlreadyPublished(f"{where} already exists") from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403") or status == 403:
                raise StoreError(f"S3 refused access to {where} ({code or status}): check the credentials") from None
            if code == "NoSuchBucket":
                raise StoreError(f"bucket {self.bucket!r} does not exist at {where}") from None
            raise StoreError(f"S3 error on {where}: {code or status}: {e}") from None
        except S3UploadFailedError as e:
            text = str(e)
            if any(c in text for c in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied")):
                raise StoreError(f"S3 refused access to {where}: check the credentials ({text})") from None
            if "NoSuchBucket" in text:
                raise StoreError(f"bucket {self.bucket!r} does not exist at {where}") from None
            raise StoreError(f"upload to {where} failed: {text}") from None
        except BotoCoreError as e:
            raise StoreError(f"cannot reach S3 for {where}: {e}") from None

    def put_file(self, key: str, path: Path, if_absent: bool = False) -> None:
        if if_absent:
            if self.stat(key) is not None:
                raise AlreadyPublished(f"{self.uri}/{key} already exists")
            with open(path, "rb") as f, self._errors(key):
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=f, IfNoneMatch="*")
            return
        with self._errors(key):
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)

    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> None:
        extra: dict[str, str] = {}
        if if_absent:
            if self.stat(key) is not None:
                raise AlreadyPublished(f"{self.uri}/{key} already exists")
            extra["IfNoneMatch"] = "*"
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)

    def get_bytes(self, key: str) -> bytes:
        with self._errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def get_file(self, key: str, path: Path) -> None:
        with self._errors(key):
            self.client.download_file(self.bucket, self._key(key), str(path), Config=self.transfer)

    def stat(self, key: str) -> tuple[int, str] | None:
        try:
            with self._errors(key):
                head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except NotPublished:
            return None
        return head["ContentLength"], head.get("ETag", "").strip('"')

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        with self._errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"][strip:], obj["Size"]

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            with self._errors(keys[i]):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


def backend_for(uri: str, endpoint: str | None = None, region: str | None = None) -> Backend:
    """A backend rooted at `uri` (s3://bucket/prefix or file://path)."""
    if uri.startswith("file://"):
        return LocalBackend(Path(uri[len("file://") :]).expanduser().absolute())
    parsed = urlparse(uri)
    if parsed.scheme == "s3" and parsed.netloc:
        return S3Backend(parsed.netloc, parsed.path, endpoint or os.environ.get("AWS_ENDPOINT_URL"), region)
    raise StoreError(f"unsupported storage URI {uri!r}: use s3://bucket/prefix or file://path")


def _parallel(fn, items) -> list:
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    with futures.ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
        return list(pool.map(fn, items))


class Store:
    """Publish and read immutable artefacts under one root URI."""

    def __init__(self, backend: Backend):
        self.backend = backend

    @classmethod
    def open(cls, uri: str, endpoint: str | None = None, region: str | None = None) -> Store:
        return cls(backend_for(uri, endpoint, region))

    @property
    def uri(self) -> str:
        return self.backend.uri

    def uri_of(self, key: str) -> str:
        return f"{self.uri}/{key}"

    # -- JSON documents ----------------------------------------------------------------------------
    def publish_json(self, key: str, document: Any) -> None:
        """Write a JSON document once; raises AlreadyPublished if it exists."""
        self.backend.put_bytes(key, json.dumps(document, indent=1, sort_keys=True).encode(), if_absent=True)

    def read_json(self, key: str) -> Any:
        data = self.backend.get_bytes(key)
        try:
            return json.loads(data)
        except json.JSONDecodeError as e:
            raise IntegrityError(f"{self.uri_of(key)} is not valid JSON: {e}") from None

    def exists(self, key: str) -> bool:
        return self.backend.stat(key) is not None

    # -- artefacts ---------------------------------------------------------------------------------
    def is_published(self, key: str) -> bool:
        return self.exists(f"{key}/{MANIFEST}")

    def manifest(self, key: str) -> Manifest:
        try:
            data = self.backend.get_bytes(f"{key}/{MANIFEST}")
        except NotPublished:
            raise NotPublished(f"{self.uri_of(key)} is not published (no {MANIFEST})") from None
        return Manifest.from_json(key, data)

    def published(self, prefix: str) -> list[str]:
        """Keys of the artefacts published under a prefix."""
        suffix = "/" + MANIFEST
        return sorted(k[: -len(suffix)] for k, _ in self.backend.list(prefix) if k.endswith(suffix))

    def publish(self, key: str, files: Mapping[str, Path] | Path, meta: dict[str, Any] | None = None) -> Manifest:
        """Upload files (a folder, or name -> path) as the artefact `key`, then publish its manifest."""
        if isinstance(files, Path):
            root = files
            files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        if not files:
            raise StoreError(f"refusing to publish {self.uri_of(key)} with no files")
        if self.is_published(key):
            raise AlreadyPublished(f"{self.uri_of(key)} is already published")
        attempt = f"a-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"

        def upload(item: tuple[str, Path]) -> tuple[str, dict[str, Any]]:
            name, path = item
            info = {"size": path.stat().st_size, "sha256": sha256_file(path)}
            self.backend.put_file(f"{key}/{attempt}/{name}", path)
            return name, info

        listed = dict(_parallel(upload, files.items()))
        manifest = Manifest(key, attempt, listed, time.time(), meta or {})
        try:
            self.backend.put_bytes(f"{key}/{MANIFEST}", manifest.to_json(), if_absent=True)
        except AlreadyPublished:
            self.backend.delete([f"{key}/{attempt}/{name}" for name in listed])
            raise AlreadyPublished(f"{self.uri_of(key)} was published by another writer meanwhile") from None
        return manifest

    def fetch(self, key: str) -> Path:
        """A local folder with the artefact's files, verified against its manifest (cached)."""
        manifest = self.manifest(key)
        local = self.backend.local_path(f"{key}/{manifest.attempt}")
        if local is not None:
            _verify(manifest, local, self.uri_of(key))
            return local
        tag = hashlib.sha256(f"{self.uri}\0{key}\0{manifest.attempt}".encode()).hexdigest()[:24]
        target = cache_dir() / "artefacts" / tag
        if (target / ".complete").exists():
            return target
        staging = Path(tempfile.mkdtemp(dir=_mkdir(cache_dir() / "artefacts"), prefix=f".{tag}-"))
        try:

            def download(name: str) -> None:
                dest = staging / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.backend.get_file(f"{key}/{manifest.attempt}/{name}", dest)

            _parallel(download, manifest.files)
            _verify(manifest, staging, self.uri_of(key))
            (staging / ".complete").write_text(json.dumps({"uri": self.uri_of(key), "attempt": manifest.attempt}))
            try:
                staging.rename(target)
            except OSError:  # another process filled the cache first
                if not (target / ".complete").exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def fetch_file(self, key: str, name: str) -> Path:
        """One file of a published artefact."""
        return self.fetch(key) / name

    def delete_artefact(self, key: str) -> None:
        """Remove an artefact (manifest first, so it is never half-visible). Only for scratch state."""
        self.backend.delete([f"{key}/{MANIFEST}"])
        self.backend.delete([k for k, _ in self.backend.list(key + "/")])

    def orphans(self, key: str) -> list[str]:
        """Attempt folders under an artefact key that no manifest names (left by crashed writers)."""
        keep = self.manifest(key).attempt if self.is_published(key) else None
        attempts = {k[len(key) + 1 :].split("/", 1)[0] for k, _ in self.backend.list(key + "/")}
        return sorted(a for a in attempts if a.startswith("a-") and a != keep)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _verify(manifest: Manifest, folder: Path, where: str) -> None:
    for name, info in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"{where}: {name} listed in the manifest is missing")
        if path.stat().st_size != info["size"]:
            raise IntegrityError(f"{where}: {name} has {path.stat().st_size} bytes, manifest says {info['size']}")
        if sha256_file(path) != info["sha256"]:
            raise IntegrityError(f"{where}: {name} does not match its sha256 in the manifest")


def fetch_input(uri: str, endpoint: str | None = None, region: str | None = None) -> Path:
    """A user-provided input (file or folder, no manifest) as a local path; s3:// inputs are cached."""
    if uri.startswith("file://"):
        path = Path(uri[len("file://") :]).expanduser()
        if not path.exists():
            raise NotPublished(f"{uri} does not exist")
        return path
    parsed = urlparse(uri)
    bucket_root = S3Backend(parsed.netloc, "", endpoint or os.environ.get("AWS_ENDPOINT_URL"), region)
    key = parsed.path.strip("/")
    single = bucket_root.stat(key)
    entries = [(key, single[0])] if single else list(bucket_root.list(key + "/"))
    if not entries:
        raise NotPublished(f"{uri} does not exist (no object and no objects under it)")
    tags = [single[1]] if single else [str(s) for _, s in entries]
    tag = hashlib.sha256("\0".join([uri, *[k for k, _ in entries], *tags]).encode()).hexdigest()[:24]
    target = cache_dir() / "inputs" / tag
    result = target / Path(key).name if single else target
    if (target / ".complete").exists():
        return result
    staging = Path(tempfile.mkdtemp(dir=_mkdir(cache_dir() / "inputs"), prefix=f".{tag}-"))
    try:

        def download(entry: tuple[str, int]) -> None:
            rel = Path(entry[0]).name if single else entry[0][len(key) + 1 :]
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            bucket_root.get_file(entry[0], dest)

        _parallel(download, entries)
        (staging / ".complete").write_text(uri)
        try:
            staging.rename(target)
        except OSError:
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result

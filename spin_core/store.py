"""The artefact store: one small interface over `s3://` (boto3) and `file://` URIs.

Two kinds of published things, both immutable once published:

* **JSON documents** (`publish_json` / `read_json`): one object, written with put-if-absent. A single
  S3 PUT (or a hard link on a file system) is atomic, so a reader sees the whole document or nothing.
* **Artefacts** (`publish` / `fetch`): a folder of files. Files go to `<key>/<attempt-id>/<name>`, then
  `<key>/MANIFEST.json` (names, sizes, sha256, attempt) is written last with put-if-absent. Readers trust
  only what a manifest lists and verify every byte against it. A crashed or concurrent writer can leave an
  orphaned attempt folder, never a half-written or overwritten artefact.

Put-if-absent on S3 is a HEAD check followed by a PUT with `If-None-Match: *` (AWS S3 and SeaweedFS honour
it, so two racing writers cannot both win; a server that ignored it would leave only the HEAD check).

Plain inputs the user uploaded (the SFT model, the dataset) carry no manifest: `fetch_input` downloads them
into the cache keyed by URI and ETag/mtime.

Downloads land in a staging folder under `cache_dir()` that is renamed into place only once complete and
verified, so a cache folder that exists is complete. A file lock per cache entry makes the processes sharing a
cache (the ranks of a training pod) download an artefact once: the others wait and then find it in place.
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

from spin_core.errors import STEP_FAILED, SpinError

MANIFEST = "MANIFEST.json"
_CHUNK = 8 * 1024 * 1024
_MIN_PART = 5 * 1024 * 1024  # S3 refuses multipart parts below 5 MiB (except the last)


class StoreError(SpinError):
    """Any storage problem, with a message a person can act on."""


class NotPublished(StoreError):
    """The artefact or document has not been published (yet)."""


class AlreadyPublished(StoreError):
    """Publishing would overwrite something already published."""


class IntegrityError(StoreError):
    """Stored bytes do not match their manifest or checksum: the artefact or document at `uri` is corrupt (a failed
    step's leftover or damage after publishing, not a problem with the input)."""

    exit_code = STEP_FAILED

    def __init__(self, message: str, uri: str | None = None):
        super().__init__(message)
        self.uri = uri


class StoreUnreachable(StoreError):
    """The storage could not be reached (network, endpoint down): a failed step, worth retrying."""

    exit_code = STEP_FAILED


CHECKSUM = "checksum"
"""The key of a JSON document's own checksum (`sha256:<hex>` of the rest of the document, `document_checksum`)."""


def document_checksum(document: dict[str, Any]) -> str:
    """sha256 of a JSON document without its checksum key, over a canonical form (sorted keys, no spaces), so that
    re-serialising the same values gives the same checksum."""
    body = {k: v for k, v in document.items() if k != CHECKSUM}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where downloads are kept: $SPIN_CACHE_DIR, else ~/.cache/spin."""
    return Path(os.environ.get("SPIN_CACHE_DIR") or Path.home() / ".cache" / "spin")


def _check_name(name: str, where: str, reserved: bool = True) -> str:
    """A relative file name inside an artefact: no absolute paths, no '..', no empty parts, not MANIFEST.json."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"{where}: invalid file name {name!r} (must be a relative path without '..')")
    if reserved and parts[-1] == MANIFEST:
        raise StoreError(f"{where}: file name {name!r} is reserved for the store's manifest")
    return name


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
    def from_json(cls, key: str, data: bytes, where: str | None = None) -> Manifest:
        where = where or key
        try:
            doc = json.loads(data)
            manifest = cls(key, doc["attempt"], doc["files"], doc["createdAt"], doc.get("meta", {}))
            for name, info in manifest.files.items():
                _check_name(name, where)
                int(info["size"]), str(info["sha256"])
        except (ValueError, KeyError, TypeError, AttributeError, StoreError) as e:
            raise IntegrityError(f"the manifest of {where} is malformed: {e}", where) from None
        return manifest

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.files.values())


class Backend:
    """Byte-level operations on keys relative to a root. Keys use '/' separators."""

    uri: str

    def put_file(self, key: str, path: Path, if_absent: bool = False) -> None: ...
    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_file(self, key: str, path: Path, size: int | None = None) -> None: ...
    def stat(self, key: str) -> tuple[int, str] | None:
        """(size, version tag) or None when the key does not exist."""

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every key starting with `prefix` (a plain string prefix, as in S3)."""
        return iter(())

    def delete(self, keys: list[str]) -> None: ...
    def sha256(self, key: str) -> tuple[int, str]:
        """(size, sha256 hex) of a stored file, read as a stream (nothing is cached)."""
        raise NotImplementedError

    def local_path(self, key: str) -> Path | None:
        """The key as a local file, when the backend is a file system."""
        return None


class LocalBackend(Backend):
    """A folder on a local or shared file system."""

    def __init__(self, root: Path):
        self.root = root
        self.uri = f"file://{root}"

    def _path(self, key: str) -> Path:
        root = self.root.resolve()
        path = (root / key).resolve() if key else root
        if path != root and root not in path.parents:
            raise StoreError(f"key {key!r} escapes the store root {self.root}")
        return path

    def local_path(self, key: str) -> Path:
        return self._path(key)

    @contextlib.contextmanager
    def _errors(self, key: str):
        try:
            yield
        except FileNotFoundError:
            raise NotPublished(f"{self.uri}/{key} does not exist") from None
        except (IsADirectoryError, NotADirectoryError):
            raise NotPublished(f"{self.uri}/{key} is not a file") from None
        except OSError as e:
            raise StoreError(f"cannot access {self.uri}/{key}: {e.strerror or e}") from None

    def _write(self, key: str, writer, if_absent: bool) -> None:
        target = self._path(key)
        with self._errors(key):
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
        except OSError as e:
            raise StoreError(f"cannot write {self.uri}/{key}: {e.strerror or e}") from None
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
        with self._errors(key):
            return self._path(key).read_bytes()

    def get_file(self, key: str, path: Path, size: int | None = None) -> None:
        with self._errors(key):
            shutil.copyfile(self._path(key), path)

    def stat(self, key: str) -> tuple[int, str] | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not os.path.isfile(self._path(key)):
            return None
        return st.st_size, f"{st.st_mtime_ns}-{st.st_size}"

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        base = self._path("")
        start = self._path(prefix.rpartition("/")[0])  # the folder holding every key with this prefix
        for dirpath, dirnames, names in os.walk(start):
            dirnames.sort()
            for name in sorted(names):
                if name.startswith(".") and ".tmp-" in name:  # a write in progress
                    continue
                full = Path(dirpath) / name
                rel = full.relative_to(base).as_posix()
                if rel.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                        yield rel, full.stat().st_size

    def delete(self, keys: list[str]) -> None:
        """Remove files, then the folders they leave empty (up to the root): no empty attempt folders remain."""
        root = self._path("")
        folders = set()
        for key in keys:
            with contextlib.suppress(FileNotFoundError), self._errors(key):
                path = self._path(key)
                folders.add(path.parent)
                path.unlink()
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            while folder != root and root in folder.parents:
                try:
                    folder.rmdir()
                except OSError:  # not empty (or gone): its parents are not empty either
                    break
                folder = folder.parent

    def sha256(self, key: str) -> tuple[int, str]:
        with self._errors(key):
            path = self._path(key)
            return path.stat().st_size, sha256_file(path)


class S3Backend(Backend):
    """An S3 bucket and prefix, through boto3 and its transfer manager (multipart, concurrency).

    `SPIN_S3_PART_SIZE` (bytes, default 64 MiB, at least 5 MiB) sets the multipart threshold and part size;
    `AWS_MAX_ATTEMPTS` (default 5) how often a failed request is tried.
    """

    def __init__(self, bucket: str, prefix: str, endpoint: str | None = None, region: str | None = None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix, self.endpoint = bucket, prefix.strip("/"), endpoint
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or 5)
        config = Config(retries={"max_attempts": attempts, "mode": "standard"}, max_pool_connections=32)
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)
        part = max(_MIN_PART, int(os.environ.get("SPIN_S3_PART_SIZE") or 64 * 1024 * 1024))
        self.transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=8)
        self._bucket_checked = False

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _no_bucket(self) -> StoreError:
        at = f" at {self.endpoint}" if self.endpoint else ""
        return StoreError(f"S3 bucket {self.bucket!r} does not exist{at}: create it or fix the storage URI")

    @contextlib.contextmanager
    def _errors(self, key: str):
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

        where = f"{self.uri}/{key}".rstrip("/")
        via = f" (endpoint {self.endpoint})" if self.endpoint else ""
        denied = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken")
        try:
            yield
        except (NoCredentialsError, PartialCredentialsError):
            raise StoreError(
                f"no S3 credentials for {where}{via}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                raise self._no_bucket() from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotPublished(f"{where} does not exist") from None
            if code in ("PreconditionFailed", "412") or status == 412:
                raise AlreadyPublished(f"{where} already exists") from None
            if code in (*denied, "403") or status == 403:
                raise StoreError(
                    f"S3 refused access to {where}{via} ({code or status}): check the credentials "
                    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and their permissions on the bucket"
                ) from None
            raise StoreError(f"S3 error on {where}{via}: {code or status}: {e}") from None
        except S3UploadFailedError as e:
            text = str(e)
            if any(c in text for c in denied):
                raise StoreError(
                    f"S3 refused access to {where}{via}: check the credentials "
                    f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) ({text})"
                ) from None
            if "NoSuchBucket" in text:
                raise self._no_bucket() from None
            raise StoreError(f"upload to {where}{via} failed: {text}") from None
        except BotoCoreError as e:
            raise StoreUnreachable(f"cannot reach S3 for {where}{via}: {e}") from None

    def _check_bucket(self) -> None:
        """HEAD on a missing key and on a missing bucket both answer 404: tell them apart (once)."""
        if self._bucket_checked:
            return
        try:
            with self._errors(""):
                self.client.head_bucket(Bucket=self.bucket)
        except NotPublished:
            raise self._no_bucket() from None
        self._bucket_checked = True

    def put_file(self, key: str, path: Path, if_absent: bool = False) -> None:
        if if_absent or path.stat().st_size < self.transfer.multipart_threshold:  # one PUT
            with open(path, "rb") as f:
                self._put(key, f, if_absent)
            return
        with self._errors(key):  # multipart, parts in parallel
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)

    def _put(self, key: str, body, if_absent: bool) -> None:
        extra: dict[str, str] = {}
        if if_absent:
            if self.stat(key) is not None:  # cheap early answer; If-None-Match below is what makes it atomic
                raise AlreadyPublished(f"{self.uri}/{key} already exists")
            extra["IfNoneMatch"] = "*"
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body, **extra)

    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> None:
        self._put(key, data, if_absent)

    def get_bytes(self, key: str) -> bytes:
        with self._errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def get_file(self, key: str, path: Path, size: int | None = None) -> None:
        """Download to `path`; with a known `size` below the multipart threshold, in one GET (no HEAD first)."""
        with self._errors(key):
            if size is not None and size < self.transfer.multipart_threshold:
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
                with open(path, "wb") as f:
                    shutil.copyfileobj(body, f, _CHUNK)
            else:  # ranged GETs in parallel
                self.client.download_file(self.bucket, self._key(key), str(path), Config=self.transfer)

    def stat(self, key: str) -> tuple[int, str] | None:
        try:
            with self._errors(key):
                head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except NotPublished:
            self._check_bucket()
            return None
        return head["ContentLength"], head.get("ETag", "").strip('"')

    def objects(self, prefix: str) -> Iterator[tuple[str, int, str]]:
        """(key, size, ETag) of every object whose key starts with `prefix`, all pages."""
        strip = len(self.prefix) + 1 if self.prefix else 0
        with self._errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix))
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"][strip:], obj["Size"], obj.get("ETag", "").strip('"')

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        for key, size, _ in self.objects(prefix):
            yield key, size

    def sha256(self, key: str) -> tuple[int, str]:
        digest, size = hashlib.sha256(), 0
        with self._errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            while chunk := body.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()

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
    """fn over items on a few threads; the first failure cancels what has not started and is raised."""
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    pool = futures.ThreadPoolExecutor(max_workers=min(8, len(items)))
    try:
        jobs = [pool.submit(fn, i) for i in items]
        return [job.result() for job in jobs]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _install(staging: Path, target: Path) -> None:
    """Move a complete, verified download into the cache (another process may have done it first)."""
    try:
        staging.rename(target)
    except OSError:
        if not target.is_dir():
            raise


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
        """Write a JSON document once; raises AlreadyPublished if it exists. An object carries its own checksum
        (`checksum`), which `read_json` verifies: an edited or damaged document is refused."""
        if isinstance(document, dict):
            document = {**document, CHECKSUM: document_checksum(document)}
        self.backend.put_bytes(key, json.dumps(document, indent=1, sort_keys=True).encode(), if_absent=True)

    def read_json(self, key: str, *, verified: bool = True) -> Any:
        """A JSON document, its checksum verified and removed (documents published without one are returned as
        they are; `verified=False` skips the check)."""
        uri = self.uri_of(key)
        data = self.backend.get_bytes(key)
        try:
            document = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IntegrityError(f"{uri} is not valid JSON ({e}): the document is corrupt", uri) from None
        if not isinstance(document, dict) or CHECKSUM not in document:
            return document
        if verified and document[CHECKSUM] != document_checksum(document):
            raise IntegrityError(f"{uri} is corrupt: changed after publishing (its checksum does not match)", uri)
        return {k: v for k, v in document.items() if k != CHECKSUM}

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
        return Manifest.from_json(key, data, self.uri_of(key))

    def published(self, prefix: str) -> list[str]:
        """Keys of the artefacts published under a prefix."""
        suffix = "/" + MANIFEST
        return sorted(k[: -len(suffix)] for k, _ in self.backend.list(prefix) if k.endswith(suffix))

    def publish(self, key: str, files: Mapping[str, Path] | Path, meta: dict[str, Any] | None = None) -> Manifest:
        """Upload files (a folder, or name -> path) as the artefact `key`, then publish its manifest."""
        where = self.uri_of(key)
        if isinstance(files, Path):
            if not files.is_dir():
                raise StoreError(f"cannot publish {where}: {files} is not a folder")
            root = files
            files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        files = {_check_name(name, where): Path(path) for name, path in files.items()}
        if not files:
            raise StoreError(f"refusing to publish {where} with no files")
        if self.is_published(key):
            raise AlreadyPublished(f"{where} is already published")
        attempt = f"a-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        folder = f"{key}/{attempt}/"

        def upload(item: tuple[str, Path]) -> tuple[str, dict[str, Any]]:
            name, path = item
            info = {"size": path.stat().st_size, "sha256": sha256_file(path)}
            self.backend.put_file(folder + name, path)
            return name, info

        try:
            listed = dict(_parallel(upload, sorted(files.items())))
        except BaseException:
            self._discard(folder)  # best effort; a killed writer leaves it to `orphans`
            raise
        manifest = Manifest(key, attempt, listed, time.time(), meta or {})
        try:
            self.backend.put_bytes(f"{key}/{MANIFEST}", manifest.to_json(), if_absent=True)
        except AlreadyPublished:
            # A PUT retried after a lost answer meets its own manifest: check whose it is before cleaning up.
            if self._published_attempt(key) == attempt:
                return manifest
            self._discard(folder)
            raise AlreadyPublished(f"{where} was published by another writer meanwhile") from None
        # Any other failure here may have published the manifest or not: keep the files (at worst an orphan).
        return manifest

    def _published_attempt(self, key: str) -> str | None:
        try:
            return self.manifest(key).attempt
        except StoreError:
            return None

    def _discard(self, folder: str) -> None:
        with contextlib.suppress(StoreError):
            self.backend.delete([k for k, _ in self.backend.list(folder)])

    def fetch(self, key: str) -> Path:
        """A local folder with the artefact's files, verified against its manifest (cached for S3)."""
        manifest = self.manifest(key)
        local = self.backend.local_path(f"{key}/{manifest.attempt}")
        if local is not None:
            _verify(manifest, local, self.uri_of(key))
            return local
        tag = hashlib.sha256(f"{self.uri}\0{key}\0{manifest.attempt}".encode()).hexdigest()[:24]
        target = cache_dir() / "artefacts" / tag
        if target.is_dir():
            return target
        with _download_lock(target):
            if target.is_dir():  # another process of this machine downloaded it while we waited
                return target
            return self._download(key, manifest, target, tag)

    def _download(self, key: str, manifest: Manifest, target: Path, tag: str) -> Path:
        staging = Path(tempfile.mkdtemp(dir=_mkdir(cache_dir() / "artefacts"), prefix=f".{tag}-"))
        try:

            def download(name: str) -> None:
                dest = staging / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.backend.get_file(f"{key}/{manifest.attempt}/{name}", dest, manifest.files[name]["size"])
                except NotPublished:
                    uri = self.uri_of(key)
                    raise IntegrityError(f"{uri} is corrupt: {name} listed in the manifest is missing", uri) from None

            _parallel(download, manifest.files)
            _verify(manifest, staging, self.uri_of(key))
            _install(staging, target)
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


def _download_lock(target: Path):
    """An exclusive lock on one cache entry, shared by every process using this cache folder (lock files live apart,
    in `<cache>/locks`, so that a cache folder holds only complete downloads)."""
    from filelock import FileLock

    return FileLock(str(_mkdir(cache_dir() / "locks") / f"{target.parent.name}-{target.name}.lock"))


def _verify(manifest: Manifest, folder: Path, where: str) -> None:
    for name, info in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"{where} is corrupt: {name} listed in the manifest is missing", where)
        if path.stat().st_size != info["size"]:
            raise IntegrityError(
                f"{where} is corrupt: {name} has {path.stat().st_size} bytes, its manifest says {info['size']}", where
            )
        if sha256_file(path) != info["sha256"]:
            raise IntegrityError(f"{where} is corrupt: {name} does not match its sha256 in the manifest", where)


def fetch_input(uri: str, endpoint: str | None = None, region: str | None = None) -> Path:
    """A user-provided input (file or folder, no manifest) as a local path; s3:// inputs are cached.

    For s3:// the URI names one object, or else a "folder": every object under `<uri>/`.
    """
    if uri.startswith("file://"):
        path = Path(uri[len("file://") :]).expanduser()
        if not path.exists():
            raise NotPublished(f"{uri} does not exist")
        if (path / MANIFEST).is_file():  # a published artefact (e.g. another run's checkpoint)
            return Store.open(f"file://{path.parent}").fetch(path.name)
        return path
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StoreError(f"unsupported input URI {uri!r}: use s3://bucket/key or file://path")
    bucket_root = S3Backend(parsed.netloc, "", endpoint or os.environ.get("AWS_ENDPOINT_URL"), region)
    key = parsed.path.strip("/")
    single = bucket_root.stat(key) if key else None
    if single:
        entries = [(key, Path(key).name, single[0], single[1])]  # (key, local name, size, ETag)
    else:
        folder = f"{key}/" if key else ""
        entries = [
            (k, _check_name(k[len(folder) :], uri, reserved=False), size, etag)
            for k, size, etag in bucket_root.objects(folder)
            if not k.endswith("/")  # "folder" marker objects made by consoles
        ]
        if key and any(entry[1] == MANIFEST for entry in entries):  # a published artefact
            parent, _, name = key.rpartition("/")
            return Store(S3Backend(parsed.netloc, parent, bucket_root.endpoint, region)).fetch(name)
    if not entries:
        raise NotPublished(f"{uri} does not exist (no object and no objects under it)")
    identity = [str(bucket_root.endpoint), parsed.netloc, key, *(f"{k}\0{etag}" for k, _, _, etag in entries)]
    tag = hashlib.sha256("\0".join(identity).encode()).hexdigest()[:24]
    target = cache_dir() / "inputs" / tag
    result = target / entries[0][1] if single else target
    if target.is_dir():
        return result
    with _download_lock(target):
        if not target.is_dir():
            _download_input(bucket_root, entries, target, tag)
    return result


def _download_input(bucket_root: S3Backend, entries: list[tuple[str, str, int, str]], target: Path, tag: str) -> None:
    staging = Path(tempfile.mkdtemp(dir=_mkdir(cache_dir() / "inputs"), prefix=f".{tag}-"))
    try:

        def download(entry: tuple[str, str, int, str]) -> None:
            dest = staging / entry[1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            bucket_root.get_file(entry[0], dest, entry[2])

        _parallel(download, entries)
        _install(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

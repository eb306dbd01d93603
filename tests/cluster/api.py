"""A small JSON client of the Kubernetes API (requests), shared by the fixture, the stand-in kubelet and the tests.

Plain dicts in and out, every error raised as `ApiError` with the apiserver's status code, reason and message, so a
test can assert exactly what the apiserver said. Thread-safe: one `requests.Session` per thread.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

PATCH_TYPES = {
    "merge": "application/merge-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "json": "application/json-patch+json",
    "apply": "application/apply-patch+yaml",
}


class ApiError(RuntimeError):
    """An HTTP error from the apiserver: `status` (HTTP code), `reason` and `message` of its Status object."""

    def __init__(self, method: str, path: str, status: int, body: Any):
        self.status = status
        self.body = body if isinstance(body, dict) else {"message": str(body)}
        self.reason = self.body.get("reason", "")
        self.message = self.body.get("message", "")
        super().__init__(f"{method} {path}: HTTP {status} {self.reason}: {self.message}")


@dataclass
class Credentials:
    server: str
    ca: Path
    cert: Path | None = None
    key: Path | None = None
    token: str | None = None

    def kubeconfig(self, path: Path, user: str = "admin", cluster: str = "spin-test") -> Path:
        """Write a kubeconfig for these credentials (file paths, not embedded data)."""
        user_entry: dict[str, Any] = {}
        if self.cert and self.key:
            user_entry = {"client-certificate": str(self.cert), "client-key": str(self.key)}
        if self.token:
            user_entry["token"] = self.token
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": cluster,
            "clusters": [{"name": cluster, "cluster": {"server": self.server, "certificate-authority": str(self.ca)}}],
            "users": [{"name": user, "user": user_entry}],
            "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": user}}],
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    @classmethod
    def from_kubeconfig(cls, path: Path) -> Credentials:
        config = yaml.safe_load(path.read_text())
        context = next(c["context"] for c in config["contexts"] if c["name"] == config["current-context"])
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
        cert, key = user.get("client-certificate"), user.get("client-key")
        return cls(
            server=cluster["server"],
            ca=Path(cluster["certificate-authority"]),
            cert=Path(cert) if cert else None,
            key=Path(key) if key else None,
            token=user.get("token"),
        )


@dataclass
class Api:
    credentials: Credentials
    user_agent: str = "spin-tests"
    timeout: float = 30.0
    _local: threading.local = field(default_factory=threading.local, repr=False)

    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # REQUESTS_CA_BUNDLE and proxies from the environment would override ours
            creds = self.credentials
            session.verify = str(creds.ca)
            if creds.cert and creds.key:
                session.cert = (str(creds.cert), str(creds.key))
            session.headers["User-Agent"] = self.user_agent
            if creds.token:
                session.headers["Authorization"] = f"Bearer {creds.token}"
            self._local.session = session
        return session

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
        ok: tuple[int, ...] = (),
    ) -> Any:
        """One request; JSON in and out. An HTTP error raises ApiError unless its code is in `ok` (then None)."""
        data = None
        if body is not None:
            data = body if isinstance(body, str | bytes) else json.dumps(body)
        response = self.session.request(
            method,
            self.credentials.server + path,
            data=data,
            params=params,
            headers={"Content-Type": content_type} if data is not None else None,
            timeout=self.timeout,
        )
        if response.status_code >= 400:
            if response.status_code in ok:
                return None
            try:
                payload = response.json()
            except ValueError:
                payload = response.text
            raise ApiError(method, path, response.status_code, payload)
        return response.json() if response.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def find(self, path: str) -> dict[str, Any] | None:
        """The object at path, or None when it does not exist."""
        return self.request("GET", path, ok=(404,))

    def create(self, path: str, body: dict[str, Any], **params: Any) -> Any:
        return self.request("POST", path, body, params=params or None)

    def replace(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Any, kind: str = "merge", **params: Any) -> Any:
        return self.request("PATCH", path, body, params=params or None, content_type=PATCH_TYPES[kind])

    def apply(self, path: str, body: dict[str, Any], manager: str = "spin-tests") -> Any:
        """Server-side apply (creates or updates), forcing ownership of the fields it sets."""
        return self.request(
            "PATCH", path, json.dumps(body), {"fieldManager": manager, "force": "true"}, PATCH_TYPES["apply"]
        )

    def delete(self, path: str, body: dict[str, Any] | None = None, missing_ok: bool = True) -> Any:
        return self.request("DELETE", path, body, ok=(404,) if missing_ok else ())

    def watch(self, path: str, stop: threading.Event | None = None, **params: Any) -> Iterator[dict[str, Any]]:
        """List, then watch from the list's resourceVersion: yields ADDED for what exists, then every event; relists
        after an expired resourceVersion (410) or a dropped connection, until `stop` is set."""
        stop = stop or threading.Event()
        known: dict[str, dict[str, Any]] = {}
        while not stop.is_set():
            try:
                listing = self.get(path, **params)
            except (ApiError, requests.RequestException):
                stop.wait(1.0)
                continue
            current = {o["metadata"]["uid"]: o for o in listing.get("items", [])}
            for uid, obj in list(known.items()):
                if uid not in current:
                    known.pop(uid)
                    yield {"type": "DELETED", "object": obj}
            for uid, obj in current.items():
                known[uid] = obj
                yield {"type": "ADDED", "object": obj}
            version = listing["metadata"]["resourceVersion"]
            while not stop.is_set():
                query = {**params, "watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true"}
                query["timeoutSeconds"] = "60"
                try:
                    with self.session.get(
                        self.credentials.server + path, params=query, stream=True, timeout=(10, 90)
                    ) as response:
                        if response.status_code == 410:
                            break
                        if response.status_code >= 400:
                            stop.wait(1.0)
                            break
                        for line in response.iter_lines():
                            if stop.is_set():
                                return
                            if not line:
                                continue
                            event = json.loads(line)
                            obj = event.get("object", {})
                            if event["type"] == "ERROR":
                                if obj.get("code") == 410:
                                    raise _Relist
                                continue
                            version = obj.get("metadata", {}).get("resourceVersion", version)
                            if event["type"] == "BOOKMARK":
                                continue
                            uid = obj["metadata"]["uid"]
                            if event["type"] == "DELETED":
                                known.pop(uid, None)
                            else:
                                known[uid] = obj
                            yield event
                except _Relist:
                    break
                except requests.RequestException:
                    stop.wait(0.5)
                    break

    def wait_for(
        self,
        what: str,
        probe: Callable[[], Any],
        timeout: float = 60.0,
        interval: float = 0.5,
        describe: Callable[[], str] | None = None,
    ) -> Any:
        """Poll `probe` until it returns something truthy; on timeout fail with `what` and `describe()`."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            try:
                result = probe()
                if result:
                    return result
            except (ApiError, requests.RequestException) as e:
                last_error = e
            if time.monotonic() > deadline:
                detail = describe() if describe else ""
                raise TimeoutError(
                    f"timed out after {timeout:.0f} s waiting for {what}; last error: {last_error}\n{detail}"
                )
            time.sleep(interval)


class _Relist(Exception):
    pass


def path_of(obj: dict[str, Any], plural: str | None = None) -> str:
    """API path of an object from its apiVersion/kind/namespace/name (plural: lower-case kind + s unless given)."""
    api_version = obj["apiVersion"]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    namespace = obj["metadata"].get("namespace")
    plural = plural or obj["kind"].lower() + "s"
    prefix = f"{base}/namespaces/{namespace}" if namespace else base
    return f"{prefix}/{plural}/{obj['metadata']['name']}"

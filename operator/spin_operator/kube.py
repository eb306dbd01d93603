"""The operator's own Kubernetes calls: a small async REST client (kopf does the watching and the events).

Credentials come from the same place kopf's login gets them (in-cluster service account, else $KUBECONFIG read at
call time, exec plugins included, through the `kubernetes` client's config loader). Bodies are plain dicts in and
out; every request is a JSON merge-patch, create, get, list or delete, never a PUT.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

from spin_core import spec as s

logger = logging.getLogger(__name__)
USER_AGENT = "spin-operator/0.1"


@dataclass(frozen=True)
class Kind:
    """One API resource: where it lives and what its objects are called."""

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        parts = [base]
        if namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name:
            parts.append(name)
            if subresource:
                parts.append(subresource)
        return "/".join(parts)

    def __str__(self) -> str:
        return self.kind


SPINRUNS = Kind(s.GROUP, s.VERSION, s.PLURAL, s.KIND)
JOBS = Kind("batch", "v1", "jobs", "Job")
PYTORCHJOBS = Kind("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob")
TRAINJOBS = Kind("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob")
CONFIGMAPS = Kind("", "v1", "configmaps", "ConfigMap")
PODS = Kind("", "v1", "pods", "Pod")
WORKLOADS = Kind("kueue.x-k8s.io", "v1beta2", "workloads", "Workload")
"""Kueue's record of a queued child (v1beta2: Kueue >= 0.15): its `spec.active` is how an admitted child is stopped."""


class ApiError(Exception):
    """A failed API call: the HTTP status and the server's Status reason/message."""

    def __init__(self, status: int, reason: str, message: str, what: str = ""):
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{what}: HTTP {status} {reason}: {message}" if what else f"HTTP {status} {reason}: {message}")


def connection_info(**_: Any) -> kopf.ConnectionInfo:
    """Credentials for the API: the pod's service account, else $KUBECONFIG (read now, not at import)."""
    import kubernetes  # heavy; only the operator needs it

    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        try:
            kubernetes.config.load_kube_config(config_file=path, client_configuration=config)
        except (kubernetes.config.ConfigException, OSError) as e:
            raise kopf.LoginError(f"no in-cluster service account and no usable kubeconfig ({path}): {e}") from None
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
    scheme, token = (None, None)
    if header:
        parts = header.split(" ", 1)
        scheme, token = (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        username=config.username or None,
        password=config.password or None,
        scheme=scheme,
        token=token,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
    )


class Kube:
    """Async client over one aiohttp session; re-reads the credentials once on HTTP 401."""

    def __init__(self, login: Callable[[], kopf.ConnectionInfo] = connection_info):
        self._login = login
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()

    async def _open(self, relogin: bool = False) -> aiohttp.ClientSession:
        async with self._lock:
            if self._session is not None and not relogin:
                return self._session
            info = await asyncio.to_thread(self._login)
            if self._session is not None:
                await self._session.close()
            headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
            auth = None
            if info.token:
                headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
            elif info.username and info.password:
                auth = aiohttp.BasicAuth(info.username, info.password)
            context: ssl.SSLContext | bool = False
            if not info.insecure:
                context = ssl.create_default_context(cafile=info.ca_path)
                if info.certificate_path and info.private_key_path:
                    context.load_cert_chain(info.certificate_path, info.private_key_path)
            self._session = aiohttp.ClientSession(
                base_url=info.server.rstrip("/") + "/",
                headers=headers,
                auth=auth,
                connector=aiohttp.TCPConnector(ssl=context, limit=32),
                timeout=aiohttp.ClientTimeout(total=60, sock_connect=10),
            )
            return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        what: str = "",
    ) -> dict[str, Any]:
        for attempt in (1, 2):
            session = await self._open(relogin=attempt == 2)
            headers = {"Content-Type": content_type} if body is not None else {}
            async with session.request(method, path.lstrip("/"), params=params, json=body, headers=headers) as response:
                if response.status == 401 and attempt == 1:
                    continue
                try:
                    data = await response.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError):
                    data = {"message": (await response.text())[:500]}
                if response.status >= 400:
                    data = data if isinstance(data, dict) else {}
                    raise ApiError(
                        response.status,
                        str(data.get("reason") or response.reason),
                        str(data.get("message") or ""),
                        what or f"{method} {path}",
                    )
                return data if isinstance(data, dict) else {}
        raise AssertionError("unreachable")  # pragma: no cover

    async def create(self, kind: Kind, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("metadata", {}).get("name")
        return await self.request("POST", kind.path(namespace), body=body, what=f"create {kind} {namespace}/{name}")

    async def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any]:
        return await self.request("GET", kind.path(namespace, name), what=f"get {kind} {namespace}/{name}")

    async def list(self, kind: Kind, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        data = await self.request(
            "GET", kind.path(namespace), params={"labelSelector": selector}, what=f"list {kind} in {namespace}"
        )
        items = data.get("items") or []
        # Filter here too: the selector is a request, the labels are the truth.
        return [i for i in items if all(i.get("metadata", {}).get("labels", {}).get(k) == v for k, v in labels.items())]

    async def patch(
        self, kind: Kind, namespace: str, name: str, patch: dict[str, Any], subresource: str | None = None
    ) -> dict[str, Any]:
        return await self.request(
            "PATCH",
            kind.path(namespace, name, subresource),
            body=patch,
            content_type="application/merge-patch+json",
            what=f"patch {kind} {namespace}/{name}" + (f"/{subresource}" if subresource else ""),
        )

    async def delete(self, kind: Kind, namespace: str, name: str) -> bool:
        """Delete in the background (dependents are garbage-collected); False when it was already gone."""
        try:
            await self.request(
                "DELETE",
                kind.path(namespace, name),
                body={"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"},
                what=f"delete {kind} {namespace}/{name}",
            )
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return True

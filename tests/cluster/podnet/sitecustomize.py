"""Stand-in for a pod's own network namespace (tests/cluster/kubelet.py puts this folder first on PYTHONPATH).

Pods here share the host's network. Each gets its own loopback address ($STANDIN_POD_IP, e.g. 127.1.0.7) as its pod
IP; a listening socket a Python program binds to the wildcard address with a fixed port (kopf's health endpoint at
0.0.0.0:8080) is bound to that address instead, so two pods can listen on the same port, and the kubelet's probes,
which go to the pod IP, reach the right one. Port 0 (an ephemeral port) and explicit addresses are left alone.
"""

from __future__ import annotations

import os
import socket

_POD_IP = os.environ.get("STANDIN_POD_IP", "")
_WILDCARDS = ("", "0.0.0.0")


def _narrowing(bind):  # type: ignore[no-untyped-def]
    def bind_in_pod(self: socket.socket, address, /):  # type: ignore[no-untyped-def]
        if (
            self.family == socket.AF_INET
            and isinstance(address, tuple)
            and len(address) == 2
            and address[0] in _WILDCARDS
            and address[1]
        ):
            address = (_POD_IP, address[1])
        return bind(self, address)

    return bind_in_pod


if _POD_IP:
    socket.socket.bind = _narrowing(socket.socket.bind)  # type: ignore[method-assign]

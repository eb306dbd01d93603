"""The pod's termination message: how a job hands its one-line summary to the operator (which reads no S3)."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

DEFAULT_PATH = "/dev/termination-log"
LIMIT = 4000  # Kubernetes keeps at most 4096 bytes of a termination message


def write_termination_message(summary: dict[str, Any] | str) -> None:
    """Write the summary to $SPIN_TERMINATION_LOG, else to /dev/termination-log when the kubelet mounted it
    (in a pod); elsewhere nothing is written."""
    line = summary if isinstance(summary, str) else json.dumps(summary, sort_keys=True)
    path = os.environ.get("SPIN_TERMINATION_LOG") or DEFAULT_PATH
    if path == DEFAULT_PATH and not os.path.exists(path):
        return
    with contextlib.suppress(OSError), open(path, "w") as f:
        f.write(line[:LIMIT])

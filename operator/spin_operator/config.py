"""The operator's own settings: defaults for the children and the retry policy, read from the environment.

The Helm chart sets the image and resource defaults; everything else has a production default and can be
tuned without a new image (tests shorten the back-off).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from spin_core.resource import describe
from spin_core.spec import MAX_ATTEMPTS_SUFFIX, PodSettings

DEFAULT_GENERATOR_IMAGE = "ghcr.io/spin-selfplay/spin-generator:0.1.0"
DEFAULT_TRAINER_IMAGE = "ghcr.io/spin-selfplay/spin-trainer:0.1.0"
MAX_RETRIES = int(MAX_ATTEMPTS_SUFFIX.removeprefix("-r"))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


def _env_resources(name: str) -> dict[str, Any]:
    """A JSON {requests: {...}, limits: {...}} from the chart; empty or invalid means none."""
    value = os.environ.get(name, "").strip()
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise ValueError(f"${name} is not JSON: {e}") from None
    if not isinstance(parsed, dict) or set(parsed) - {"requests", "limits"}:
        raise ValueError(f"${name} must be a JSON object with only 'requests' and 'limits'")
    return parsed


def _env_list(name: str) -> tuple[str, ...] | None:
    """A comma-separated list; None when the variable is not set."""
    value = os.environ.get(name)
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def _env_pod_defaults(name: str) -> PodSettings:
    value = os.environ.get(name, "").strip()
    if not value:
        return PodSettings()
    try:
        return PodSettings.model_validate_json(value)
    except ValidationError as e:
        raise ValueError(f"${name} is not valid pod settings: {'; '.join(describe(e))}") from None


@dataclass
class Config:
    generator_image: str = DEFAULT_GENERATOR_IMAGE
    """Image of the generation pods when spec.generation.image is empty ($SPIN_GENERATOR_IMAGE)."""
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    """Image of the training pods when spec.training.image is empty ($SPIN_TRAINER_IMAGE)."""
    generator_resources: dict[str, Any] = field(default_factory=dict)
    """Requests/limits of generation pods when the SpinRun sets none ($SPIN_GENERATOR_RESOURCES, JSON)."""
    trainer_resources: dict[str, Any] = field(default_factory=dict)
    """Requests/limits of training pods when the SpinRun sets none ($SPIN_TRAINER_RESOURCES, JSON)."""
    max_retries: int = 2
    """Times a failed child (Job or PyTorchJob) is deleted and recreated before the run fails ($SPIN_CHILD_RETRIES)."""
    retry_backoff: float = 30.0
    """Seconds before the first recreation; doubles each retry ($SPIN_RETRY_BACKOFF_SECONDS)."""
    retry_backoff_max: float = 600.0
    """Longest wait before a recreation ($SPIN_RETRY_BACKOFF_MAX_SECONDS)."""
    error_backoff: float = 5.0
    """Seconds before a reconcile that raised (API error) is tried again; doubles up to 300 s."""
    ttl_seconds_after_finished: int = 7 * 24 * 3600
    """Finished children are deleted by Kubernetes after this long ($SPIN_CHILD_TTL_SECONDS)."""
    resync_interval: float = 600.0
    """Safety net: every run is reconciled this often even without events ($SPIN_RESYNC_SECONDS)."""
    job_service_account: str | None = None
    """ServiceAccount of the generation/training pods; empty: the namespace's default ($SPIN_JOB_SERVICE_ACCOUNT).
    Their API token is never mounted: the pods talk to S3, not to Kubernetes."""
    pod_defaults: PodSettings = field(default_factory=PodSettings)
    """Operator-wide pod settings under every run's spec.pods and per-step settings ($SPIN_POD_DEFAULTS, JSON in the
    SpinRun's camelCase form; see spin_core.spec.PodSettings for the merge rule)."""
    allowed_registries: tuple[str, ...] = ()
    """Image prefixes a run's pods may use (e.g. registry.example.com/ml/); empty: any ($SPIN_ALLOWED_REGISTRIES,
    comma-separated)."""
    allowed_secrets: tuple[str, ...] | None = None
    """Secrets a run may name (credentials, env, volumes, image pulls); None: any ($SPIN_ALLOWED_SECRETS,
    comma-separated; set but empty: none)."""

    def __post_init__(self) -> None:
        if not 0 <= self.max_retries <= MAX_RETRIES:
            # Child names end with -r<k>; spin_core.spec.MAX_NAME_LENGTH leaves room for one digit.
            raise ValueError(f"$SPIN_CHILD_RETRIES must be between 0 and {MAX_RETRIES}, got {self.max_retries}")

    @classmethod
    def from_env(cls) -> Config:
        return cls(
            generator_image=os.environ.get("SPIN_GENERATOR_IMAGE", "").strip() or DEFAULT_GENERATOR_IMAGE,
            trainer_image=os.environ.get("SPIN_TRAINER_IMAGE", "").strip() or DEFAULT_TRAINER_IMAGE,
            generator_resources=_env_resources("SPIN_GENERATOR_RESOURCES"),
            trainer_resources=_env_resources("SPIN_TRAINER_RESOURCES"),
            max_retries=_env_int("SPIN_CHILD_RETRIES", 2),
            retry_backoff=_env_float("SPIN_RETRY_BACKOFF_SECONDS", 30.0),
            retry_backoff_max=_env_float("SPIN_RETRY_BACKOFF_MAX_SECONDS", 600.0),
            ttl_seconds_after_finished=_env_int("SPIN_CHILD_TTL_SECONDS", 7 * 24 * 3600),
            resync_interval=_env_float("SPIN_RESYNC_SECONDS", 600.0),
            job_service_account=os.environ.get("SPIN_JOB_SERVICE_ACCOUNT", "").strip() or None,
            pod_defaults=_env_pod_defaults("SPIN_POD_DEFAULTS"),
            allowed_registries=_env_list("SPIN_ALLOWED_REGISTRIES") or (),
            allowed_secrets=_env_list("SPIN_ALLOWED_SECRETS"),
        )

    def backoff(self, retries_done: int) -> float:
        """Seconds to wait before retry number `retries_done + 1`."""
        return min(self.retry_backoff * (2**retries_done), self.retry_backoff_max)

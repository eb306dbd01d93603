"""What a SpinRun may ask of the cluster beyond what its author could do alone: the operator's allow-lists.

Creating a SpinRun makes the operator create pods in the run's namespace that run an image with the Secrets the
spec names. The chart can restrict both (`policy.allowedRegistries`, `policy.allowedSecrets`); a run that breaks
them is refused like an invalid spec, before any child exists.
"""

from __future__ import annotations

from spin_core.spec import PodSettings, SpinRun
from spin_operator.config import Config


def _secrets(pods: PodSettings) -> list[tuple[str, str]]:
    """(field, Secret name) of every Secret the pod settings name."""
    out = [("imagePullSecrets", name) for name in pods.image_pull_secrets]
    out += [
        (f"env[{i}].valueFrom.secretKeyRef", var.value_from.secret_key_ref.name)
        for i, var in enumerate(pods.env)
        if var.value_from is not None and var.value_from.secret_key_ref is not None
    ]
    out += [(f"volumes[{i}].secret", v.secret) for i, v in enumerate(pods.volumes) if v.secret]
    return out


def violations(run: SpinRun, config: Config) -> list[str]:
    """One line per image or Secret of the run that the operator's policy does not allow."""
    spec = run.spec
    problems = []
    if config.allowed_registries:
        for where, placement in (("generation", spec.generation), ("training", spec.training)):
            if placement.image and not placement.image.startswith(config.allowed_registries):
                problems.append(
                    f"spec.{where}.image: {placement.image!r} is not from an allowed registry "
                    f"({', '.join(config.allowed_registries)}): ask the operator's administrators"
                )
    if config.allowed_secrets is not None:
        named = (
            [("spec.storage.credentialsSecret", spec.storage.credentials_secret)]
            if spec.storage.credentials_secret
            else []
        )
        for where, pods in (("pods", spec.pods), ("generation", spec.generation), ("training", spec.training)):
            named += [(f"spec.{where}.{field}", name) for field, name in _secrets(pods)]
        allowed = ", ".join(config.allowed_secrets) or "none"
        problems += [
            f"{field}: Secret {name!r} is not one this operator lets runs use (allowed: {allowed})"
            for field, name in named
            if name not in config.allowed_secrets
        ]
    return problems

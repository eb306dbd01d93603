"""Names of the regularised SPIN variants (training.sftWeight, opponent, klToBase, dropIdenticalPairs), so that docs,
the trainer's summary (hence the operator's status) and `spin report` all say which method a run used."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spin_core.spec import OpponentMixture, SpinRun, SpinRunSpec, Training

PAPER = "SPIN (paper)"
CONTINUED_SFT = "continued SFT (objective sft: NLL only)"


def _training(spec: Any) -> Training:
    """The Training settings of a SpinRun, its spec, a Training, or a document/spec/training mapping (camelCase)."""
    if isinstance(spec, SpinRun):
        return spec.spec.training
    if isinstance(spec, SpinRunSpec):
        return spec.training
    if isinstance(spec, Training):
        return spec
    if isinstance(spec, Mapping):
        if "spec" in spec:
            return _training(spec["spec"])
        if "training" in spec or "model" in spec:
            return _training(spec.get("training") or {})
        return Training.model_validate(dict(spec))
    raise TypeError(f"cannot read training settings from {type(spec).__name__}")


def loss_weights(training: Training) -> tuple[float, float, float]:
    """(spin_weight, sft_weight, kl_to_base) of `spin_objective` for these training settings: objective sft is
    the NLL of the real answer at weight 1 and no SPIN term; objective spin is the SPIN loss plus sftWeight x NLL."""
    if training.objective == "sft":
        return 0.0, 1.0, training.kl_to_base
    return 1.0, training.sft_weight, training.kl_to_base


def _number(value: float) -> str:
    return f"{value:g}"


def variant_label(spec: Any) -> str:
    """A short name of the method, e.g. "SPIN (paper)" or "SPIN + NLL (sftWeight 0.2) + KL to base (klToBase 0.1)".

    Accepts a SpinRun, a SpinRunSpec, a Training, or the same as a mapping (run.json's document, its spec, or the
    training section). A non-sigmoid loss is named too ("SPIN-hinge"); the defaults give exactly "SPIN (paper)";
    objective sft gives CONTINUED_SFT.
    """
    tr = _training(spec)
    if tr.objective == "sft":
        kl = f" + KL to base (klToBase {_number(tr.kl_to_base)})" if tr.kl_to_base > 0 else ""
        dropped = " + identical pairs dropped" if tr.drop_identical_pairs else ""
        return f"{CONTINUED_SFT}{kl}{dropped}"
    head = "SPIN" if tr.loss == "sigmoid" else f"SPIN-{tr.loss}"
    parts = []
    if tr.sft_weight > 0:
        parts.append(f"NLL (sftWeight {_number(tr.sft_weight)})")
    if tr.opponent == "mixture":
        mix = tr.opponent_mixture or OpponentMixture()
        parts.append(f"mixture opponent (alpha {_number(mix.alpha)}, history {mix.history})")
    if tr.kl_to_base > 0:
        parts.append(f"KL to base (klToBase {_number(tr.kl_to_base)})")
    if tr.drop_identical_pairs:
        parts.append("identical pairs dropped")
    if not parts:
        return PAPER if head == "SPIN" else head
    return " + ".join([head, *parts])

"""The SPIN loss family (as in the official SPIN trainer), on per-sequence summed log-probs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def spin_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    opponent_real_logps: torch.Tensor,
    opponent_generated_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example losses and the (detached) rewards of the real and generated answers, all shape (batch,).

    logits = (policy_real - policy_generated) - (opponent_real - opponent_generated)
    sigmoid: -logsigmoid(beta * logits)  ·  hinge: relu(1 - beta * logits)  ·  ipo: (logits - 1 / (2 beta))^2
    """
    logits = (policy_real_logps - policy_generated_logps) - (opponent_real_logps - opponent_generated_logps)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
    real_rewards = beta * (policy_real_logps - opponent_real_logps).detach()
    generated_rewards = beta * (policy_generated_logps - opponent_generated_logps).detach()
    return losses, real_rewards, generated_rewards

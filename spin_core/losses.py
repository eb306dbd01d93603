"""The SPIN loss family (as in the official SPIN trainer), on per-sequence summed log-probs, and the opt-in
regularised objective (NLL anchoring, KL to the base model, mixture opponent) built around it."""

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
    lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example losses and the (detached) rewards of the real and generated answers, all shape (batch,).

    logits = (policy_real - policy_generated) - (opponent_real - opponent_generated)
    sigmoid: -logsigmoid(beta * logits)  ·  hinge: relu(1 - beta * logits)  ·  ipo: (logits - 1 / (2 beta))^2

    `lengths` (token counts of the real and generated answers): IPO's target 1 / (2 beta) is a margin of per-token
    mean log-probs (as the IPO authors and TRL define it), so with lengths given the IPO log-probs (and rewards) are
    divided by them; sigmoid and hinge ignore lengths.
    """
    if loss_type == "ipo" and lengths is not None:
        real_n, gen_n = (n.to(policy_real_logps.dtype).clamp(min=1) for n in lengths)
        policy_real_logps, opponent_real_logps = policy_real_logps / real_n, opponent_real_logps / real_n
        policy_generated_logps = policy_generated_logps / gen_n
        opponent_generated_logps = opponent_generated_logps / gen_n
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


# ----------------------------------------------------------------------------------------------- regularised SPIN
# Opt-in terms of training.sftWeight / klToBase / opponent: mixture. `spin_loss` above stays the paper's loss;
# `spin_objective` adds the terms, and with every weight at 0 returns spin_loss's own tensors unchanged.

K3_LINEAR_FROM = 20.0  # exp(r) is continued linearly beyond r = 20 (no overflow; the gradient keeps its sign)


def nll_per_token(policy_real_logps: torch.Tensor, real_token_counts: torch.Tensor) -> torch.Tensor:
    """Length-normalised NLL of the real answers, shape (batch,): -sum_i log p(y_i) / |y| (|y| >= 1)."""
    return -policy_real_logps / real_token_counts.to(policy_real_logps.dtype).clamp(min=1)


def k3_per_token(policy_token_logps: torch.Tensor, base_token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each row's masked tokens of exp(r) - 1 - r, r = log p_base(y_i) - log p_policy(y_i); shape (batch,).

    This is Schulman's k3 estimator of KL(policy || base), evaluated on the real answers' tokens (not on samples of
    the policy, so it is a divergence penalty on the data rather than an unbiased KL estimate). Each token's term is
    >= 0 and 0 only where the policy gives the token the base model's probability, so minimising it pulls log p(y_i)
    toward the base model's value from either side. For r > 20, exp(r) is continued linearly (same value and slope
    at 20) so a collapsed token cannot overflow.
    """
    keep = mask.to(policy_token_logps.dtype)
    r = (base_token_logps - policy_token_logps) * keep
    capped = torch.exp(torch.clamp(r, max=K3_LINEAR_FROM))
    terms = torch.where(r > K3_LINEAR_FROM, capped * (r - K3_LINEAR_FROM + 1), capped) - 1 - r
    return (terms * keep).sum(-1) / keep.sum(-1).clamp(min=1)


def mixture_weights(alpha: float, history: int, iteration: int) -> list[float]:
    """Weights of the iterates M_{t-1}, M_{t-2}, ... in the mixture opponent of iteration t (1-based).

    K = min(history, t) iterates exist (M_0 is the SFT model); w_k = alpha^k / sum_{j<K} alpha^j, k = 0 the newest.
    """
    if not 0 < alpha <= 1 or history < 1 or iteration < 1:
        raise ValueError(f"need 0 < alpha <= 1, history >= 1, iteration >= 1; got {alpha}, {history}, {iteration}")
    raw = [alpha**k for k in range(min(history, iteration))]
    total = sum(raw)
    return [w / total for w in raw]


def mixture_logps(components: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_k w_k log p_k: the log-prob under the geometric mixture, up to its normaliser log Z(x), which is the same
    for the real and the generated answer of a prompt and so cancels in the SPIN logits. One component is returned
    as it is (history 1 is exactly the plain opponent)."""
    if len(components) != len(weights) or not components:
        raise ValueError(f"{len(components)} components for {len(weights)} weights")
    if len(components) == 1:
        return components[0]
    return sum((w * c for w, c in zip(weights, components, strict=True)), torch.zeros_like(components[0]))


def spin_objective(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    opponent_real_logps: torch.Tensor,
    opponent_generated_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    *,
    spin_weight: float = 1.0,
    sft_weight: float = 0.0,
    real_token_counts: torch.Tensor | None = None,
    kl_to_base: float = 0.0,
    policy_real_token_logps: torch.Tensor | None = None,
    base_real_token_logps: torch.Tensor | None = None,
    real_token_mask: torch.Tensor | None = None,
    lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """SPIN plus the opt-in regularisers, per example: (losses, real rewards, generated rewards, terms).

    losses = spin_weight * spin_loss + sft_weight * nll_per_token(real) + kl_to_base * k3_per_token(real vs base)
    `terms` holds the detached per-example parts that are on: "spin" (unweighted, always: a diagnostic even when
    spin_weight is 0), and "sft" / "kl" when their weight is > 0. spin_weight 0 with sft_weight 1 is plain continued
    SFT on the real answers (training.objective: sft). `lengths`: the answers' token counts, for IPO's per-token
    target (see spin_loss). The opponent log-probs are whatever the caller passes (M_{t-1}'s, or `mixture_logps` of
    several iterates). With spin_weight 1 and both other weights 0 the returned losses are spin_loss's tensor itself:
    the paper's method, bit for bit.
    """
    losses, real_rewards, generated_rewards = spin_loss(
        policy_real_logps,
        policy_generated_logps,
        opponent_real_logps,
        opponent_generated_logps,
        beta,
        loss_type,
        lengths,
    )
    terms = {"spin": losses.detach()}
    if spin_weight < 0 or sft_weight < 0 or kl_to_base < 0:
        raise ValueError(
            f"spin_weight, sft_weight and kl_to_base must be >= 0, got {spin_weight}, {sft_weight} and {kl_to_base}"
        )
    if spin_weight == 0 and sft_weight == 0 and kl_to_base == 0:
        raise ValueError("spin_weight, sft_weight and kl_to_base are all 0: the objective has nothing to train")
    if spin_weight == 0:
        losses = torch.zeros_like(losses)  # no SPIN gradient at all (0 * loss would still backpropagate through it)
    elif spin_weight != 1:
        losses = spin_weight * losses
    if sft_weight > 0:
        if real_token_counts is None:
            raise ValueError("sft_weight > 0 needs real_token_counts")
        nll = nll_per_token(policy_real_logps, real_token_counts)
        losses = losses + sft_weight * nll
        terms["sft"] = nll.detach()
    if kl_to_base > 0:
        if policy_real_token_logps is None or base_real_token_logps is None or real_token_mask is None:
            raise ValueError("kl_to_base > 0 needs the policy's and the base model's per-token log-probs and a mask")
        kl = k3_per_token(policy_real_token_logps, base_real_token_logps, real_token_mask)
        losses = losses + kl_to_base * kl
        terms["kl"] = kl.detach()
    return losses, real_rewards, generated_rewards, terms

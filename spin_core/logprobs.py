"""Log-probabilities of chosen tokens without a full-vocabulary float32 log-softmax.

`log p(token) = logit[token] - logsumexp(logits)`: the log-normaliser is computed in float32, a chunk of positions at
a time, and the backward pass recomputes the softmax from the (bf16 or fp32) logits the same way. Peak extra memory is
one chunk of float32 rows instead of a float32 copy of every position's vocabulary (and autograd's saved copy of it):
at a 32k vocabulary, 1024 positions and batch 8 that copy alone is 1 GiB.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 1024


class _ChosenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:  # type: ignore[override]
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for start in range(0, logits.shape[0], chunk):
            rows = logits[start : start + chunk].float()
            lse[start : start + chunk] = torch.logsumexp(rows, dim=-1)
            picked = rows.gather(1, targets[start : start + chunk, None]).squeeze(1)
            out[start : start + chunk] = picked - lse[start : start + chunk]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            end = start + ctx.chunk
            g = grad_out[start:end, None].float()
            # d(logit[t] - lse)/d logits = onehot(t) - softmax(logits)
            part = -torch.exp(logits[start:end].float() - lse[start:end, None]) * g
            part.scatter_add_(1, targets[start:end, None], g)
            grad[start:end] = part.to(grad.dtype)
        return grad, None, None


def chosen_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """log softmax(logits)[..., targets] in float32, shape logits.shape[:-1]; differentiable w.r.t. logits.

    logits (..., V) in any float dtype; targets (...) integer ids in [0, V)."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
    flat = logits.reshape(-1, logits.shape[-1])
    picked = _ChosenLogProbs.apply(flat, targets.reshape(-1).long(), max(1, chunk))
    return picked.reshape(targets.shape)

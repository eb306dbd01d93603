"""Training pairs of iteration t: the published shards of t and the `mixPreviousIterations` before it, tokenised
exactly as generation tokenised them, plus per-sequence log-prob helpers (one concatenated forward)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from spin_core import chat, layout
from spin_core.context import RunContext
from spin_core.errors import SpinError
from spin_core.planner import training_iterations
from spin_core.rows import read_rows


@dataclass
class Pair:
    id: str
    iteration: int  # the iteration whose generation wrote the answer
    prompt: list[int]
    real: list[int]
    generated: list[int]
    identical: bool
    opponent: tuple[float, float] | None  # (real, generated) under M_{t-1}, when the row's values can be reused
    older: list[tuple[float, float]] = field(default_factory=list)  # under M_{t-2}, M_{t-3}, ... (mixture opponent)
    base_real_tokens: Any = None  # per-token log-probs of the real answer under M_0 (1-D float32 tensor; klToBase)


def load_pairs(ctx: RunContext, t: int, tokenizer) -> list[Pair]:
    """Every pair iteration t trains on; a clear error when a shard is missing or nothing is left."""
    spec = ctx.run.spec
    shards, training = spec.generation.shards, spec.training
    pairs: list[Pair] = []
    for i in training_iterations(spec, t):
        keys = [layout.shard(i, s, shards) for s in range(shards)]
        missing = [k for k in keys if not ctx.store.is_published(k)]
        if missing:
            raise SpinError(
                f"iteration {t} trains on the pairs of iteration {i}, but {len(missing)} of its {shards} generation "
                f"shards are not published (first: {ctx.store.uri_of(missing[0])}): run generation first"
            )
        for key in keys:
            for row in read_rows(ctx.store.fetch(key) / layout.SHARD_ROWS, ctx.store.uri_of(key)):
                lengths = (training.max_prompt_length, training.max_length)
                p, real = chat.encode_pair_side(tokenizer, row.prompt, row.real, *lengths)
                _, generated = chat.encode_pair_side(tokenizer, row.prompt, row.generated, *lengths)
                o = row.opponent_logps
                reusable = (
                    o is not None
                    and row.iteration == t  # older rows were written by older models: not M_{t-1}
                    and o.dtype == "float32"
                    and (o.max_prompt_length, o.max_length) == lengths
                )
                opponent = (o.real, o.generated) if reusable else None
                pairs.append(Pair(row.id, i, p, real, generated, row.real.strip() == row.generated.strip(), opponent))
    if not pairs:
        raise SpinError(f"iteration {t} has no training pairs: the generation shards hold no rows")
    return pairs


def batch_tensors(pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real sequences then generated ones, right-padded to the longest in this batch only:
    (input_ids, attention_mask, labels) with labels -100 on prompts and padding."""
    sequences = [(p.prompt, p.real) for p in pairs] + [(p.prompt, p.generated) for p in pairs]
    width = max(len(a) + len(b) for a, b in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, (prompt, answer) in enumerate(sequences):
        n = len(prompt) + len(answer)
        ids[row, :n] = torch.tensor(prompt + answer)
        mask[row, :n] = 1
        labels[row, len(prompt) : n] = torch.tensor(answer)
    return ids, mask, labels


def sequence_token_logps(
    model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token log-probs, keep): log-prob of each labelled (answer) token, 0 elsewhere, shape (batch, width - 1),
    and the mask of those tokens; one forward."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != -100
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return token_logps * keep, keep


def sequence_logps(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of the labelled (answer) tokens of each sequence, in one forward."""
    token_logps, _ = sequence_token_logps(model, ids, mask, labels)
    return token_logps.sum(-1)


def pair_logps(model, pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, generated) summed answer log-probs of a batch of pairs: both sides in one concatenated forward."""
    logps = sequence_logps(model, *batch_tensors(pairs, pad_id))
    return logps[: len(pairs)], logps[len(pairs) :]


@dataclass
class PairLogps:
    """A batch's answer log-probs: per-sequence sums of both sides, and the real side's per-token values."""

    real: torch.Tensor  # (batch,)
    generated: torch.Tensor  # (batch,)
    real_tokens: torch.Tensor  # (batch, width - 1): log-prob of each real-answer token, 0 elsewhere
    real_mask: torch.Tensor  # (batch, width - 1): where the real answer's tokens are


def pair_token_logps(model, pairs: list[Pair], pad_id: int) -> PairLogps:
    """Like pair_logps (same single concatenated forward), keeping the real answers' per-token log-probs."""
    tokens, keep = sequence_token_logps(model, *batch_tensors(pairs, pad_id))
    sums, n = tokens.sum(-1), len(pairs)
    return PairLogps(sums[:n], sums[n:], tokens[:n], keep[:n])


def base_tokens_like(pairs: list[Pair], mask: torch.Tensor) -> torch.Tensor:
    """The pairs' stored base-model per-token log-probs of the real answers, laid out like `PairLogps.real_tokens`
    (row i, in order, at the positions `mask` marks: the answer tokens)."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    values = [torch.as_tensor(p.base_real_tokens, dtype=torch.float32) for p in pairs]
    if any(v.numel() != len(p.real) for v, p in zip(values, pairs, strict=True)):
        raise ValueError("base-model log-probs do not match the real answers' token counts")
    out[mask] = torch.cat(values).to(mask.device)
    return out


def real_token_counts(pairs: list[Pair], device=None) -> torch.Tensor:
    """Tokens of each real answer (what sftWeight's NLL is normalised by)."""
    return torch.tensor([len(p.real) for p in pairs], dtype=torch.float32, device=device)


def select_pairs(pairs: list[Pair], drop_identical: bool) -> tuple[list[Pair], dict[str, float]]:
    """The pairs to train on and their counts: pairs whose generated answer equals the real one are always counted
    (pairs/identical, pairs/identical_share) and dropped when `drop_identical` (pairs/dropped)."""
    identical = sum(p.identical for p in pairs)
    kept = [p for p in pairs if not p.identical] if drop_identical else list(pairs)
    stats = {
        "pairs/total": len(pairs),
        "pairs/identical": identical,
        "pairs/identical_share": identical / len(pairs) if pairs else 0.0,
        "pairs/dropped": len(pairs) - len(kept),
        "pairs/trained": len(kept),
    }
    return kept, stats

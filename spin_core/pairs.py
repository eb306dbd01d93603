"""Training pairs of iteration t: the published shards of t and the `mixPreviousIterations` before it, tokenised
exactly as generation tokenised them, plus per-sequence log-prob helpers (one concatenated forward)."""

from __future__ import annotations

from dataclasses import dataclass

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


def sequence_logps(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of the labelled (answer) tokens of each sequence, in one forward."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != -100
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * keep).sum(-1)


def pair_logps(model, pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, generated) summed answer log-probs of a batch of pairs: both sides in one concatenated forward."""
    logps = sequence_logps(model, *batch_tensors(pairs, pad_id))
    return logps[: len(pairs)], logps[len(pairs) :]

"""Training pairs of iteration t: the published shards of t and the `mixPreviousIterations` before it, as token ids
(`spin_core.chat`: the prompt generation fed the engine, the real answer in context, the generated answer as sampled),
plus per-sequence log-prob helpers (one forward per batch: the prompt shared by both answers, or both sides as rows of
one concatenated batch) that gather the answer tokens' log-probs without a full-vocabulary float32 log-softmax."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from spin_core import chat, layout
from spin_core.context import RunContext
from spin_core.errors import SpinError
from spin_core.logprobs import chosen_logprobs
from spin_core.planner import training_iterations
from spin_core.rows import TOKENIZATION, read_rows


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
    truncated: bool = False  # the generated answer was cut at maxNewTokens (finish_reason length): no terminator
    retokenized: bool = False  # an answer's tokens could not be taken from the conversation or the sampled ids


def _generated_ids(tokenizer, row, lengths: tuple[int, int]) -> tuple[list[int], list[int], bool]:
    """(prompt ids, generated answer ids, retokenized) of a row: the sampled ids; for rows written before they were
    stored, the text tokenised in context (without the terminator when generation was cut at maxNewTokens)."""
    if row.generated_token_ids is not None:
        return (*chat.encode_generated_side(tokenizer, row.prompt, row.generated_token_ids, *lengths), False)
    ids, _ = chat.answer_in_context(tokenizer, row.prompt, row.generated)
    if row.finish_reason != "stop":
        ids = ids[:-1] or ids
    return (*chat.encode_generated_side(tokenizer, row.prompt, ids, *lengths), True)


def load_pairs(ctx: RunContext, t: int, tokenizer, reuse_dtype: str | None = "float32") -> list[Pair]:
    """Every pair iteration t trains on; a clear error when a shard is missing or nothing is left.

    The generating model's stored log-probs are reused as the opponent's only when they were computed on the same
    tokens (lengths and tokenisation) in `reuse_dtype` (None: never, e.g. when training in bfloat16)."""
    spec = ctx.run.spec
    shards, training = spec.generation.shards, spec.training
    lengths = (training.max_prompt_length, training.max_length)
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
            source = ctx.store.uri_of(key)
            for row in read_rows(ctx.store.fetch(key) / layout.SHARD_ROWS, source):
                p, real, exact = chat.encode_pair_side_exact(tokenizer, row.prompt, row.real, *lengths)
                _, generated, from_text = _generated_ids(tokenizer, row, lengths)
                if row.generated_token_ids is not None and row.prompt_tokens != len(p):
                    raise SpinError(
                        f"{source}: row {row.id} was generated from a prompt of {row.prompt_tokens} tokens, but the "
                        f"trainer's prompt has {len(p)}: the tokenizer, its chat template or maxPromptLength changed "
                        "between generation and training"
                    )
                o = row.opponent_logps
                reusable = (
                    o is not None
                    and row.iteration == t  # older rows were written by older models: not M_{t-1}
                    and reuse_dtype is not None
                    and o.dtype == reuse_dtype
                    and o.tokenization == TOKENIZATION
                    and (o.max_prompt_length, o.max_length) == lengths
                )
                opponent = (o.real, o.generated) if reusable else None
                identical = row.real.strip() == row.generated.strip()
                pair = Pair(row.id, i, p, real, generated, identical, opponent)
                pair.truncated = row.finish_reason == "length"
                pair.retokenized = from_text or not exact
                pairs.append(pair)
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
    and the mask of those tokens; one forward (no KV cache), log-probs of the labelled positions only."""
    device = _device_of(model)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    token_logps = torch.zeros(targets.shape, dtype=torch.float32, device=device)
    token_logps[keep] = chosen_logprobs(logits[keep], targets[keep])
    return token_logps, keep


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def sequence_logps(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of the labelled (answer) tokens of each sequence, in one forward."""
    token_logps, _ = sequence_token_logps(model, ids, mask, labels)
    return token_logps.sum(-1)


# ------------------------------------------------------------------------------- the shared-prompt forward
# Both answers of a pair follow the same prompt. Instead of two rows (prompt + real, prompt + generated), one row
# holds prompt + real + generated: the generated answer's positions restart where the prompt ends, and a 4D
# attention mask lets it see the prompt and itself, never the real answer. Each prompt token goes through the
# model once instead of twice; the log-probs are those of the two-row forward (up to float rounding).
CUSTOM_MASK_ATTENTION = ("sdpa", "eager")


def shares_prompt(model, enabled: bool = True) -> bool:
    """Whether the shared-prompt forward applies: asked for, and the model's attention takes a custom 4D mask
    (transformers' sdpa and eager implementations do; flash-attention kernels do not)."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    config = getattr(inner, "config", None)
    return enabled and getattr(config, "_attn_implementation", None) in CUSTOM_MASK_ATTENTION


@dataclass
class Packed:
    """One row per pair: prompt, real answer, generated answer; with what the forward and the gathers need."""

    ids: torch.Tensor  # (batch, width)
    positions: torch.Tensor  # (batch, width)
    allowed: torch.Tensor  # (batch, 1, width, width) bool: query may attend key
    real_at: torch.Tensor  # (batch, R): the position whose logits predict each real-answer token
    real_targets: torch.Tensor  # (batch, R)
    real_keep: torch.Tensor  # (batch, R) bool
    gen_at: torch.Tensor  # (batch, G)
    gen_targets: torch.Tensor
    gen_keep: torch.Tensor


def packed_tensors(pairs: list[Pair], pad_id: int) -> Packed:
    n = len(pairs)
    width = max(len(p.prompt) + len(p.real) + len(p.generated) for p in pairs)
    r_max, g_max = max(max(len(p.real) for p in pairs), 1), max(max(len(p.generated) for p in pairs), 1)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed = torch.zeros((n, 1, width, width), dtype=torch.bool)
    real_at, real_targets = torch.zeros((n, r_max), dtype=torch.long), torch.zeros((n, r_max), dtype=torch.long)
    gen_at, gen_targets = torch.zeros((n, g_max), dtype=torch.long), torch.zeros((n, g_max), dtype=torch.long)
    real_keep, gen_keep = torch.zeros((n, r_max), dtype=torch.bool), torch.zeros((n, g_max), dtype=torch.bool)
    for i, pair in enumerate(pairs):
        lp, lr, lg = len(pair.prompt), len(pair.real), len(pair.generated)
        used = lp + lr + lg
        ids[i, :used] = torch.tensor(pair.prompt + pair.real + pair.generated)
        positions[i, : lp + lr] = torch.arange(lp + lr)
        positions[i, lp + lr : used] = torch.arange(lp, lp + lg)
        allowed[i, 0, :used, :used] = causal[:used, :used]
        allowed[i, 0, lp + lr : used, lp : lp + lr] = False  # the generated answer never sees the real one
        allowed[i, 0, used:, :] = causal[used:, :]  # padding queries: harmless rows (no all-masked softmax)
        # The last prompt position predicts the first token of either answer; then each answer its own next one.
        real_at[i, :lr] = torch.tensor([lp - 1, *range(lp, lp + lr - 1)][:lr], dtype=torch.long)
        gen_at[i, :lg] = torch.tensor([lp - 1, *range(lp + lr, lp + lr + lg - 1)][:lg], dtype=torch.long)
        real_targets[i, :lr], real_keep[i, :lr] = torch.tensor(pair.real, dtype=torch.long), True
        gen_targets[i, :lg], gen_keep[i, :lg] = torch.tensor(pair.generated, dtype=torch.long), True
    return Packed(ids, positions, allowed, real_at, real_targets, real_keep, gen_at, gen_targets, gen_keep)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as the additive float mask every attention implementation takes (0 or the dtype's min)."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


def packed_token_logps(model, pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(real token log-probs, real keep, generated token log-probs, generated keep) from one shared-prompt forward
    (no KV cache); token log-probs are 0 where keep is False."""
    packed = packed_tensors(pairs, pad_id)
    first = next(model.parameters())
    device, dtype = first.device, first.dtype if first.dtype.is_floating_point else torch.float32
    logits = model(
        input_ids=packed.ids.to(device),
        attention_mask=_additive(packed.allowed, dtype).to(device),
        position_ids=packed.positions.to(device),
        use_cache=False,
    ).logits
    rows = torch.arange(len(pairs), device=device).unsqueeze(1)
    out = []
    for at, targets, keep in (
        (packed.real_at, packed.real_targets, packed.real_keep),
        (packed.gen_at, packed.gen_targets, packed.gen_keep),
    ):
        keep = keep.to(device)
        chosen = logits[rows, at.to(device)]  # only the positions that predict answers
        token_logps = torch.zeros(keep.shape, dtype=torch.float32, device=device)
        token_logps[keep] = chosen_logprobs(chosen[keep], targets.to(device)[keep])
        out += [token_logps, keep]
    return tuple(out)


def pair_logps(model, pairs: list[Pair], pad_id: int, shared_prompt: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, generated) summed answer log-probs of a batch of pairs, in one forward: the shared-prompt one where
    the model allows it (`shares_prompt`), else both sides as rows of one concatenated batch."""
    if shares_prompt(model, shared_prompt):
        real, _, gen, _ = packed_token_logps(model, pairs, pad_id)
        return real.sum(-1), gen.sum(-1)
    logps = sequence_logps(model, *batch_tensors(pairs, pad_id))
    return logps[: len(pairs)], logps[len(pairs) :]


@dataclass
class PairLogps:
    """A batch's answer log-probs: per-sequence sums of both sides, and the real side's per-token values."""

    real: torch.Tensor  # (batch,)
    generated: torch.Tensor  # (batch,)
    real_tokens: torch.Tensor  # (batch, width): log-prob of each real-answer token, in order, 0 elsewhere
    real_mask: torch.Tensor  # (batch, width): where the real answer's tokens are


def pair_token_logps(model, pairs: list[Pair], pad_id: int, shared_prompt: bool = True) -> PairLogps:
    """Like pair_logps (the same single forward), keeping the real answers' per-token log-probs."""
    if shares_prompt(model, shared_prompt):
        real, real_keep, gen, _ = packed_token_logps(model, pairs, pad_id)
        return PairLogps(real.sum(-1), gen.sum(-1), real, real_keep)
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


def select_pairs(
    pairs: list[Pair], drop_identical: bool, drop_truncated: bool = False
) -> tuple[list[Pair], dict[str, float]]:
    """The pairs to train on and their counts: pairs whose generated answer equals the real one are always counted
    (pairs/identical, pairs/identical_share) and dropped when `drop_identical`; pairs whose generated answer was cut
    at maxNewTokens are counted (pairs/truncated) and dropped when `drop_truncated`; pairs/dropped counts both."""
    identical = sum(p.identical for p in pairs)
    truncated = sum(p.truncated for p in pairs)
    kept = [p for p in pairs if not (drop_identical and p.identical) and not (drop_truncated and p.truncated)]
    stats = {
        "pairs/total": len(pairs),
        "pairs/identical": identical,
        "pairs/identical_share": identical / len(pairs) if pairs else 0.0,
        "pairs/truncated": truncated,
        "pairs/retokenized": sum(p.retokenized for p in pairs),
        "pairs/dropped": len(pairs) - len(kept),
        "pairs/trained": len(kept),
    }
    return kept, stats

"""`spin generate`: step 1 of SPIN iteration t, one shard per process (one pod of the Indexed Job).

The model of the iteration (M_{t-1}) answers every prompt of its shard; the rows (prompt, real answer, generated
answer, token counts and, when asked, the opponent log-probs of both answers) are written to a local rows.jsonl and
published as the artefact `iter-<t>/generated/shard-<i>-of-<n>`. Publishing is the last step and is atomic (the
manifest is written last, put-if-absent), so a killed shard leaves nothing published and a rerun starts over; a
published shard is never redone.

Prompts are token ids from `chat.prompt_token_ids` (exactly what the trainer puts before each answer); the rows keep
the ids each answer was sampled as (`generated_token_ids`), which the trainer trains on. Generation stops at the
chat template's turn terminator as well as at EOS (`chat.stop_token_ids`). Each prompt
samples with its own seed, derived from generation.seed, the iteration and the prompt id: a rerun gives the same
answers, whatever the number of shards.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spin_core import layout
from spin_core.context import RunContext
from spin_core.engines import BACKENDS, Engine, Sampling, derive_seed, open_engine, resolve_dtype
from spin_core.errors import SpinError
from spin_core.inputs import truncation_note
from spin_core.rows import TOKENIZATION, GeneratedRow, OpponentLogps, write_rows
from spin_core.store import AlreadyPublished


class ShardIndexError(SpinError):
    """The shard index is missing or out of range."""


@dataclass
class ShardResult:
    """What one `spin generate` did."""

    key: str
    uri: str
    skipped: bool = False  # already published: nothing done
    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    generate_seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0


def resolve_shard_index(shard_index: int | None, shards: int) -> int:
    """The shard to generate: the given index (0..shards-1), or 0 when the run has one shard and none is given."""
    if shard_index is None:
        if shards == 1:
            return 0
        raise ShardIndexError(
            f"generation.shards is {shards}: give --shard-index 0..{shards - 1} "
            "(or JOB_COMPLETION_INDEX, set by an Indexed Job)"
        )
    if not 0 <= shard_index < shards:
        raise ShardIndexError(
            f"shard index {shard_index} is out of range: generation.shards is {shards} (0..{shards - 1})"
        )
    return shard_index


def opponent_logprobs_wanted(ctx: RunContext, dtype: str) -> bool:
    """generation.opponentLogprobs, or when unset: on when training precomputes reference log-probs and the engine
    runs in float32 (the only dtype whose log-probs the trainer trusts)."""
    spec = ctx.run.spec
    if spec.generation.opponent_logprobs is not None:
        return spec.generation.opponent_logprobs
    return spec.training.reference_logprobs == "precompute" and dtype == "float32"


def engine_settings(ctx: RunContext, want_logprobs: bool) -> dict[str, Any]:
    """Keyword arguments of `engines.open_engine` for this run's generation settings."""
    spec = ctx.run.spec
    g, tr = spec.generation, spec.training
    needed = tr.max_prompt_length + g.max_new_tokens
    if want_logprobs:
        needed = max(needed, tr.max_length + 1)  # scoring runs prompt+answer as a prompt, plus one token out
    return {
        "dtype": g.dtype,
        "batch_size": g.batch_size,
        "tensor_parallel_size": g.gpus_per_shard if g.gpus_per_shard > 1 else 1,
        "max_model_len": needed,
    }


def main(spec_path: Path, iteration: int, shard_index: int | None, shards: list[int] | None = None) -> int:
    """Entry point of `spin generate`: 0 when the shard(s) are published (now or before).

    `shards` (the local runner's `--shards`) generates several shards in this process with one engine."""
    ctx = RunContext.from_file(spec_path)
    results = run_shards(ctx, iteration, shards) if shards else [run_shard(ctx, iteration, shard_index)]
    for result in results:
        if result.skipped:
            print(f"{result.uri} is already published: nothing to do", flush=True)
        else:
            print(summary(result), flush=True)
    return 0


def summary(result: ShardResult) -> str:
    meta = result.meta
    return (
        f"generated shard {meta['shard']}/{meta['shards']} of iteration {meta['iteration']} ({meta['backend']}, "
        f"{meta['dtype']}): {result.prompts} prompts, {result.generated_tokens} tokens in "
        f"{result.generate_seconds:.1f} s ({result.tokens_per_second:.1f} tokens/s; {result.seconds:.1f} s in all) "
        f"-> {result.uri}"
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_shard(
    ctx: RunContext,
    iteration: int,
    shard_index: int | None = None,
    *,
    engine: Engine | None = None,
) -> ShardResult:
    """Generate and publish one shard of iteration `iteration`.

    `engine`: an already started engine on the iteration's model (tests start one per session); by default one is
    started here and closed at the end.
    """
    started = time.perf_counter()
    from spin_core import chat, data

    spec = ctx.run.spec
    g, tr = spec.generation, spec.training
    ctx.check_iteration(iteration)
    index = resolve_shard_index(shard_index, g.shards)
    if g.backend not in BACKENDS:
        raise SpinError(f"unknown generation.backend {g.backend!r}: use one of {', '.join(BACKENDS)}")
    key = layout.shard(iteration, index, g.shards)
    store = ctx.store
    uri = store.uri_of(key)
    if store.is_published(key):
        return ShardResult(key, uri, skipped=True)

    model_uri = ctx.model_uri(iteration)
    model_dir = ctx.fetch_model(iteration)
    tokenizer = chat.load_tokenizer(model_dir, model_uri)
    loaded = data.load_examples(ctx.fetch_dataset(), spec.dataset, spec.dataset.uri)
    loaded.examples = ctx.without_heldout(loaded.examples)
    examples = data.shard_examples(loaded.examples, index, g.shards)
    if engine is not None:
        _check_engine(engine, g.backend, model_dir, g.dtype)
    dtype = engine.dtype if engine is not None else resolve_dtype(g.dtype)
    want_logprobs = opponent_logprobs_wanted(ctx, dtype)
    _log(
        f"iteration {iteration}, shard {index}/{g.shards}: {len(examples)} of {len(loaded.examples)} prompts"
        f"{f' ({len(loaded.skipped)} bad rows skipped)' if loaded.skipped else ''}; model {model_uri}; "
        f"backend {g.backend} ({dtype}); opponent log-probs {'on' if want_logprobs else 'off'}"
    )
    for message in loaded.skipped[:3]:
        _log(f"  skipped {message}")
    if len(loaded.skipped) > 3:
        _log(f"  ... and {len(loaded.skipped) - 3} more bad rows")

    prompts = [chat.prompt_token_ids(tokenizer, ex.prompt, tr.max_prompt_length) for ex in examples]
    if note := truncation_note(tokenizer, [ex.prompt for ex in examples], tr.max_prompt_length):
        _log(f"iteration {iteration}, shard {index}/{g.shards}: {note}")
    seeds = [derive_seed(g.seed, iteration, ex.id) for ex in examples]
    stops = tuple(chat.stop_token_ids(tokenizer, model_dir))
    sampling = Sampling(g.temperature, g.top_p, g.max_new_tokens, stop_token_ids=stops)

    own_engine = engine is None and bool(examples)
    startup = 0.0
    try:
        if own_engine:
            engine = open_engine_for(ctx, iteration)
            startup = getattr(engine, "startup_seconds", 0.0)
        t0 = time.perf_counter()
        completions = engine.generate(prompts, seeds, sampling) if examples else []
        generate_seconds = time.perf_counter() - t0
        # The text is for people and the identical-pair check; the trainer trains on the sampled ids themselves.
        texts = [chat.decode_answer(tokenizer, c.token_ids, stops) for c in completions]
        logps: list[OpponentLogps | None] = [None] * len(examples)
        score_seconds = 0.0
        if want_logprobs and examples:
            t0 = time.perf_counter()
            lengths = (tr.max_prompt_length, tr.max_length)
            real = [chat.encode_pair_side(tokenizer, ex.prompt, ex.real, *lengths) for ex in examples]
            generated = [
                chat.encode_generated_side(tokenizer, ex.prompt, c.token_ids, *lengths)
                for ex, c in zip(examples, completions, strict=True)
            ]
            scores = engine.score(real + generated)
            n = len(examples)
            logps = [
                OpponentLogps(
                    scores[i], scores[n + i], tr.max_length, tr.max_prompt_length, dtype, tokenization=TOKENIZATION
                )
                for i in range(n)
            ]
            score_seconds = time.perf_counter() - t0
    finally:
        if own_engine and engine is not None:
            engine.close()

    rows = [
        GeneratedRow(
            id=ex.id,
            prompt=ex.prompt,
            real=ex.real,
            generated=text,
            finish_reason=c.finish_reason,
            prompt_tokens=len(c.prompt_token_ids),
            generated_tokens=len(c.token_ids),
            iteration=iteration,
            shard=index,
            opponent_logps=lp,
            generated_token_ids=list(c.token_ids),
        )
        for ex, c, text, lp in zip(examples, completions, texts, logps, strict=True)
    ]
    result = ShardResult(
        key,
        uri,
        prompts=len(rows),
        prompt_tokens=sum(r.prompt_tokens for r in rows),
        generated_tokens=sum(r.generated_tokens for r in rows),
        generate_seconds=generate_seconds,
    )
    result.seconds = time.perf_counter() - started
    result.meta = {
        "iteration": iteration,
        "shard": index,
        "shards": g.shards,
        "rows": len(rows),
        "datasetExamples": len(loaded.examples),
        "skippedRows": len(loaded.skipped),
        "promptTokens": result.prompt_tokens,
        "generatedTokens": result.generated_tokens,
        "finishReasons": dict(Counter(r.finish_reason for r in rows)),
        "model": model_uri,
        "backend": g.backend,
        "dtype": dtype,
        "seed": g.seed,
        "temperature": g.temperature,
        "topP": g.top_p,
        "maxNewTokens": g.max_new_tokens,
        "opponentLogprobs": want_logprobs,
        "engineStartupSeconds": round(startup, 3),
        "generateSeconds": round(generate_seconds, 3),
        "scoreSeconds": round(score_seconds, 3),
        "seconds": round(result.seconds, 3),
    }
    with tempfile.TemporaryDirectory(prefix="spin-generate-") as tmp:
        path = Path(tmp) / layout.SHARD_ROWS
        write_rows(path, rows)
        try:
            store.publish(key, {layout.SHARD_ROWS: path}, meta=result.meta)
        except AlreadyPublished:  # another attempt of this shard finished first: its rows stand
            return ShardResult(key, uri, skipped=True)
    return result


def open_engine_for(ctx: RunContext, iteration: int) -> Engine:
    """The engine `spin generate` would start for an iteration (its model, the spec's backend and settings)."""
    g = ctx.run.spec.generation
    model_dir = ctx.fetch_model(iteration)
    want_logprobs = opponent_logprobs_wanted(ctx, resolve_dtype(g.dtype))
    return open_engine(g.backend, model_dir, where=ctx.model_uri(iteration), **engine_settings(ctx, want_logprobs))


def run_shards(ctx: RunContext, iteration: int, indices: list[int] | None = None) -> list[ShardResult]:
    """Several shards (default: all) in one process with one engine, started only if some shard is unpublished:
    for one machine, where an engine start (20-60 s with vLLM on CPU) per shard would dominate."""
    g = ctx.run.spec.generation
    indices = list(range(g.shards)) if indices is None else indices
    for index in indices:
        resolve_shard_index(index, g.shards)
    engine: Engine | None = None
    results = []
    try:
        for index in indices:
            key = layout.shard(iteration, index, g.shards)
            if ctx.store.is_published(key):
                results.append(ShardResult(key, ctx.store.uri_of(key), skipped=True))
                continue
            if engine is None:
                engine = open_engine_for(ctx, iteration)
            results.append(run_shard(ctx, iteration, index, engine=engine))
    finally:
        if engine is not None:
            engine.close()
    return results


def _check_engine(engine: Engine, backend: str, model_dir: Path, dtype: str) -> None:
    if engine.backend != backend:
        raise SpinError(f"the engine given runs backend {engine.backend}, the spec asks for {backend}")
    if Path(engine.model_dir).resolve() != Path(model_dir).resolve():
        raise SpinError(f"the engine given runs {engine.model_dir}, this iteration generates with {model_dir}")
    if dtype != "auto" and engine.dtype != dtype:
        raise SpinError(f"the engine given runs in {engine.dtype}, the spec asks for {dtype}")

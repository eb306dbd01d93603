"""`spin evaluate`: how far iteration t got, on held-out prompts, published as `iter-<t>/eval.json`.

Two numbers per iteration:
- **the SPIN signal**: the opponent M_{t-1} answers the held-out prompts; the new model M_t should prefer the
  real answers to those. Reward accuracy and margin (beta * log-ratio against M_{t-1}, as in training) say how
  well M_t still tells the data from its predecessor's answers. At the paper's fixed point it cannot: accuracy
  near 0.5 and margin near 0.
- **the task score** (optional, `evaluation.scorer`): M_t answers greedily and a user function scores each answer
  against the reference; M_{t-1} too, on the same prompts (`score_previous`; at iteration 1 it is M_0, the
  baseline SPIN must beat, also kept as `baseline_score`). Each score comes with its standard error and a 95 %
  interval (Wilson's for exact match), and the paired change M_t - M_{t-1} with its standard error.

The held-out collapse check (`stopping.heldout_collapse`) compares M_t with M_{t-1} as a user sees them: the score
fell beyond its paired uncertainty, or the held-out log p(real answer) fell by more than training.collapseWarnNats.
It sets `collapse` (1 or 0) and `warnings`; `evaluation.stopWhen.collapse` ends the run on it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from spin_core import layout
from spin_core.chat import (
    decode_answer,
    encode_generated_side,
    encode_pair_side,
    load_tokenizer,
    prompt_token_ids,
    stop_token_ids,
)
from spin_core.context import RunContext
from spin_core.data import Example
from spin_core.engines import Sampling, derive_seed, open_engine
from spin_core.errors import SpinError
from spin_core.inputs import truncation_note
from spin_core.stopping import call_scorer, estimate_fields, heldout_collapse, load_scorer, paired_change
from spin_core.termination import write_termination_message


def greedy_answers(
    engine, tokenizer, examples: list[Example], max_prompt: int, max_new: int, stops: tuple[int, ...] = ()
) -> list[str]:
    prompts = [prompt_token_ids(tokenizer, e.prompt, max_prompt) for e in examples]
    out = engine.generate(prompts, [0] * len(prompts), Sampling(0.0, 1.0, max_new, stop_token_ids=stops))
    return [decode_answer(tokenizer, c.token_ids, stops) for c in out]


def task_scores(reference: str, examples: list[Example], answers: list[str]) -> list[float]:
    """The scorer's value of each answer, in the order of `examples`."""
    scorer = load_scorer(reference)
    pairs = zip(examples, answers, strict=True)
    return [call_scorer(scorer, reference, e.prompt[-1]["content"], e.real, a, e.id) for e, a in pairs]


def task_score(reference: str, examples: list[Example], answers: list[str]) -> float:
    values = task_scores(reference, examples, answers)
    return sum(values) / len(values)


def evaluate(ctx: RunContext, t: int) -> dict[str, Any]:
    """Compute (not publish) the evaluation of iteration t."""
    spec = ctx.run.spec
    ev = spec.evaluation
    if ev is None:
        raise SpinError("spec.evaluation is not set: nothing to evaluate")
    examples = ctx.heldout_examples()
    if ev.scorer:
        load_scorer(ev.scorer)  # fail before any engine starts
    training, generation = spec.training, spec.generation
    beta = ctx.run.iteration_settings(t)[0]
    max_new = ev.max_new_tokens or generation.max_new_tokens
    started = time.monotonic()
    opponent_dir = ctx.fetch_model(t)
    new_dir = ctx.store.fetch(layout.checkpoint(t))
    tokenizer = load_tokenizer(new_dir, ctx.store.uri_of(layout.checkpoint(t)))
    backend = ev.backend or generation.backend
    stops = tuple(stop_token_ids(tokenizer, new_dir))
    # The engines' context is what evaluation uses (a prompt and an answer, or a scored pair and one token), not the
    # model's whole context (32k-128k tokens), for which vLLM would size its KV cache.
    max_model_len = max(training.max_prompt_length + max_new, training.max_length + 1)
    settings = {"dtype": "float32", "batch_size": generation.batch_size, "max_model_len": max_model_len}

    # The opponent answers as it did in training (sampled), and is scored; then the new model.
    opponent = open_engine(backend, opponent_dir, where=ctx.model_uri(t), **settings)
    try:
        prompts = [prompt_token_ids(tokenizer, e.prompt, training.max_prompt_length) for e in examples]
        if note := truncation_note(tokenizer, [e.prompt for e in examples], training.max_prompt_length):
            print(f"evaluation of iteration {t}: {note}", file=sys.stderr, flush=True)
        seeds = [derive_seed(generation.seed, "eval", t, e.id) for e in examples]
        sampling = Sampling(generation.temperature, generation.top_p, max_new, stop_token_ids=stops)
        completions = opponent.generate(prompts, seeds, sampling)
        generated = [decode_answer(tokenizer, c.token_ids, stops) for c in completions]
        lengths = (training.max_prompt_length, training.max_length)
        real_pairs = [encode_pair_side(tokenizer, e.prompt, e.real, *lengths) for e in examples]
        # The opponent's answers are scored as the tokens it sampled (as training does).
        gen_pairs = [
            encode_generated_side(tokenizer, e.prompt, c.token_ids, *lengths)
            for e, c in zip(examples, completions, strict=True)
        ]
        opp_real, opp_gen = opponent.score(real_pairs), opponent.score(gen_pairs)
        previous: list[float] = []
        if ev.scorer:  # M_{t-1}'s own score on the same prompts: the paired comparison and the collapse check
            answers = greedy_answers(opponent, tokenizer, examples, training.max_prompt_length, max_new, stops)
            previous = task_scores(ev.scorer, examples, answers)
    finally:
        opponent.close()
    new = open_engine(backend, new_dir, where=ctx.store.uri_of(layout.checkpoint(t)), **settings)
    try:
        new_real, new_gen = new.score(real_pairs), new.score(gen_pairs)
        scores: list[float] = []
        if ev.scorer:
            answers = greedy_answers(new, tokenizer, examples, training.max_prompt_length, max_new, stops)
            scores = task_scores(ev.scorer, examples, answers)
    finally:
        new.close()

    real_rewards = [beta * (a - b) for a, b in zip(new_real, opp_real, strict=True)]
    gen_rewards = [beta * (a - b) for a, b in zip(new_gen, opp_gen, strict=True)]
    n = len(examples)
    result: dict[str, Any] = {
        "iteration": t,
        "heldout": n,
        "rewards/real": sum(real_rewards) / n,
        "rewards/generated": sum(gen_rewards) / n,
        "rewards/accuracies": sum(r > g for r, g in zip(real_rewards, gen_rewards, strict=True)) / n,
        "rewards/margins": sum(r - g for r, g in zip(real_rewards, gen_rewards, strict=True)) / n,
        "logps/real": sum(new_real) / n,
        "logps/generated": sum(new_gen) / n,
        "logps/real_previous": sum(opp_real) / n,
        "logps/real_change": (sum(new_real) - sum(opp_real)) / n,
        "pairs/identical": sum(e.real.strip() == g.strip() for e, g in zip(examples, generated, strict=True)),
        "seconds": round(time.monotonic() - started, 2),
    }
    if ev.scorer:
        result.update(estimate_fields("score", scores))
        result.update(estimate_fields("score_previous", previous))
        result["score_change"], result["score_change_stderr"] = paired_change(previous, scores)
        if t == 1:
            result["baseline_score"] = result["score_previous"]
        result["scorer"] = ev.scorer
        result["scores"], result["scores_previous"] = scores, previous  # per prompt, in the held-out order
    warnings = heldout_collapse(result, training.collapse_warn_nats)
    result["collapse"] = 1.0 if warnings else 0.0
    result["warnings"] = warnings
    return result


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers of an evaluation (what the operator copies into the run's status)."""
    return {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def main(spec_path: Path, iteration: int) -> int:
    ctx = RunContext.from_file(spec_path)
    ctx.check_iteration(iteration)
    key = layout.evaluation(iteration)
    if ctx.store.exists(key):
        print(f"{ctx.store.uri_of(key)} is already published: nothing to do")
        write_termination_message(summary(ctx.store.read_json(key)))
        return 0
    if not ctx.store.is_published(layout.checkpoint(iteration)):
        raise SpinError(f"iteration {iteration} has no published model yet: train it before evaluating it")
    result = evaluate(ctx, iteration)
    ctx.store.publish_json(key, result)
    write_termination_message(summary(result))
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items() if not isinstance(v, list)}
    print(f"evaluation of iteration {iteration}: {shown} -> {ctx.store.uri_of(key)}")
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return 0

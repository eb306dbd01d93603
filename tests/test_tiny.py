"""The tiny tokenizer and model that tests and the demo build locally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spin_core.chat import load_tokenizer, prompt_token_ids
from spin_core.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, build_model, build_tokenizer

TEXTS = [
    "Hello world!",
    "What is 12+7?\n19",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\n\n",
    "Symbols: ~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./",
    "never seen in training: QXZ qxz 0123456789",
    "unicode too: café, naïve, 東京, 🙂",
]


def test_round_trip_and_special_tokens() -> None:
    tokenizer = build_tokenizer(["What is 12+7?", "19", "Reverse: abc", "cba"] * 10, vocab_size=300)
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == SPECIAL_TOKENS
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == tuple(
        SPECIAL_TOKENS[:4]
    )
    for token in SPECIAL_TOKENS:
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    assert tokenizer("abc")["input_ids"] == tokenizer("abc", add_special_tokens=False)["input_ids"]  # no auto BOS
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_vocab_size() -> None:
    corpus = ["the quick brown fox jumps over the lazy dog"] * 50
    merged = build_tokenizer(corpus, vocab_size=300)
    assert 256 + len(SPECIAL_TOKENS) < len(merged) <= 300  # merges stop early when the corpus runs out of pairs
    assert len(merged("the quick brown fox", add_special_tokens=False)["input_ids"]) < len("the quick brown fox")
    byte_level = build_tokenizer(corpus, vocab_size=64)  # below the 256 bytes + 7 specials: no merges at all
    assert len(byte_level) == 256 + len(SPECIAL_TOKENS)
    assert len(byte_level("the quick", add_special_tokens=False)["input_ids"]) == len("the quick")


def test_chat_template_renders_zephyr_style() -> None:
    tokenizer = build_tokenizer(["x"], vocab_size=64)
    conversation = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert rendered == "<s><|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\nA</s>\n"
    with_prompt = tokenizer.apply_chat_template(conversation[:2], tokenize=False, add_generation_prompt=True)
    assert with_prompt.endswith("<|user|>\nU</s>\n<|assistant|>\n")


def test_head_dim_must_suit_vllm(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(["x"], vocab_size=64)
    with pytest.raises(ValueError, match="head_dim = hidden_size // heads = 16"):
        build_model(tmp_path / "m", tokenizer, hidden_size=64, heads=4)
    with pytest.raises(ValueError, match="multiple of heads"):
        build_model(tmp_path / "m", tokenizer, hidden_size=128, heads=3)
    assert not (tmp_path / "m").exists()
    build_model(tmp_path / "ok", tokenizer, hidden_size=64, heads=1, layers=1)  # head dim 64


def test_tiny_model_loads_and_gives_vocab_sized_logits(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (128, 2, 32)
    assert config["tie_word_embeddings"] is False

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert model.dtype == torch.float32
    ids = prompt_token_ids(load_tokenizer(tiny_model_dir, "tiny"), [{"role": "user", "content": "What is 1+1?"}], 64)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))
    assert torch.isfinite(logits).all()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= len(ids) + 4 and out[0, : len(ids)].tolist() == ids


def test_build_model_is_seeded_and_leaves_global_rng_alone(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tokenizer = build_tokenizer(["x"], vocab_size=64)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(tmp_path / "a", tokenizer, hidden_size=64, heads=2, layers=1, seed=1)
    assert torch.equal(torch.rand(3), expected)
    build_model(tmp_path / "b", tokenizer, hidden_size=64, heads=2, layers=1, seed=1)
    build_model(tmp_path / "c", tokenizer, hidden_size=64, heads=2, layers=1, seed=2)
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert a["lm_head.weight"].shape == (len(tokenizer), 64)

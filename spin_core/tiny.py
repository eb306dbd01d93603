"""Tiny models for the tests and the demo, built locally (nothing can come from a model hub).

`build_tokenizer` trains a byte-level BPE tokenizer on a few texts and gives it a zephyr-like chat template;
`build_model` saves a randomly initialised (seeded) Llama next to it. The folder loads offline with
`transformers.AutoModelForCausalLM` / `AutoTokenizer` and with vLLM (CPU: head_dim must be one vLLM supports).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
# Ids 0..6, in this order, whatever the training texts.
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, *ROLE_TOKENS.values()]

# Zephyr-like: bos, then every turn as "<|role|>\n" + content + eos + "\n"; the generation prompt is "<|assistant|>\n".
# An answer is therefore the tokens the model writes after "<|assistant|>\n", closed by eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': expected system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Head dims vLLM's CPU attention supports.
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with the special tokens and chat template of this module.

    Byte-level: every UTF-8 text round-trips (`decode(encode(text)) == text`), whatever the training texts.
    The 256 byte symbols and the 7 special tokens are always in the vocabulary, so a `vocab_size` below ~263
    means no merges at all (a pure byte tokenizer); larger sizes add that many BPE merges learnt from `texts`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=list(ROLE_TOKENS.values()),
        clean_up_tokenization_spaces=False,
        add_bos_token=False,
        add_eos_token=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(
    out_dir: Path,
    tokenizer,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
) -> Path:
    """Save a randomly initialised (seeded, float32) LlamaForCausalLM and `tokenizer` in `out_dir`; returns it.

    head_dim = hidden_size // heads must be one vLLM's CPU backend supports (32, 64, 80, ...).
    The global torch RNG is left as it was.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden_size % heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of heads ({heads})")
    head_dim = hidden_size // heads
    if head_dim not in VLLM_CPU_HEAD_DIMS:
        raise ValueError(
            f"head_dim = hidden_size // heads = {head_dim} is not supported by vLLM on CPU; "
            f"use one of {', '.join(map(str, VLLM_CPU_HEAD_DIMS))}"
        )
    if layers < 1:
        raise ValueError(f"layers must be positive, got {layers}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name) is None:
            raise ValueError(f"the tokenizer has no {name.removesuffix('_id')}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.model_max_length = max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    return out_dir

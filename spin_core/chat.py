"""The ONE place where chat messages become token ids, for generation (vLLM and hf) and training alike.

The official SPIN code generated with one prompt format and trained with another; here the generator feeds the engine
`prompt_token_ids(...)` and the trainer builds its sequences with `encode_pair_side(...)`, which is
`prompt_token_ids(...)` + `answer_token_ids(...)` truncated, so the model is trained on exactly the prompt it answered.

Conventions:
- the prompt is the chat template rendered with `add_generation_prompt=True`, tokenized without the tokenizer's
  automatic special tokens (the template writes BOS). If the template does not write BOS but the tokenizer normally
  prepends one (Llama/Mistral/zephyr style: the SFT model saw BOS first), BOS is prepended once; never twice;
- an answer is its text tokenized without special tokens, followed by EOS (what the model emits to stop);
- prompts are truncated from the left (the end of a prompt, next to the answer, matters most), answers from the right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spin_core.errors import SpinError


class ChatTemplateError(SpinError):
    """The tokenizer cannot turn a conversation into tokens (no template, bad roles, a pair that cannot fit...)."""


def require_chat_template(tokenizer: Any, where: str) -> None:
    """Fail with a message naming `where` (a model folder or URI) if the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"{where}: the tokenizer has no chat template (no 'chat_template' in tokenizer_config.json and no "
            "chat_template.jinja). SPIN renders every prompt with the model's chat template: use the SFT model's "
            "tokenizer, or set tokenizer.chat_template and save it with the model"
        )


def render_prompt(tokenizer: Any, prompt: list[dict[str, str]]) -> str:
    """The prompt as text: the chat template applied with the generation prompt (e.g. '<|assistant|>\\n') at the end."""
    if not getattr(tokenizer, "chat_template", None):
        require_chat_template(tokenizer, getattr(tokenizer, "name_or_path", "") or "tokenizer")
    try:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja errors (raise_exception for unknown roles, missing keys...) surface as many types
        raise ChatTemplateError(f"the chat template cannot render this prompt: {e}") from None
    if not isinstance(text, str):  # some versions return a list when given a batch
        raise ChatTemplateError(f"the chat template rendered a {type(text).__name__}, not a string")
    return text


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer prepends BOS when asked for special tokens (Llama-style tokenizers do)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def prompt_token_ids(tokenizer: Any, prompt: list[dict[str, str]], max_prompt_length: int) -> list[int]:
    """Token ids of `render_prompt(prompt)`, truncated from the left to `max_prompt_length` tokens.

    Generation feeds exactly these ids to the engine, and training puts exactly these ids before each answer.
    """
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be at least 1, got {max_prompt_length}")
    text = render_prompt(tokenizer, prompt)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos) and _adds_bos(tokenizer):
        ids.insert(0, bos)
    return ids[-max_prompt_length:]


def answer_token_ids(tokenizer: Any, answer: str, *, add_eos: bool = True) -> list[int]:
    """Token ids of an answer: its text without special tokens, then EOS (unless add_eos is False)."""
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ChatTemplateError("the tokenizer has no eos token: answers cannot be closed")
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_pair_side(
    tokenizer: Any,
    prompt: list[dict[str, str]],
    answer: str,
    max_prompt_length: int,
    max_length: int,
    *,
    add_eos: bool = True,
) -> tuple[list[int], list[int]]:
    """(prompt_ids, answer_ids) of one side of a training pair, truncated as the trainer uses them.

    The prompt is `prompt_token_ids(prompt, max_prompt_length)` (left-truncated, identical to what generation fed the
    engine); the answer (`answer_token_ids`, EOS included) is then cut from the right so that
    len(prompt_ids) + len(answer_ids) <= max_length. EOS survives only when the whole answer fits.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    prompt_ids = prompt_token_ids(tokenizer, prompt, max_prompt_length)
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ChatTemplateError(
            f"the pair is longer than maxLength ({max_length}): the prompt alone takes {len(prompt_ids)} tokens "
            f"(maxPromptLength {max_prompt_length}), leaving no room for the answer; "
            "make maxPromptLength smaller than maxLength"
        )
    answer_ids = answer_token_ids(tokenizer, answer, add_eos=add_eos)[:room]
    if not answer_ids:
        raise ChatTemplateError("the answer has no tokens (empty answer and no eos)")
    return prompt_ids, answer_ids


def load_tokenizer(model_dir: Path, where: str) -> Any:
    """The tokenizer of a local HF model folder, checked: it has a chat template, an eos token and a pad token.

    A missing pad token is set to eos (the attention mask, not the id, tells padding apart). Padding side is left
    to the caller (left for batched generation, right or manual for training).
    """
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ChatTemplateError(f"{where}: no model folder at {model_dir}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ChatTemplateError(f"{where}: cannot load the tokenizer: {e}") from None
    require_chat_template(tokenizer, where)
    if tokenizer.eos_token_id is None:
        raise ChatTemplateError(f"{where}: the tokenizer has no eos token, so generated answers could not end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

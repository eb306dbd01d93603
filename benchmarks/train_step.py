"""Training step throughput: `spin train` vs TRL's `DPOTrainer`, side by side in one invocation.

Same model (a seeded random Llama built here with `spin_core.tiny`, saved once, loaded by both), same pairs
(identical token ids: spin's `chat.encode_pair_side` writes them for TRL), same batch (per-process micro batch,
gradient accumulation, global batch), same DeepSpeed ZeRO stage, same number of processes (torchrun, gloo on CPU),
fp32, AdamW, gradient clipping 1.0, linear schedule with warm-up, no gradient checkpointing (TRL's DPOConfig turns it
on by default: turned off here, as in spin's spec), max lengths that truncate nothing, the sigmoid loss, beta 0.1.
Each trainer runs one epoch over the pairs: `--warmup-steps` optimizer steps that are not timed, then `--steps` timed.

    .venv/bin/python benchmarks/train_step.py                          # medium (21M params), 12 timed steps, ~6 min
    .venv/bin/python benchmarks/train_step.py --size small --steps 20  # 3.8M params, ~3 min
    .venv/bin/python benchmarks/train_step.py --runs spin,trl          # only the two default modes

Runs, in this order (interleaved, so the slow drift of a shared machine hits both sides alike):
    spin            `spin train`, referenceLogprobs: precompute (the spec's default): one no-grad pass of the
                    opponent over all pairs before training (skipped when the generation job published float32
                    log-probs with the rows; here the rows carry none, so the pass runs and is timed separately),
                    then training with no opponent in memory
    trl             TRL DPOTrainer with its defaults: a frozen reference model, a reference forward every micro batch
    spin-online     `spin train`, referenceLogprobs: online (opponent kept, scored every micro batch)
    trl-precompute  TRL with precompute_ref_log_probs=True
    spin-two-rows   `spin` with training.sharedPrompt: false: each pair as two rows (prompt + real, prompt +
                    generated) of one concatenated forward, as TRL does, instead of one row whose prompt goes
                    through the model once (the spec's default)

spin runs through its real entry point (`python -m torch.distributed.run ... spin train --spec ... --iteration 1`,
via benchmarks/_spin_train.py, which only attaches a stopwatch); TRL through benchmarks/_trl_dpo.py (see there for
the two things it has to set up: pre-tokenised pairs and accelerate's state on a machine without GPUs). Step times
come from a timestamp after every optimizer step on rank 0 (start-up, the first step, the precompute pass and the
final save excluded; the pass is shown separately), plus the CPU time of all ranks per step, which other jobs on the
machine disturb much less than wall time. Peak memory is each rank's max RSS. Checked on every run: the DeepSpeed
engine and ZeRO stage, the number of optimizer steps, and (TRL) that the tokens trained on are exactly the pairs'.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {
    # name: (hidden, layers, heads, intermediate); head dim 32 or 64
    "tiny": (128, 2, 4, 256),
    "small": (256, 4, 4, 768),
    "medium": (512, 6, 8, 1536),
    "large": (512, 8, 8, 1536),
}
RUNS = ("spin", "trl", "spin-online", "trl-precompute", "spin-two-rows")
TEXT = (
    "the a of to and in is it that for on with as was at by be this from or have an they which one you were her all "
    "she there would their we him been has when who will more no if out so said what up its about into than them can "
    "only other new some could time these two may then do first any my now such like our over man me even most made "
    "after also did many before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here between both life being "
    "under never day same another know while last might us great old year off come since against go came right used "
    "take three reverse the word spell in capitals answer with the result only explain why step by step 12 7 19 42"
)
WORDS = TEXT.split()


# ----------------------------------------------------------------------------------------------- the workload
def build_model(root: Path, size: str, vocab: int) -> tuple[Path, int]:
    from transformers import AutoTokenizer

    from spin_core.tiny import build_model, build_tokenizer

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(2000)]
    build_tokenizer(corpus, vocab_size=vocab).save_pretrained(root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    hidden, layers, heads, inter = SIZES[size]
    path = build_model(root / "model", tokenizer, hidden, layers, heads, seed=0, intermediate_size=inter)
    from transformers import AutoModelForCausalLM

    params = AutoModelForCausalLM.from_pretrained(path).num_parameters()
    return path, params


def text_of(rng: random.Random, tokens: int, per_word: float) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, round(tokens / per_word))))


def build_pairs(model_dir: Path, n: int, prompt_range, answer_range, max_prompt: int, max_length: int, seed: int):
    """n rows (prompt, real answer, generated answer: random words with token counts drawn uniformly from the ranges)
    and, for TRL, their token ids exactly as `spin train` builds them."""
    from spin_core import chat
    from spin_core.rows import GeneratedRow

    tokenizer = chat.load_tokenizer(model_dir, str(model_dir))
    probe = random.Random(1)
    sample = [" ".join(probe.choice(WORDS) for _ in range(50)) for _ in range(40)]
    per_word = sum(len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"]) / 2000
    rng = random.Random(seed)
    rows, tokenised = [], []
    for i in range(n):
        prompt = [{"role": "user", "content": text_of(rng, rng.randint(*prompt_range) - 6, per_word)}]
        real = text_of(rng, rng.randint(*answer_range) - 1, per_word)
        generated = text_of(rng, rng.randint(*answer_range) - 1, per_word)
        rows.append(
            GeneratedRow(
                id=f"row-{i:05d}",
                prompt=prompt,
                real=real,
                generated=generated,
                finish_reason="stop",
                prompt_tokens=0,
                generated_tokens=0,
                iteration=1,
                shard=0,
            )
        )
        p, r = chat.encode_pair_side(tokenizer, prompt, real, max_prompt, max_length)
        _, g = chat.encode_pair_side(tokenizer, prompt, generated, max_prompt, max_length)
        tokenised.append({"prompt_ids": p, "chosen_ids": r, "rejected_ids": g})
    return rows, tokenised


def make_spin_run(root: Path, model_dir: Path, rows, args, mode: str, shared_prompt: bool = True) -> Path:
    """A file:// run whose iteration 1 has one published generation shard holding `rows`."""
    import yaml

    from spin_core import layout
    from spin_core.rows import write_rows
    from spin_core.store import Store

    root.mkdir(parents=True)
    spec = {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SpinRun",
        "metadata": {"name": "bench"},
        "spec": {
            "model": {"uri": f"file://{model_dir}"},
            "dataset": {"uri": f"file://{root}/unused.jsonl"},
            "storage": {"uri": f"file://{root}/run"},
            "iterations": 1,
            "generation": {"shards": 1, "backend": "hf"},
            "training": {
                "loss": "sigmoid",
                "beta": args.beta,
                "learningRate": args.lr,
                "optimizer": "adamw",
                "epochs": 1,
                "globalBatchSize": args.global_batch,
                "microBatchSize": args.micro_batch,
                "maxLength": args.max_length,
                "maxPromptLength": args.max_prompt_length,
                "warmupRatio": 0.1,
                "zeroStage": args.zero,
                "referenceLogprobs": mode,
                "sharedPrompt": shared_prompt,
                "processesPerNode": args.procs,
                "gpusPerNode": 0,
                "checkpointEverySteps": 10**9,
                "seed": 42,
            },
        },
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    write_rows(root / "rows.jsonl", rows)
    Store.open(f"file://{root}/run").publish(layout.shard(1, 0, 1), {"rows.jsonl": root / "rows.jsonl"})
    return root / "spec.yaml"


# ----------------------------------------------------------------------------------------------- running
def environment(args, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(args.threads),
        DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        SPIN_CACHE_DIR=str(cache / "spin"),
        TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        SPIN_TERMINATION_LOG=str(cache / "termination"),
    )
    return env


def launch(name: str, script: str, script_args: list[str], env: dict, out: Path, args) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.procs}",
        str(ROOT / "benchmarks" / script),
        *script_args,
    ]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (out / "log.txt").read_text()[-4000:]
        raise SystemExit(f"{name} failed (exit {proc.returncode}); the end of its log:\n{tail}")
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(args.procs)]
    expected = args.warmup_steps + args.steps
    for r in ranks:
        if len(r["stamps"]) != expected:
            raise SystemExit(f"{name}: rank {r['rank']} timed {len(r['stamps'])} optimizer steps, expected {expected}")
    first = args.warmup_steps - 1  # the timed window: from the end of the last untimed step to the end of the last
    stamps = ranks[0]["stamps"]
    intervals = [b - a for a, b in zip(stamps[first:-1], stamps[first + 1 :], strict=True)]
    seconds = stamps[-1] - stamps[first]
    # CPU seconds of the timed steps, all ranks together: what the step costs in work, whatever else shares the CPU
    cpu = sum(r["cpu"][-1] - r["cpu"][first] for r in ranks) / args.steps
    return {
        "name": name,
        "steps": args.steps,
        "seconds": seconds,
        "steps_per_s": args.steps / seconds,
        "pairs_per_s": args.steps * args.global_batch / seconds,
        "median_step_s": statistics.median(intervals),
        "cpu_s_per_step": cpu,
        "step_s": intervals,
        "to_first_step_s": ranks[0]["stamps"][0] - ranks[0]["started"],
        "precompute_s": ranks[0].get("precompute_s"),
        "wall_s": wall,
        "maxrss_mib": [r["maxrss_kib"] / 1024 for r in ranks],
        "engine": ranks[0].get("engine"),
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "ranks": ranks,
    }


def run_spin(name: str, mode: str, root: Path, model_dir: Path, rows, args, env) -> dict:
    from spin_core import layout
    from spin_core.store import Store

    shared = name != "spin-two-rows"
    spec = make_spin_run(root / "spin-run", model_dir, rows, args, mode, shared_prompt=shared)
    result = launch(
        name, "_spin_train.py", [], {**env, "SPIN_BENCH_OUT": str(root), "SPIN_BENCH_SPEC": str(spec)}, root, args
    )
    metrics = Store.open(f"file://{root}/spin-run/run").read_json(layout.metrics(1))
    result["mode"] = f"referenceLogprobs: {mode}" + ("" if shared else ", sharedPrompt: false")
    result["loss"] = f"loss at step 1 {metrics['steps'][0]['loss']:.4f}"
    result["trained_steps"] = len(metrics["steps"])
    return result


def run_trl(name: str, precompute: bool, root: Path, model_dir: Path, data: Path, args, env) -> dict:
    script_args = [
        "--model", str(model_dir),
        "--data", str(data),
        "--out", str(root),
        "--micro-batch", str(args.micro_batch),
        "--global-batch", str(args.global_batch),
        "--steps", str(args.warmup_steps + args.steps),
        "--lr", str(args.lr),
        "--beta", str(args.beta),
        "--max-length", str(args.max_length),
        "--warmup-ratio", "0.1",
        "--zero", str(args.zero),
    ]  # fmt: skip
    if precompute:
        script_args.append("--precompute")
    result = launch(name, "_trl_dpo.py", script_args, env, root, args)
    result["mode"] = "precompute_ref_log_probs=True" if precompute else "reference forward per step (default)"
    losses = result["ranks"][0]["losses"]
    result["loss"] = f"logged loss (mean of steps 1-10) {losses[0]:.4f}" if losses else "no loss logged"
    result["tokens"] = result["ranks"][0]["tokens"]
    return result


# ----------------------------------------------------------------------------------------------- report
def table(results: list[dict], args) -> str:
    base = next((r for r in results if r["name"] == "trl"), None)
    header = (
        "run",
        "reference log-probs",
        "steps/s",
        "pairs/s",
        "vs trl",
        "CPU s/step",
        "vs trl (CPU)",
        "ref pass s",
        "pairs/s incl. pass",
        "peak RSS MiB/rank",
    )
    rows = []
    for r in results:
        pre = r["precompute_s"]
        rows.append(
            (
                r["name"],
                r["mode"],
                f"{r['steps_per_s']:.3f}",
                f"{r['pairs_per_s']:.2f}",
                f"{r['steps_per_s'] / base['steps_per_s']:.2f}x" if base else "-",
                f"{r['cpu_s_per_step']:.2f}",
                f"{base['cpu_s_per_step'] / r['cpu_s_per_step']:.2f}x" if base else "-",
                f"{pre:.1f}" if pre else "-",
                f"{with_pass(r, args):.2f}" + (f" ({with_pass(r, args) / base['pairs_per_s']:.2f}x)" if base else ""),
                " / ".join(f"{m:.0f}" for m in r["maxrss_mib"]),
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join([line, rule, *body])


def with_pass(r: dict, args) -> float:
    """pairs/s of the timed steps with the precompute pass's share for the timed pairs added (one epoch)."""
    share = (r["precompute_s"] or 0.0) * args.steps / (args.steps + args.warmup_steps)
    return args.steps * args.global_batch / (r["seconds"] + share)


def padding(tokenised: list[dict], args) -> dict[str, float]:
    """Share of padding in the micro batches: spin's actual ones (its seeded order), a random order (TRL's batches
    are another random draw of the same pairs) and length-grouped micro batches (neither trainer does this)."""
    from spin_core.train import epoch_steps, rank_micro_batches

    def waste(batches: list[list[int]]) -> float:
        real = padded = 0
        for b in batches:
            lengths = [
                len(tokenised[i]["prompt_ids"]) + len(tokenised[i][k])
                for i in b
                for k in ("chosen_ids", "rejected_ids")
            ]
            real += sum(lengths)
            padded += max(lengths) * len(lengths)
        return 1 - real / padded

    n, g, m = len(tokenised), args.global_batch, args.micro_batch
    spin = [
        micro
        for step in epoch_steps(n, g, 0, 42)
        for rank in range(args.procs)
        for micro in rank_micro_batches(step, rank, args.procs, m)
    ]
    rng = random.Random(0)
    shuffled = []
    for _ in range(50):
        order = list(range(n))
        rng.shuffle(order)
        shuffled.append(waste([order[i : i + m] for i in range(0, n, m)]))

    def longest(i: int) -> int:
        t = tokenised[i]
        return len(t["prompt_ids"]) + max(len(t["chosen_ids"]), len(t["rejected_ids"]))

    # group by length within each global batch (same pairs per optimizer step, only the micro batches change)
    grouped = [sorted(step, key=longest)[i : i + m] for step in epoch_steps(n, g, 0, 42) for i in range(0, g, m)]
    return {"spin": waste(spin), "random": statistics.mean(shuffled), "grouped": waste(grouped)}


def findings(results: list[dict], pad: dict[str, float], args) -> list[str]:
    by = {r["name"]: r for r in results}
    out = []

    def ratio(a: str, b: str) -> str:
        x, y = by[a], by[b]
        return f"{x['steps_per_s'] / y['steps_per_s']:.2f}x wall, {y['cpu_s_per_step'] / x['cpu_s_per_step']:.2f}x CPU"

    if {"spin", "spin-online"} <= by.keys():
        out.append(
            f"- The reference forward: spin (precompute) vs spin-online {ratio('spin', 'spin-online')}. This is the "
            "main lever, and not one of spin's own: TRL has it too (precompute_ref_log_probs)."
        )
    if {"trl-precompute", "trl"} <= by.keys():
        out.append(f"- TRL's own precompute: trl-precompute vs trl {ratio('trl-precompute', 'trl')}.")
    if {"spin-online", "trl"} <= by.keys():
        out.append(
            f"- The loop, with the same work per step (a reference forward per micro batch in both): spin-online vs "
            f"trl {ratio('spin-online', 'trl')}. Per micro batch TRL's step also runs 15 metric all-gathers, each "
            "followed by a host sync, asks its fused LM head for entropy, mean logits and top-1 hits, and goes "
            "through the Trainer/accelerate machinery (not measured one by one); spin sums its metrics locally and "
            "all-reduces them once per optimizer step. This share shrinks as the model grows (the step is matmuls)."
        )
    if {"spin", "trl-precompute"} <= by.keys():
        out.append(f"- Both precomputing: spin vs trl-precompute {ratio('spin', 'trl-precompute')}.")
    if {"spin", "spin-two-rows"} <= by.keys():
        out.append(
            f"- The shared prompt: spin (prompt, real and generated answer in one row, a 4D attention mask keeping "
            f"the answers apart) vs spin-two-rows (two rows per pair, as TRL) {ratio('spin', 'spin-two-rows')}. "
            "Each prompt token goes through the model once instead of twice; the log-probs are the same."
        )
    out.append(
        "- Not differences: both run a pair's two answers in one forward, and both pad each micro batch only to its "
        "own longest sequence (TRL's collator does the same)."
    )
    passes = [(r["name"], r["precompute_s"]) for r in results if r["precompute_s"]]
    if passes:
        n = (args.steps + args.warmup_steps) * args.global_batch
        listed = ", ".join(f"{name} {sec:.1f} s" for name, sec in passes)
        line = f"- The precompute pass over all {n} pairs took {listed}."
        if {"spin", "trl"} <= by.keys():
            line += (
                f" Counted into one epoch (column 'incl. pass'), spin is {with_pass(by['spin'], args):.2f} pairs/s, "
                f"{with_pass(by['spin'], args) / by['trl']['pairs_per_s']:.2f}x TRL's default."
            )
        out.append(
            line + " The pass pays across epochs (spin's default is 2 epochs per pass), and costs the trainer nothing "
            "when the generation job publishes float32 opponent log-probs with the rows (generation.opponentLogprobs, "
            "on by default with precompute and float32 generation): then spin skips the pass and the step times "
            "above are the whole cost."
        )
    out.append(
        f"- Padding: {pad['spin'] * 100:.0f}% of the tokens in spin's micro batches are padding "
        f"({pad['random'] * 100:.0f}% expected for any random order, TRL's included); grouping each step's pairs by "
        f"length would cut it to {pad['grouped'] * 100:.0f}% (neither trainer does; measured for two-row batches)."
    )
    return out


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--size", choices=SIZES, default="medium", help="tiny 0.5M, small 3.8M, medium 21M, large 28M params"
    )
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size")
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=1, help="optimizer steps before timing starts (>= 1)")
    p.add_argument("--micro-batch", type=int, default=2, help="pairs per forward per process")
    p.add_argument("--global-batch", type=int, default=8, help="pairs per optimizer step, all processes")
    p.add_argument("--procs", type=int, default=2, help="processes (torchrun --nproc-per-node)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process")
    p.add_argument("--zero", type=int, choices=(0, 2, 3), default=2, help="DeepSpeed ZeRO stage (measured: 2)")
    p.add_argument("--prompt-tokens", type=parse_range, default=(20, 60), help="prompt length range (tokens)")
    p.add_argument("--answer-tokens", type=parse_range, default=(30, 120), help="answer length range (tokens)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument(
        "--keep", type=Path, help="work folder to keep (logs, specs, per-rank timings); else a temporary one"
    )
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(runs) - set(RUNS)
    if unknown:
        p.error(f"unknown runs {sorted(unknown)}: choose from {', '.join(RUNS)}")
    if args.warmup_steps < 1 or args.steps < 1:
        p.error("--warmup-steps and --steps must be at least 1")
    if args.global_batch % (args.micro_batch * args.procs):
        p.error("--global-batch must be a multiple of --micro-batch x --procs")

    started = time.perf_counter()
    work = args.keep or Path(tempfile.mkdtemp(prefix="spin-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run_all(args, runs, work, started)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def run_all(args, runs: list[str], work: Path, started: float) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model_dir, params = build_model(work / "build", args.size, args.vocab)
    n_pairs = (args.warmup_steps + args.steps) * args.global_batch
    rows, tokenised = build_pairs(
        model_dir, n_pairs, args.prompt_tokens, args.answer_tokens, args.max_prompt_length, args.max_length, seed=0
    )
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(t) + "\n" for t in tokenised))
    prompt_len = statistics.mean(len(t["prompt_ids"]) for t in tokenised)
    answer_len = statistics.mean(len(t[k]) for t in tokenised for k in ("chosen_ids", "rejected_ids"))
    total_tokens = sum(2 * len(t["prompt_ids"]) + len(t["chosen_ids"]) + len(t["rejected_ids"]) for t in tokenised)
    hidden, layers, heads, inter = SIZES[args.size]
    accumulation = args.global_batch // (args.micro_batch * args.procs)
    print(
        f"model {args.size}: {params / 1e6:.1f}M params (hidden {hidden}, {layers} layers, {heads} heads, "
        f"intermediate {inter}, vocab {args.vocab}); {n_pairs} pairs (mean prompt {prompt_len:.0f} tokens, "
        f"mean answer {answer_len:.0f}); {args.procs} processes x micro batch {args.micro_batch} x accumulation "
        f"{accumulation} = global batch {args.global_batch}; ZeRO-{args.zero}, fp32, gloo, "
        f"OMP_NUM_THREADS={args.threads}; {args.warmup_steps} untimed + {args.steps} timed steps (one epoch)",
        flush=True,
    )
    env = environment(args, work / "cache")
    results = []
    for name in runs:
        print(f"running {name} ...", end=" ", flush=True)
        root = work / name
        if name.startswith("spin"):
            mode = "online" if name == "spin-online" else "precompute"
            result = run_spin(name, mode, root, model_dir, rows, args, env)
            if result["trained_steps"] != args.warmup_steps + args.steps:
                raise SystemExit(f"{name} trained {result['trained_steps']} steps")
        else:
            result = run_trl(name, name == "trl-precompute", root, model_dir, data, args, env)
            if result["tokens"] != total_tokens:
                raise SystemExit(f"{name} counted {result['tokens']} tokens, the pairs hold {total_tokens}")
        if f"ZeRO-{args.zero}," not in (result["engine"] or ""):
            raise SystemExit(f"{name} did not train with DeepSpeed ZeRO-{args.zero}: {result['engine']}")
        results.append(result)
        print(
            f"{result['steps_per_s']:.3f} steps/s; {result['engine']}; {result['loss']}; load "
            f"{result['load_before']:.1f}->{result['load_after']:.1f}, {result['wall_s']:.0f} s",
            flush=True,
        )

    pad = padding(tokenised, args)
    print()
    print(table(results, args))
    print()
    print(
        "steps/s, pairs/s: the timed optimizer steps on rank 0's wall clock (start-up, the first step, the precompute "
        "pass and the final save excluded); 'vs trl': ratio to TRL's default. CPU s/step: CPU time of all ranks per "
        "timed step (robust to other jobs sharing the machine). 'incl. pass': pairs/s with the precompute pass's "
        "share for the timed pairs added (one epoch). Peak RSS: max resident set size of each rank."
    )
    for line in findings(results, pad, args):
        print(line)
    loads = [r["load_before"] for r in results] + [r["load_after"] for r in results]
    print(
        f"load average during the runs {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs; "
        f"total wall time {time.perf_counter() - started:.0f} s"
        + (f"; logs and timings in {work}" if args.keep else "")
    )
    if args.json:
        summary = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "params": params,
            "pairs": n_pairs,
            "mean_prompt_tokens": prompt_len,
            "mean_answer_tokens": answer_len,
            "padding": pad,
            "results": [{k: v for k, v in r.items() if k != "ranks"} for r in results],
        }
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

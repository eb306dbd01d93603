"""Does SPIN make a weak model stronger? SPIN (and its regularised variants) against continued SFT, at equal steps.

    .venv/bin/python benchmarks/weak_to_strong.py                       # every arm, both starts, 3 seeds
    .venv/bin/python benchmarks/weak_to_strong.py --seeds 0 --arms spin,sft --starts weak   # one quick cell
    .venv/bin/python benchmarks/weak_to_strong.py --variant 'nll-b05={"sftWeight": 1, "beta": 0.5}'   # one more arm

benchmarks/README.md has the measured tables and the commands behind each (a plateau with headroom: `--digits 3
--hidden 64 --layers 1 --train 3000`; more iterations from the same starts: `--starts-from`).

The task is the demo's (addition in chat format, two-digit addends unless `--digits`, exact-match scorer
`spin_core.demo:score`). Per seed:
1. data: `--train` SFT rows and `--heldout` held-out rows (no prompt in both), written as JSONL;
2. two starting models, both the demo's tiny Llama (`spin_core.tiny`) after plain SFT (`spin_core.demo.sft`):
   `weak` after `--weak-steps` steps, and `plateau` after `--plateau-steps` steps (continued from `weak`);
3. from each start, every arm for the same number of optimizer steps at the same global batch:
   - the SPIN arms run as real SpinRuns through `spin run` (generation, DeepSpeed training with
     `--processes` processes, evaluation after every iteration): `spin` is the paper's loss, `spin+nll`,
     `mixture` and `kl` the opt-in regularisers (training.sftWeight, opponent: mixture, klToBase);
   - `sft` is the paper's baseline: continued SFT on the same rows, in blocks of exactly as many optimizer steps
     as the SPIN run's iterations took (read from its `metrics.json`).

Every SPIN number comes from the run's published evaluation artefacts (`iter-<t>/eval.json`: held-out greedy
exact match under the scorer, `baseline_score` for the start, and the held-out log p(real answer)); the SFT arm is
scored with the same evaluation functions (`spin_core.evaluate.greedy_answers`, `task_score`, the engine's
`score`) on the same held-out rows. Nothing here can only say yes: the table prints what it measures, including
the identical-pair share and the log p(real) trajectory that show *why* an arm falls.

Everything lands under `--out` (default `.cache/bench/weak_to_strong`); `results.json` there holds every number.
A finished cell is not recomputed (delete `--out` to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The opt-in variants of issue 9, as training-field overrides; "spin" is the paper's method.
ARMS: dict[str, dict[str, Any]] = {
    "spin": {},
    "spin+nll": {"sftWeight": 1.0},
    "mixture": {"opponent": "mixture", "opponentMixture": {"alpha": 0.5, "history": 2}},
    "kl": {"klToBase": 0.5},
}
ALL_ARMS = ["sft", *ARMS]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("SPIN_CACHE_DIR", str(ROOT / ".cache" / "spin"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return env


# -- starting models ------------------------------------------------------------------------------------------------
def prepare_seed(args: argparse.Namespace, seed: int, where: Path) -> dict[str, Any]:
    """Data and the two starting models of one seed (cached in `where`)."""
    from spin_core import demo
    from spin_core.tiny import build_model, build_tokenizer

    done = where / "starts.json"
    if done.exists():
        return json.loads(done.read_text())
    where.mkdir(parents=True, exist_ok=True)
    if args.starts_from is not None:  # another --out's data and starting models, reused as they are
        source = args.starts_from / where.name
        if not (source / "starts.json").exists():
            raise SystemExit(f"--starts-from: {source / 'starts.json'} does not exist (run that --out first)")
        for f in ("train.jsonl", "heldout.jsonl", "starts.json"):
            shutil.copy(source / f, where / f)
        return json.loads(done.read_text())
    heldout = demo.make_rows(args.heldout, seed + 1000, digits=args.digits)
    train = demo.make_rows(args.train, seed, exclude={r["messages"][0]["content"] for r in heldout}, digits=args.digits)
    demo.write_jsonl(where / "train.jsonl", train)
    demo.write_jsonl(where / "heldout.jsonl", heldout)
    tokenizer = build_tokenizer(demo.corpus(train + heldout), vocab_size=64)
    weak, plateau = where / "start-weak", where / "start-plateau"
    for d in (weak, plateau):
        shutil.rmtree(d, ignore_errors=True)
    build_model(weak, tokenizer, hidden_size=args.hidden, layers=args.layers, heads=args.hidden // 32, seed=seed)
    demo.sft(weak, train, steps=args.weak_steps, lr=args.sft_lr, batch_size=args.batch, seed=seed)
    if "plateau" in args.starts:  # only when asked: it is most of the preparation's time
        shutil.copytree(weak, plateau)
        demo.sft(
            plateau, train, steps=args.plateau_steps - args.weak_steps, lr=args.sft_lr, batch_size=args.batch, seed=seed
        )
    info = {"weak": str(weak), "plateau": str(plateau), "train": len(train), "heldout": len(heldout)}
    info["accuracy"] = {k: demo.accuracy(Path(info[k]), heldout) for k in ("weak", "plateau") if Path(info[k]).exists()}
    done.write_text(json.dumps(info, indent=1))
    return info


# -- the SPIN arms: real SpinRuns -----------------------------------------------------------------------------------
def spinrun(args: argparse.Namespace, name: str, model: str, data: Path, store: Path, arm: str) -> dict[str, Any]:
    return {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SpinRun",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": f"file://{model}"},
            "dataset": {"uri": f"file://{data / 'train.jsonl'}", "format": "messages"},
            "storage": {"uri": f"file://{store}"},
            "iterations": args.iterations,
            "generation": {
                "backend": args.backend,
                "shards": 1,
                "temperature": args.temperature,
                "maxNewTokens": 8,
                "gpusPerShard": 0,
                "seed": args.seed_offset,
            },
            "training": {
                "beta": args.beta,
                "learningRate": args.spin_lr,
                "optimizer": "rmsprop",
                "epochs": 1,
                "globalBatchSize": args.batch,
                "microBatchSize": args.batch // args.processes,
                "maxLength": 64,
                "maxPromptLength": 48,
                "zeroStage": 2,
                "nodes": 1,
                "processesPerNode": args.processes,
                "gpusPerNode": 0,
                **args.spin_arms[arm],
            },
            "evaluation": {
                "dataset": {"uri": f"file://{data / 'heldout.jsonl'}"},
                "maxSamples": args.heldout,
                "scorer": "spin_core.demo:score",
                "metric": "score",
                "backend": "hf",
            },
        },
    }


def run_spin_arm(args: argparse.Namespace, seed: int, start: str, arm: str, data: Path, model: str) -> dict[str, Any]:
    """One SpinRun through `spin run`; its numbers read back from the published eval.json and metrics.json."""
    from spin_core import layout
    from spin_core.resource import dump_yaml
    from spin_core.store import Store

    cell = data / start / arm
    cell.mkdir(parents=True, exist_ok=True)
    name = f"w2s-{start}-{arm.replace('+', '-')}-{seed}"
    store_dir = cell / "run"
    spec_file = cell / "spinrun.yaml"
    spec_file.write_text(dump_yaml(spinrun(args, name, model, data, store_dir, arm)))
    started = time.monotonic()
    log = cell / "spin-run.log"
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "spin_core", "run", str(spec_file), "--json"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment(),
            cwd=ROOT,
            check=False,
        )
    if proc.returncode != 0:
        raise SystemExit(f"spin run failed for {name} (exit {proc.returncode}); see {log}")
    store = Store.open(f"file://{store_dir}")
    evals = [store.read_json(layout.evaluation(t)) for t in range(1, args.iterations + 1)]
    metrics = [store.read_json(layout.metrics(t)) for t in range(1, args.iterations + 1)]
    steps_per_iteration = [m["final"]["steps"] for m in metrics]  # optimizer steps of each iteration
    return {
        "score": [evals[0]["baseline_score"], *[e["score"] for e in evals]],
        "heldout_logp_real": [None, *[e["logps/real"] for e in evals]],
        "heldout_margin": [None, *[e["rewards/margins"] for e in evals]],
        "train_logp_real_first_last": [
            (m["steps"][0]["logps/real"], m["steps"][-1]["logps/real"]) if m["steps"] else None for m in metrics
        ],
        "identical_share": [m["final"].get("pairs/identical_share") for m in metrics],
        "steps": steps_per_iteration,
        "warnings": [w for m in metrics for w in m.get("warnings", [])],
        "seconds": round(time.monotonic() - started, 1),
    }


# -- the baseline: continued SFT ------------------------------------------------------------------------------------
def heldout_eval(model_dir: Path, heldout: Path, n: int) -> tuple[float, float]:
    """Score and mean log p(real answer) on the held-out rows, with the evaluation step's own functions."""
    from spin_core.chat import encode_pair_side, load_tokenizer
    from spin_core.data import load_examples
    from spin_core.engines import open_engine
    from spin_core.evaluate import greedy_answers, task_score
    from spin_core.spec import Dataset

    examples = load_examples(heldout, Dataset(uri=f"file://{heldout}")).examples[:n]
    tokenizer = load_tokenizer(model_dir, str(model_dir))
    engine = open_engine("hf", model_dir, dtype="float32", batch_size=64)
    try:
        score = task_score("spin_core.demo:score", examples, greedy_answers(engine, tokenizer, examples, 48, 8))
        real = engine.score([encode_pair_side(tokenizer, e.prompt, e.real, 48, 64) for e in examples])
    finally:
        engine.close()
    return score, sum(real) / len(real)


def run_sft_arm(
    args: argparse.Namespace, seed: int, start: str, arm: str, data: Path, model: str, blocks: list[int]
) -> dict[str, Any]:
    from spin_core import demo

    lr = args.sft_arms[arm].get("learningRate", args.continue_lr)
    cell = data / start / arm
    shutil.rmtree(cell, ignore_errors=True)
    cell.mkdir(parents=True)
    work = cell / "model"
    shutil.copytree(model, work)
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    started = time.monotonic()
    score0, logp0 = heldout_eval(work, data / "heldout.jsonl", args.heldout)
    scores, logps = [score0], [logp0]
    for i, steps in enumerate(blocks):
        demo.sft(work, rows, steps=steps, lr=lr, batch_size=args.batch, seed=seed * 100 + i)
        score, logp = heldout_eval(work, data / "heldout.jsonl", args.heldout)
        scores.append(score)
        logps.append(logp)
    return {
        "score": scores,
        "heldout_logp_real": logps,
        "steps": blocks,
        "learningRate": lr,
        "seconds": round(time.monotonic() - started, 1),
    }


def expected_blocks(args: argparse.Namespace) -> list[int]:
    """Optimizer steps of each SPIN iteration: one epoch over this iteration's pairs plus the mixed-in previous's."""
    return [-(-args.train * min(t, 2) // args.batch) for t in range(1, args.iterations + 1)]


# -- the table ------------------------------------------------------------------------------------------------------
def spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def table(results: dict[str, Any], args: argparse.Namespace) -> str:
    its = args.iterations
    lines = []
    for start in args.starts:
        lines.append(f"\n### start: {start} (held-out exact match %, mean ± stdev over seeds {args.seeds})\n")
        header = ["arm", "start", *[f"iter {t}" for t in range(1, its + 1)], "final − start", "final − sft (paired)"]
        header.append("log p(real) held-out")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for arm in args.arms:
            seeds = [s for s in args.seeds if arm in results.get(str(s), {}).get(start, {})]
            cells = [results[str(s)][start][arm] for s in seeds]
            if not cells:
                continue
            row = [arm, spread([c["score"][0] for c in cells])]
            row += [spread([c["score"][t] for c in cells]) for t in range(1, its + 1)]
            row.append(spread([c["score"][-1] - c["score"][0] for c in cells]))
            # The same seed's continued-SFT arm: the seeds' starts differ more than the arms do.
            sft = [results[str(s)][start].get("sft") for s in seeds]
            row.append(spread([c["score"][-1] - b["score"][-1] for c, b in zip(cells, sft, strict=True) if b]))
            traj = [statistics.fmean(c["heldout_logp_real"][t] for c in cells) for t in range(1, its + 1)]
            # eval.json holds the new model's log p(real) only: the start's comes from the SFT arm's first scoring.
            first = [
                c["heldout_logp_real"][0]
                if c["heldout_logp_real"][0] is not None
                else results[str(s)][start].get("sft", {}).get("heldout_logp_real", [None])[0]
                for s, c in zip(seeds, cells, strict=True)
            ]
            first = [v for v in first if v is not None]
            row.append(" → ".join(([f"{statistics.fmean(first):.2f}"] if first else []) + [f"{v:.2f}" for v in traj]))
            lines.append("| " + " | ".join(row) + " |")
        extra = []
        for arm in args.arms:
            cells = [results[str(s)][start][arm] for s in args.seeds if arm in results.get(str(s), {}).get(start, {})]
            shares = [x for c in cells for x in c.get("identical_share", []) if x is not None]
            if shares:
                warned = sum(bool(c.get("warnings")) for c in cells)
                extra.append(
                    f"{arm}: identical pairs {100 * statistics.fmean(shares):.0f} % of pairs; "
                    f"collapse warning in {warned}/{len(cells)} seeds"
                )
        if extra:
            lines.append("\n" + "; ".join(extra))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 3 for a spread)")
    p.add_argument("--starts", default="weak,plateau")
    p.add_argument("--arms", help=f"comma-separated, of {', '.join(ALL_ARMS)} and the --variant names (default: all)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="one more arm: NAME (lowercase letters, digits, '-') = training-field overrides of a SPIN arm, e.g. "
        "'nll-b05={\"sftWeight\": 1, \"beta\": 0.5}'; a NAME starting with 'sft' is a continued-SFT arm whose JSON "
        "may set its learningRate, e.g. 'sft-3e-4={\"learningRate\": 3e-4}'",
    )
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--train", type=int, default=1000, help="SFT rows (SPIN generates for each)")
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--digits", type=int, default=2, help="digits of each addend (the demo's task: 2)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (a multiple of 32: head dim 32)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--weak-steps", type=int, default=400, help="SFT steps of the weak start")
    p.add_argument("--plateau-steps", type=int, default=2400, help="SFT steps of the plateau start (in all)")
    p.add_argument("--sft-lr", type=float, default=1e-3, help="learning rate of the SFT that makes the starts")
    p.add_argument("--continue-lr", type=float, default=1e-4, help="learning rate of the continued-SFT arm")
    p.add_argument("--spin-lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=32, help="global batch of every arm")
    p.add_argument("--processes", type=int, default=2, help="training processes of the SPIN runs (torchrun)")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="generation backend of the SPIN runs")
    p.add_argument("--seed-offset", type=int, default=0, help="generation seed")
    p.add_argument(
        "--starts-from",
        type=Path,
        help="reuse the data and starting models of this earlier --out (e.g. to run more iterations from them)",
    )
    p.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench" / "weak_to_strong")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.starts = args.starts.split(",")
    args.spin_arms, args.sft_arms = dict(ARMS), {"sft": {}}
    for item in args.variant:
        name, _, overrides = item.partition("=")
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name) or name in ALL_ARMS:
            p.error(f"--variant {item!r}: NAME must be new, lowercase letters, digits and '-'")
        try:
            fields = json.loads(overrides)
        except ValueError as e:
            p.error(f"--variant {item!r}: the JSON after '=' does not parse: {e}")
        if not isinstance(fields, dict):
            p.error(f"--variant {item!r}: the JSON after '=' must be an object")
        (args.sft_arms if name.startswith("sft") else args.spin_arms)[name] = fields
    known = [*args.sft_arms, *args.spin_arms]
    args.arms = args.arms.split(",") if args.arms else known
    unknown = set(args.arms) - set(known)
    if unknown or not set(args.starts) <= {"weak", "plateau"}:
        p.error(f"unknown arm/start: {sorted(unknown) or args.starts}")
    os.environ.update(environment())
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results: dict[str, Any] = json.loads(results_file.read_text()) if results_file.exists() else {}
    began = time.monotonic()
    for seed in args.seeds:
        data = args.out / f"seed-{seed}"
        starts = prepare_seed(args, seed, data)
        for start in args.starts:
            cells = results.setdefault(str(seed), {}).setdefault(start, {})
            spin_first = [a for a in args.arms if a in args.spin_arms] + [a for a in args.arms if a in args.sft_arms]
            for arm in spin_first:
                if arm in cells:
                    continue
                t0 = time.monotonic()
                if arm in args.sft_arms:
                    spin_cells = [c for c in cells.values() if "identical_share" in c]  # SPIN cells only
                    blocks = spin_cells[0]["steps"] if spin_cells else expected_blocks(args)
                    cells[arm] = run_sft_arm(args, seed, start, arm, data, starts[start], blocks)
                else:
                    cells[arm] = run_spin_arm(args, seed, start, arm, data, starts[start])
                results_file.write_text(json.dumps(results, indent=1))
                score = " → ".join(f"{100 * s:.1f}" for s in cells[arm]["score"])
                print(f"seed {seed} start {start} {arm}: {score} % ({time.monotonic() - t0:.0f} s)", flush=True)
    print(table(results, args))
    print(f"\n{time.monotonic() - began:.0f} s; every number in {results_file}")


if __name__ == "__main__":
    main()

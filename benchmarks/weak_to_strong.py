"""Does SPIN make a model stronger than continued SFT does? SPIN arms against continued SFT through the same trainer.

    .venv/bin/python benchmarks/weak_to_strong.py --out .cache/bench/w2s-add            # addition, weak start
    .venv/bin/python benchmarks/weak_to_strong.py --seeds 0 --lrs 1e-4 --heldout 200    # one quick cell per arm
    .venv/bin/python benchmarks/weak_to_strong.py --table-only --out .cache/bench/w2s-add   # the table again

benchmarks/README.md has the measured tables and the exact command behind each.

What makes the comparison fair (issue 18):
- **Same trainer, optimizer and data for every arm.** Every arm is a SpinRun through spin's own steps (generation,
  `spin train`, evaluation) with the same RMSprop, warm-up, linear decay, clipping, batch, epochs, truncation and
  data order; the arms differ only in `training` fields. Continued SFT is `objective: sft`: the real answer's NLL
  alone, on the same pairs the SPIN arms see (the generated answers are made and ignored).
- **A pure-NLL control beside every SPIN arm**: the arm's own fields minus the SPIN term (objective sft; klToBase
  kept). For `spin` and `spin+nll` that is `sft` itself (`spin+nll` is exactly `sft` plus the SPIN term).
- **The same truncation everywhere**: the starting models are SFT-trained (`spin_core.demo.sft`) with the SpinRun's
  maxPromptLength / maxLength, and the script refuses data that either would cut.
- **The same tuning budget**: every arm runs every learning rate of `--lrs`; each arm's rate is chosen on a
  validation split (mean over seeds of the final iteration's validation score), never on the reported held-out.
- **Paired, resolved differences**: per seed, the arm's final held-out score minus its control's (same data, same
  start, same held-out prompts), with a 95 % t-interval over seeds; the table also prints the mean held-out paired
  standard error of one seed's difference (prompt sampling alone).

Two tasks (`--task`): the demo's addition (`--digits` per addend) and string reversal (`--digits` letters), both
exact match (`spin_core.demo:score`). Starts (`--starts`): named SFT budgets, `weak=600` (AdamW at `--sft-lr` for
600 steps: under-trained), or `plateau=500:plateau` (then SFT until more of it no longer helps on validation:
`sft_to_plateau`, the paper's setting of an SFT model that further SFT on the same data does not improve). Per
seed: the data (train, validation and held-out, disjoint), the model's initialisation and the SFT order change; the
SpinRuns' own seeds stay fixed.

Steps run in this process by default (`InProcessRunner`: the local runner's loop and the same job entry points,
without a process start per step, which would be most of the time at this size); `--subprocess` runs `spin run`.
Every cell (seed, start, arm, learning rate) is cached in its folder under `--out`; several invocations with
disjoint `--seeds` may share an `--out` and run in parallel. `results.json` there holds every number.
"""

from __future__ import annotations

import argparse
import json
import math
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

# Arms: training-field overrides. "sft" is continued SFT through spin train; "spin" the paper's method.
ARMS: dict[str, dict[str, Any]] = {
    "sft": {"objective": "sft"},
    "spin": {},
    "spin+nll": {"sftWeight": 1.0},
}
# Fields that only shape the SPIN term: a SPIN arm's pure-NLL control drops them.
SPIN_ONLY = ("loss", "beta", "sftWeight", "opponent", "opponentMixture", "objective")
MAX_PROMPT_LENGTH, MAX_LENGTH, MAX_NEW_TOKENS = 48, 64, 8
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def control_of(fields: dict[str, Any]) -> dict[str, Any]:
    """The pure-NLL control of a SPIN arm: its fields without the SPIN term's, objective sft."""
    return {**{k: v for k, v in fields.items() if k not in SPIN_ONLY}, "objective": "sft"}


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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- data and starting models ---------------------------------------------------------------------------------------
def check_truncation(tokenizer, rows: list[dict[str, Any]]) -> None:
    """Refuse data that the SpinRun's maxPromptLength / maxLength or maxNewTokens would cut: every arm and the
    starting SFT must see whole prompts and answers."""
    from spin_core.chat import answer_token_ids, prompt_token_ids

    for r in rows:
        prompt = prompt_token_ids(tokenizer, r["messages"][:1], 10**6)
        answer = answer_token_ids(tokenizer, r["messages"][1]["content"])
        if len(prompt) > MAX_PROMPT_LENGTH or len(prompt) + len(answer) > MAX_LENGTH or len(answer) > MAX_NEW_TOKENS:
            raise SystemExit(
                f"row {r['prompt_id']} has a {len(prompt)}-token prompt and a {len(answer)}-token answer: the "
                f"SpinRun would cut it (maxPromptLength {MAX_PROMPT_LENGTH}, maxLength {MAX_LENGTH}, maxNewTokens "
                f"{MAX_NEW_TOKENS})"
            )


def prepare_seed(args: argparse.Namespace, seed: int, where: Path) -> dict[str, Any]:
    """Data (train, validation, held-out) and the starting models of one seed (cached in `where`)."""
    from spin_core import demo
    from spin_core.tiny import build_model, build_tokenizer

    done = where / "starts.json"
    info = json.loads(done.read_text()) if done.exists() else None
    if info is None:
        where.mkdir(parents=True, exist_ok=True)
        kw = {"digits": args.digits, "task": args.task}
        heldout = demo.make_rows(args.heldout, seed + 1000, **kw)
        validation = demo.make_rows(args.validation, seed + 2000, exclude=prompts(heldout), **kw)
        train = demo.make_rows(args.train, seed, exclude=prompts(heldout) | prompts(validation), **kw)
        for name, rows in (("train", train), ("validation", validation), ("heldout", heldout)):
            demo.write_jsonl(where / f"{name}.jsonl", rows)
        tokenizer = build_tokenizer(demo.corpus(train + validation + heldout), vocab_size=64)
        check_truncation(tokenizer, train + validation + heldout)
        init = where / "start-init"
        shutil.rmtree(init, ignore_errors=True)
        build_model(init, tokenizer, hidden_size=args.hidden, layers=args.layers, heads=args.hidden // 32, seed=seed)
        info = {"train": len(train), "validation": len(validation), "heldout": len(heldout), "starts": {}}
    for name, (steps, converge) in args.start_steps.items():
        if name in info["starts"]:
            made = info["starts"][name]
            if (made["steps"], made.get("converge", False)) != (steps, converge):
                raise SystemExit(f"{where}: start {name!r} was made otherwise: {made}")
            continue
        model = where / f"start-{name}"
        shutil.rmtree(model, ignore_errors=True)
        # Plain starts grow from the shortest: a longer one continues the SFT of the longest shorter one.
        shorter = [(s["steps"], n) for n, s in info["starts"].items() if s["steps"] <= steps and not s.get("converge")]
        base_steps, base = max(shorter) if shorter else (0, None)
        shutil.copytree(where / (f"start-{base}" if base else "start-init"), model)
        rows = read_jsonl(where / "train.jsonl")
        demo.sft(model, rows, steps=steps - base_steps, lr=args.sft_lr, batch_size=args.batch, seed=seed + steps)
        info["starts"][name] = {"steps": steps, "model": str(model)}
        if converge:
            info["starts"][name].update(converge=True, history=sft_to_plateau(args, model, rows, where, seed))
        done.write_text(json.dumps(info, indent=1))
    return info


def sft_to_plateau(args: argparse.Namespace, model: Path, rows: list[dict], where: Path, seed: int) -> list[dict]:
    """Continue SFT as a careful recipe would, until more of it no longer helps: chunks of `--plateau-chunk` steps
    (AdamW), each scored on the validation split; a chunk that does not beat the best by one validation prompt
    restores the best weights and halves the learning rate; `--plateau-patience` such chunks in a row end it. The
    model left is the best on validation: an SFT model at its plateau, for this data and this model size."""
    from spin_core import demo

    validation = read_jsonl(where / "validation.jsonl")
    best_dir = model.with_name(model.name + "-best")
    shutil.rmtree(best_dir, ignore_errors=True)
    shutil.copytree(model, best_dir)
    best, lr, misses, history = demo.accuracy(model, validation), args.sft_lr, 0, []
    history.append({"chunk": 0, "lr": lr, "validation": best})
    for chunk in range(1, 100):
        demo.sft(model, rows, steps=args.plateau_chunk, lr=lr, batch_size=args.batch, seed=seed * 1000 + chunk)
        score = demo.accuracy(model, validation)
        history.append({"chunk": chunk, "lr": lr, "validation": score})
        print(f"seed {seed} plateau SFT chunk {chunk}: lr {lr:g}, validation {100 * score:.1f} %", flush=True)
        if score > best + 0.5 / len(validation):
            best, misses = score, 0
            shutil.rmtree(best_dir)
            shutil.copytree(model, best_dir)
            continue
        misses += 1
        if misses >= args.plateau_patience:
            break
        lr /= 2
        shutil.rmtree(model)
        shutil.copytree(best_dir, model)
    shutil.rmtree(model)
    best_dir.rename(model)
    return history


def prompts(rows: list[dict[str, Any]]) -> set[str]:
    return {r["messages"][0]["content"] for r in rows}


# -- one arm at one learning rate: a real SpinRun ---------------------------------------------------------------------
def spinrun(args: argparse.Namespace, name: str, model: str, data: Path, store: Path, fields: dict, lr: float) -> dict:
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
                "backend": "hf",
                "shards": 1,
                "temperature": 1.0,
                "maxNewTokens": MAX_NEW_TOKENS,
                "gpusPerShard": 0,
                "batchSize": 64,
            },
            "training": {
                "beta": 0.1,
                "learningRate": lr,
                "optimizer": "rmsprop",
                "epochs": args.epochs,
                "globalBatchSize": args.batch,
                "microBatchSize": args.batch // args.processes,
                "maxLength": MAX_LENGTH,
                "maxPromptLength": MAX_PROMPT_LENGTH,
                "zeroStage": 2,
                "nodes": 1,
                "processesPerNode": args.processes,
                "gpusPerNode": 0,
                "checkpointEverySteps": 10**6,
                **fields,
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


def in_process_runner(run):
    """The local runner's loop (planner, store, progress) with each step's job entry point called in this process
    (`spin generate`, `spin train` as one process, `spin evaluate`): the same code, without a process start per
    step."""
    from spin_core import evaluate, generate, train
    from spin_core.local import LocalRunner

    class InProcessRunner(LocalRunner):
        def generate(self, spec_file: Path, step) -> None:
            generate.main(spec_file, step.iteration, None, list(step.shards))

        def train(self, spec_file: Path, step) -> None:
            train.main(spec_file, step.iteration)

        def evaluate(self, spec_file: Path, step) -> None:
            evaluate.main(spec_file, step.iteration)

    return InProcessRunner(run)


def execute(args: argparse.Namespace, spec_file: Path, log: Path) -> None:
    if args.subprocess:
        with open(log, "w") as out:
            code = subprocess.run(
                [sys.executable, "-m", "spin_core", "run", str(spec_file), "--json"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=environment(),
                cwd=ROOT,
                check=False,
            ).returncode
        if code:
            raise SystemExit(f"spin run failed (exit {code}); see {log}")
        return
    import contextlib

    from spin_core.resource import load_all

    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        runner = in_process_runner(load_all(spec_file)[0])
        runner.execute()


def bits(values: list[float]) -> str:
    """Exact-match scores as a string of 0s and 1s (compact in results.json)."""
    return "".join("1" if v == 1.0 else "0" for v in values)


def validation_score(model_dir: Path, rows: Path, n: int) -> float:
    """Greedy exact match on the validation rows, with the evaluation step's own functions."""
    from spin_core.chat import load_tokenizer
    from spin_core.data import load_examples
    from spin_core.engines import open_engine
    from spin_core.evaluate import greedy_answers, task_score
    from spin_core.spec import Dataset

    examples = load_examples(rows, Dataset(uri=f"file://{rows}")).examples[:n]
    tokenizer = load_tokenizer(model_dir, str(model_dir))
    engine = open_engine("hf", model_dir, dtype="float32", batch_size=64)
    try:
        answers = greedy_answers(engine, tokenizer, examples, MAX_PROMPT_LENGTH, MAX_NEW_TOKENS)
        return task_score("spin_core.demo:score", examples, answers)
    finally:
        engine.close()


def run_cell(args: argparse.Namespace, seed: int, start: str, arm: str, lr: float, data: Path, model: str) -> dict:
    """One SpinRun; its numbers read back from the published eval.json and metrics.json of every iteration."""
    from spin_core import layout
    from spin_core.resource import dump_yaml
    from spin_core.store import Store

    cell = data / start / f"{arm}@{lr:g}"
    done = cell / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(cell, ignore_errors=True)
    cell.mkdir(parents=True)
    name = re.sub(r"[^a-z0-9-]", "-", f"w2s-{arm}-{seed}")
    spec_file = cell / "spinrun.yaml"
    spec_file.write_text(dump_yaml(spinrun(args, name, model, data, cell / "run", args.arm_fields[arm], lr)))
    started = time.monotonic()
    execute(args, spec_file, cell / "spin-run.log")
    store = Store.open(f"file://{cell / 'run'}")
    its = range(1, args.iterations + 1)
    evals = [store.read_json(layout.evaluation(t)) for t in its]
    metrics = [store.read_json(layout.metrics(t)) for t in its]
    models = [Path(model), *[store.fetch(layout.checkpoint(t)) for t in its]]
    validation = [validation_score(m, data / "validation.jsonl", args.validation) for m in models]
    result = {
        "seed": seed,
        "start": start,
        "arm": arm,
        "lr": lr,
        "fields": args.arm_fields[arm],
        "heldout": [evals[0]["score_previous"], *[e["score"] for e in evals]],
        "heldout_bits": [bits(evals[0]["scores_previous"]), *[bits(e["scores"]) for e in evals]],
        "validation": validation,
        "heldout_logp_real": [evals[0]["logps/real_previous"], *[e["logps/real"] for e in evals]],
        "heldout_margin": [None, *[e["rewards/margins"] for e in evals]],
        "identical_share": [m["final"].get("pairs/identical_share") for m in metrics],
        "train_logp_real_change_end": [m["final"].get("logps/real_change_end") for m in metrics],
        "steps": [m["final"]["steps"] for m in metrics],
        "train_warnings": [w for m in metrics for w in m.get("warnings", [])],
        "eval_warnings": [w for e in evals for w in e.get("warnings", [])],
        "variant": metrics[0].get("variant"),
        "seconds": round(time.monotonic() - started, 1),
    }
    done.write_text(json.dumps(result))
    return result


# -- the analysis ---------------------------------------------------------------------------------------------------
def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{100 * mean:.1f}" if len(values) == 1 else f"{100 * mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def t_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % t-interval) over seeds."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def paired_prompt_se(a: str, b: str) -> float:
    """Standard error of the mean per-prompt difference of two exact-match bit strings over the same prompts."""
    diffs = [int(x) - int(y) for x, y in zip(a, b, strict=True)]
    return statistics.stdev(diffs) / math.sqrt(len(diffs))


def analyse(cells: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """Per start and arm: the learning rate chosen on validation, and the held-out numbers at that rate."""
    out: dict[str, Any] = {}
    for start in args.start_steps:
        per_arm: dict[str, Any] = {}
        for arm in args.arms:
            by_lr = {}
            for lr in args.lrs:
                found = {c["seed"]: c for c in cells if (c["start"], c["arm"], c["lr"]) == (start, arm, lr)}
                if all(s in found for s in args.seeds):
                    by_lr[lr] = [found[s] for s in args.seeds]
            if not by_lr:
                continue
            val = {lr: statistics.fmean(c["validation"][-1] for c in cs) for lr, cs in by_lr.items()}
            best = max(val, key=lambda lr: (val[lr], -lr))  # ties: the smaller rate
            per_arm[arm] = {"lr": best, "cells": by_lr[best], "validation_by_lr": val, "by_lr": by_lr}
        out[start] = per_arm
    return out


def describe_start(args: argparse.Namespace, start: str) -> str:
    steps, converge = args.start_steps[start]
    return f"{steps} SFT steps" + (", then SFT to its validation plateau" if converge else "")


def table(cells: list[dict], args: argparse.Namespace) -> str:
    its = args.iterations
    chosen = analyse(cells, args)
    lines = []
    for start, per_arm in chosen.items():
        if not per_arm:
            continue
        lines.append(
            f"\n### {args.task} · start {start} ({describe_start(args, start)}) · held-out exact match % "
            f"({args.heldout} prompts), mean ± sd over seeds {','.join(map(str, args.seeds))}; learning rate chosen "
            "per arm on validation\n"
        )
        header = ["arm", "lr", "start", *[f"iter {t}" for t in range(1, its + 1)], "final − start", "control"]
        header += ["final − control (95 % CI)", "per seed", "prompt SE", "log p(real) held-out"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for arm, pick in per_arm.items():
            cs = pick["cells"]
            row = [arm, f"{pick['lr']:g}", mean_sd([c["heldout"][0] for c in cs])]
            row += [mean_sd([c["heldout"][t] for c in cs]) for t in range(1, its + 1)]
            row.append(mean_sd([c["heldout"][-1] - c["heldout"][0] for c in cs]))
            control = args.controls.get(arm)
            if control in per_arm and control != arm:
                base = {c["seed"]: c for c in per_arm[control]["cells"]}
                diffs = [c["heldout"][-1] - base[c["seed"]]["heldout"][-1] for c in cs]
                mean, half = t_interval(diffs)
                ses = [paired_prompt_se(c["heldout_bits"][-1], base[c["seed"]]["heldout_bits"][-1]) for c in cs]
                row += [
                    control,
                    f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]",
                    " / ".join(f"{100 * d:+.1f}" for d in diffs),
                    f"{100 * statistics.fmean(ses):.1f}",
                ]
            else:
                row += ["-", "-", "-", "-"]
            traj = [statistics.fmean(c["heldout_logp_real"][t] for c in cs) for t in range(its + 1)]
            row.append(" → ".join(f"{v:.2f}" for v in traj))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("\nValidation score (final iteration, mean over seeds) per learning rate; * chosen:\n")
        lrs = sorted({lr for p in per_arm.values() for lr in p["validation_by_lr"]})
        lines.append("| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |")
        lines.append("|" + "---|" * (len(lrs) + 1))
        for arm, pick in per_arm.items():
            vals = pick["validation_by_lr"]
            cells_ = [
                (f"{100 * vals[lr]:.1f}" + ("*" if lr == pick["lr"] else "")) if lr in vals else "-" for lr in lrs
            ]
            lines.append(f"| {arm} | " + " | ".join(cells_) + " |")
        notes = []
        for arm, pick in per_arm.items():
            cs = pick["cells"]
            shares = [x for c in cs for x in c["identical_share"] if x is not None]
            warned = sum(bool(c["eval_warnings"]) for c in cs)
            trained = sum(bool(c["train_warnings"]) for c in cs)
            notes.append(
                f"{arm}: identical pairs {100 * statistics.fmean(shares):.0f} %, steps {cs[0]['steps']}, "
                f"held-out collapse warning in {warned}/{len(cs)} seeds, trainer's in {trained}/{len(cs)}"
            )
        lines.append("\n" + "; ".join(notes) + ".")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="addition", choices=["addition", "reversal"])
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    p.add_argument("--starts", default="weak=300", help="NAME=SFT_STEPS,... the starting models")
    p.add_argument("--arms", help=f"comma-separated, of {', '.join(ARMS)} and the --variant names (default: all)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="one more arm: NAME (lowercase letters, digits, '-', '+') = training-field overrides, e.g. "
        '\'nll-kl={"sftWeight": 1, "klToBase": 0.5}\'; its pure-NLL control is added as NAME/sft unless it is '
        "an existing arm",
    )
    p.add_argument("--lrs", default="1e-4,3e-4,1e-3", help="learning rates every arm runs (RMSprop peak)")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1, help="training.epochs of every SpinRun")
    p.add_argument("--train", type=int, default=1000, help="SFT rows (SPIN generates for each)")
    p.add_argument("--validation", type=int, default=500, help="rows that choose each arm's learning rate")
    p.add_argument("--heldout", type=int, default=1000, help="rows the table reports")
    p.add_argument("--digits", type=int, default=2, help="digits of each addend, or letters to reverse")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (a multiple of 32: head dim 32)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--sft-lr", type=float, default=3e-3, help="learning rate of the SFT that makes the starts")
    p.add_argument("--plateau-chunk", type=int, default=100, help="SFT steps between validations (:plateau starts)")
    p.add_argument("--plateau-patience", type=int, default=4, help="chunks without gain that end a :plateau SFT")
    p.add_argument("--batch", type=int, default=32, help="global batch of every arm and of the starts' SFT")
    p.add_argument("--processes", type=int, default=1, help="training processes (1: one plain process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    p.add_argument("--subprocess", action="store_true", help="run each SpinRun with `spin run` instead")
    p.add_argument("--table-only", action="store_true", help="print the table of the cells already in --out")
    p.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench" / "weak_to_strong")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.start_steps = {}
    for item in args.starts.split(","):
        name, _, steps = item.partition("=")
        steps, _, converge = steps.partition(":")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", name) or not steps.isdigit() or converge not in ("", "plateau"):
            p.error(f"--starts {item!r}: want NAME=SFT_STEPS or NAME=SFT_STEPS:plateau")
        args.start_steps[name] = (int(steps), converge == "plateau")
    args.arm_fields = dict(ARMS)
    args.controls = {"spin": "sft", "spin+nll": "sft"}
    for item in args.variant:
        name, _, overrides = item.partition("=")
        if not re.fullmatch(r"[a-z0-9][a-z0-9+-]*", name) or name in args.arm_fields:
            p.error(f"--variant {item!r}: NAME must be new: lowercase letters, digits, '+' and '-'")
        try:
            fields = json.loads(overrides)
        except ValueError as e:
            p.error(f"--variant {item!r}: the JSON after '=' does not parse: {e}")
        if not isinstance(fields, dict):
            p.error(f"--variant {item!r}: the JSON after '=' must be an object")
        args.arm_fields[name] = fields
        if fields.get("objective") != "sft":
            control = control_of(fields)
            same = [a for a, f in args.arm_fields.items() if f == control]
            args.controls[name] = same[0] if same else f"{name}/sft"
            args.arm_fields.setdefault(args.controls[name], control)
    args.arms = args.arms.split(",") if args.arms else list(args.arm_fields)
    for arm in list(args.arms):  # every SPIN arm runs beside its control
        if args.controls.get(arm) and args.controls[arm] not in args.arms:
            args.arms.append(args.controls[arm])
    if unknown := set(args.arms) - set(args.arm_fields):
        p.error(f"unknown arms: {sorted(unknown)}")
    os.environ.update(environment())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    began = time.monotonic()
    cells: list[dict] = []
    if not args.table_only:
        import torch

        torch.set_num_threads(args.threads)
    for seed in args.seeds:
        data = args.out / f"seed-{seed}"
        if args.table_only:
            cells += [json.loads(f.read_text()) for f in sorted(data.glob("*/*/result.json"))]
            continue
        info = prepare_seed(args, seed, data)
        for start in args.start_steps:
            model = info["starts"][start]["model"]
            for lr in args.lrs:
                for arm in args.arms:
                    t0 = time.monotonic()
                    cached = (data / start / f"{arm}@{lr:g}" / "result.json").exists()
                    cell = run_cell(args, seed, start, arm, lr, data, model)
                    cells.append(cell)
                    if not cached:
                        score = " → ".join(f"{100 * s:.1f}" for s in cell["heldout"])
                        print(
                            f"seed {seed} {start} {arm} lr {lr:g}: held-out {score} %, validation "
                            f"{100 * cell['validation'][-1]:.1f} % ({time.monotonic() - t0:.0f} s)",
                            flush=True,
                        )
    cells = [c for c in cells if c["arm"] in args.arms and c["lr"] in args.lrs and c["start"] in args.start_steps]
    (args.out / "results.json").write_text(json.dumps(cells))
    print(table(cells, args))
    print(f"\n{time.monotonic() - began:.0f} s; every number in {args.out / 'results.json'}")


if __name__ == "__main__":
    main()

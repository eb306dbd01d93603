"""The TRL side of `benchmarks/train_step.py`: TRL's `DPOTrainer` (loss sigmoid) on the benchmark's pairs, under
`torchrun --nproc-per-node N` with DeepSpeed (gloo on CPU). Not meant to be run by hand.

The pairs come pre-tokenised (a JSON-lines file of prompt_ids / chosen_ids / rejected_ids written by train_step.py
with spin's own `chat.encode_pair_side`), so both trainers see exactly the same token ids. The only change to TRL is
`_prepare_dataset` returning that file's dataset as it is (TRL's tokenisation happens once, before training, and
would add a chat-template newline token to every answer); the training step is TRL's, untouched.

Each rank writes `rank-<r>.json` in --out: the time (wall clock and the process's CPU time) after every optimizer step
(a TrainerCallback's on_step_end), the reference-log-prob precompute time (if any), the tokens TRL counted, the
losses it logged, and its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="JSON lines: prompt_ids, chosen_ids, rejected_ids")
    p.add_argument("--out", required=True)
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--beta", type=float, required=True)
    p.add_argument("--max-length", type=int, required=True)
    p.add_argument("--warmup-ratio", type=float, required=True)
    p.add_argument("--zero", type=int, required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs=True")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    # On a machine without GPUs, TrainingArguments given a DeepSpeed config builds accelerate's state with no backend:
    # its world_size is 1 on every rank while torch.distributed has 2, and DeepSpeed's batch-size check fails.
    # Configure the state first: DeepSpeed over gloo, both ranks counted.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import PartialState

    PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if PartialState().num_processes != world:
        raise SystemExit(f"accelerate sees {PartialState().num_processes} processes, torchrun started {world}")
    out = Path(args.out)
    accumulation = args.global_batch // (args.micro_batch * world)
    if accumulation * args.micro_batch * world != args.global_batch:
        raise SystemExit(f"global batch {args.global_batch} is not a multiple of micro batch x world")

    class Pretokenized(DPOTrainer):
        """DPOTrainer whose dataset is already tokenised (prompt_ids/chosen_ids/rejected_ids): skip TRL's own
        tokenisation so that both trainers train on identical token ids."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    precompute_seconds: list[float] = []
    if args.precompute:
        original = DPOTrainer._precompute_ref_logps

        def timed(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return original(self, *a, **k)
            finally:
                precompute_seconds.append(time.perf_counter() - t0)

        Pretokenized._precompute_ref_logps = timed

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.stamps: list[float] = []
            self.cpu: list[float] = []
            self.losses: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    # A file-backed dataset (not an in-memory one): TRL's precompute caches next to the dataset's files, and with an
    # in-memory dataset each rank gets its own temporary cache folder and rank 1 fails (../shared/README.md).
    dataset = load_dataset("json", data_files=args.data, split="train", cache_dir=str(out / "hf-datasets"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    deepspeed = {
        # explicit numbers, not "auto": TRL builds the reference model's engine before the Trainer fills "auto"
        "train_batch_size": args.global_batch,
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.zero},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    config = DPOConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=accumulation,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup_ratio,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_checkpointing=False,  # DPOConfig defaults to True; spin's spec to False: compare like with like
        beta=args.beta,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        precompute_ref_log_probs=args.precompute,
        deepspeed=deepspeed,
        bf16=False,
        fp16=False,
        seed=args.seed,
        save_strategy="no",
        report_to="none",
        dataloader_drop_last=True,
        disable_tqdm=rank != 0,
        accelerator_config={"use_configured_state": True},
    )
    timer = StepTimes()
    trainer = Pretokenized(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.add_callback(timer)
    trainer.train()
    engine = trainer.model_wrapped  # the DeepSpeed engine
    stage, optimizer = engine.zero_optimization_stage(), type(engine.optimizer).__name__
    result = {
        "engine": f"{type(engine).__name__}, ZeRO-{stage}, {optimizer}",
        "rank": rank,
        "world": world,
        "stamps": timer.stamps,
        "cpu": timer.cpu,
        "train_begin": timer.begin,
        "started": started,
        "precompute_s": sum(precompute_seconds) if precompute_seconds else None,
        "tokens": int(trainer._total_train_tokens),
        "losses": timer.losses,
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    # Leave without the interpreter's teardown: after a finished run it sometimes aborts here ("terminate called
    # without an active exception", a background thread of the Trainer's stack), which would fail the launcher.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

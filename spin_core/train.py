"""`spin train`: iteration t's training job. M_t starts from M_{t-1} and learns to prefer the real answers to
M_{t-1}'s own, with M_{t-1} frozen as the opponent. Runs under torchrun / a Kubeflow PyTorchJob (MASTER_ADDR,
MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK) or as one plain process; DeepSpeed ZeRO 0/2/3, gloo on CPU, NCCL on GPU.

Read top to bottom: setup -> pairs -> engine -> opponent log-probs -> resume -> the loop -> publish.

Precision: policy and opponent run in one dtype, the training dtype (bfloat16 on GPU by default, float32 on CPU):
the opponent's log-probs come from the policy engine itself before its first update (precompute) or from a frozen
copy loaded in that dtype (online), so every SPIN logit is 0 at step 0 (`check/step0_*` in the metrics, a warning
past STEP0_TOLERANCE). Dropout is off in every model (as the official SPIN code and TRL do). Log-softmax and losses
are computed in float32; checkpoints are written in the training dtype (LoRA adapters merged in float32 first).

The opt-in regularised variants (README, "Regularised SPIN variants") plug in at two places: before training, no-grad
passes score the pairs under the older iterates (opponent: mixture) and the real answers' tokens under the base model
(klToBase > 0), one model at a time; in the loop, `spin_objective` adds the NLL and KL terms to `spin_loss`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from spin_core import layout
from spin_core.chat import load_tokenizer
from spin_core.context import RunContext
from spin_core.errors import SpinError
from spin_core.losses import mixture_logps, mixture_weights, spin_objective
from spin_core.pairs import (
    Pair,
    base_tokens_like,
    pair_logps,
    pair_token_logps,
    real_token_counts,
    select_pairs,
)
from spin_core.spec import OpponentMixture
from spin_core.store import AlreadyPublished, NotPublished
from spin_core.termination import write_termination_message
from spin_core.variants import loss_weights, variant_label

# Per optimizer step (means over the step's pairs) and per epoch. Log-probs are of the answer tokens under the policy
# as it is at that step (before the step's update): "logps/real" / "logps/generated" summed per answer, "_per_token"
# divided by the answer's token count; "logps/real_start" is M_{t-1}'s log p(real) of the same pairs and
# "logps/real_change" the policy's minus M_{t-1}'s (negative: the real answers are losing probability: collapse).
METRICS = (
    "loss",
    "loss/spin",
    "rewards/real",
    "rewards/generated",
    "rewards/accuracies",
    "rewards/margins",
    "logps/real",
    "logps/generated",
    "logps/real_per_token",
    "logps/generated_per_token",
    "logps/real_start",
    "logps/real_change",
    "pairs/identical_share",
)


# At step 0 the policy is M_{t-1}, so its answer log-probs must equal the opponent's: computed by the same weights in
# the same dtype (and, for precompute, the same micro-batches) they agree to the last bit on CPU. A larger gap means
# the SPIN logits start away from 0 (mixed dtypes, dropout, a nondeterministic kernel): warned about, not fatal.
STEP0_TOLERANCE = 1e-3  # nats per answer token


def metric_names(training) -> tuple[str, ...]:
    """METRICS plus the regularisers' unweighted terms when they are on: loss/sft (per-token NLL of the real answer)
    and loss/kl (the k3 divergence from the base model)."""
    _, sft_weight, _ = loss_weights(training)
    extra = (("loss/sft",) if sft_weight > 0 else ()) + (("loss/kl",) if training.kl_to_base > 0 else ())
    return METRICS + extra


def collapse_check(steps: list[dict], threshold: float, t: int) -> tuple[dict[str, float], list[str]]:
    """({logps/real_change_end: ...}, warnings): the mean change of log p(real answer) (policy minus M_{t-1}, on the
    same pairs) over the last quarter of the iteration's optimizer steps (at least one); a warning when it fell by
    more than `threshold` nats (training.collapseWarnNats)."""
    usable = [s for s in steps if isinstance(s.get("logps/real_change"), int | float)]
    if not usable:
        return {}, []
    tail = usable[-max(1, math.ceil(len(usable) / 4)) :]
    change = sum(s["logps/real_change"] for s in tail) / len(tail)
    start = sum(s.get("logps/real_start", 0.0) for s in tail) / len(tail)
    numbers = {"logps/real_change_end": change}
    if change >= -threshold:
        return numbers, []
    return numbers, [
        f"iteration {t}: log p(real answer) fell by {-change:.2f} nats during training ({start:.2f} under M_{t - 1} "
        f"-> {start + change:.2f}, last {len(tail)} of {len(usable)} steps), more than collapseWarnNats {threshold:g}: "
        "SPIN may be collapsing (real and generated answers pushed down together); consider training.sftWeight, "
        "klToBase, a larger beta or fewer epochs"
    ]


# ----------------------------------------------------------------------------------------------- distributed
def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); a plain process becomes a world of one.

    On GPU the process takes cuda:<local rank> *before* the NCCL group exists: NCCL collectives, all_gather_object
    and barrier all use the current device, and without this every rank would put its tensors on cuda:0."""
    import deepspeed
    import torch

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", verbose=False)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (pickled; with NCCL through tensors on the current device, see init_distributed)."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


# ----------------------------------------------------------------------------------------------- data order
def epoch_steps(n_pairs: int, global_batch: int, epoch: int, seed: int) -> list[list[int]]:
    """Pair indices of each optimizer step of an epoch: a seeded permutation cut into global batches (the last,
    incomplete batch is dropped, so every step sees exactly globalBatchSize pairs)."""
    order = list(range(n_pairs))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    return [order[i : i + global_batch] for i in range(0, n_pairs - global_batch + 1, global_batch)]


def rank_micro_batches(step: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
    per_rank = len(step) // world
    mine = step[rank * per_rank : (rank + 1) * per_rank]
    return [mine[i : i + micro] for i in range(0, len(mine), micro)]


def scoring_batches(n_pairs: int, tr, rank: int, world: int) -> list[list[int]]:
    """This rank's batches for a no-grad pass over every pair: its micro-batches of epoch 1, in training order (so
    the opponent's log-probs of the first steps come from the very batches, shapes and kernels the policy's do), then
    its share of the pairs epoch 1 leaves out (the incomplete last global batch)."""
    steps = epoch_steps(n_pairs, tr.global_batch_size, 0, tr.seed)
    batches = [mb for step in steps for mb in rank_micro_batches(step, rank, world, tr.micro_batch_size)]
    seen = {i for step in steps for i in step}
    rest = [i for i in range(n_pairs) if i not in seen][rank::world]
    return batches + [rest[i : i + tr.micro_batch_size] for i in range(0, len(rest), tr.micro_batch_size)]


# ----------------------------------------------------------------------------------------------- the job
def deepspeed_config(ctx: RunContext, world: int, bf16: bool) -> dict[str, Any]:
    tr = ctx.run.spec.training
    zero: dict[str, Any] = {"stage": tr.zero_stage}
    if tr.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_batch_size": tr.global_batch_size,
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.global_batch_size // (tr.micro_batch_size * world),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch RMSprop/AdamW: plain torch optimizers, sharded by ZeRO
        "bf16": {"enabled": bf16},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def frozen_deepspeed_config(config: dict[str, Any]) -> dict[str, Any]:
    """The training config without the optimizer parts: for frozen models partitioned by ZeRO-3 (as TRL does)."""
    keep = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16")
    return {**{k: config[k] for k in keep}, "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}


# Dropout is off in every model (official SPIN and TRL's DPOTrainer do the same): a dropped-out policy would be
# compared with a deterministic opponent, and the SPIN logits would be noise even at step 0.
def dropout_overrides(model_dir: Path) -> dict[str, float]:
    """config.json fields that set a dropout probability, each mapped to 0.0 (from_pretrained keyword overrides)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {
        k: 0.0 for k, v in config.items() if ("dropout" in k or k.endswith("_pdrop")) and isinstance(v, float) and v > 0
    }


def disable_dropout(model) -> None:
    """Every torch Dropout module of `model` to p=0 (LoRA's own dropout is added afterwards, as the spec asks)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def check_attention(attention: str) -> None:
    """training.attention flash_attention_2 needs the flash-attn package (and a CUDA GPU): say so before loading."""
    import importlib.util

    import torch

    if attention != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
        raise SpinError(
            "training.attention flash_attention_2 needs a CUDA GPU and the flash-attn package "
            f"({'not installed' if importlib.util.find_spec('flash_attn') is None else 'no GPU here'}): "
            "install it in the trainer image, or use sdpa (the default)"
        )


def load_model(model_dir: Path, dtype, device, attention: str = "sdpa"):
    """A model of `model_dir` in `dtype` with dropout off and the given attention implementation. Under ZeRO-3 (an
    HfDeepSpeedConfig alive: see Trainer.run) transformers builds it inside deepspeed.zero.Init, so each rank holds
    only its partition; otherwise it is loaded straight onto `device`."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    check_attention(attention)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention, **dropout_overrides(model_dir)}
    if not is_deepspeed_zero3_enabled() and torch.device(device).type == "cuda":
        kwargs["device_map"] = {"": torch.device(device)}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    disable_dropout(model)
    if not is_deepspeed_zero3_enabled():
        model.to(device)
    return model


def make_optimizer(model, name: str, lr: float, weight_decay: float):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def linear_with_warmup(optimizer, total: int, warmup_ratio: float):
    import torch

    warmup = math.ceil(total * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def score_pairs(
    model,
    pairs: list[Pair],
    batches: list[list[int]],
    pad_id: int,
    tokens: bool = False,
    shared_prompt: bool = True,
) -> dict[int, tuple[float, float, Any]]:
    """No-grad log-probs of the pairs in this rank's `batches` under `model` (a module or a DeepSpeed engine, in the
    training dtype); every rank gets every rank's: {index: (real sum, generated sum, the real answer's per-token
    log-probs (1-D float32 CPU tensor) or None)}."""
    import torch

    found: dict[int, tuple[float, float, Any]] = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for chunk in batches:
            if not chunk:
                continue
            batch_pairs = [pairs[i] for i in chunk]
            if tokens:
                out = pair_token_logps(model, batch_pairs, pad_id, shared_prompt)
                real, gen = out.real, out.generated
                per_token = [out.real_tokens[j][out.real_mask[j]].cpu().clone() for j in range(len(chunk))]
            else:
                real, gen = pair_logps(model, batch_pairs, pad_id, shared_prompt)
                per_token = [None] * len(chunk)
            found.update(
                {i: (r, g, k) for i, r, g, k in zip(chunk, real.tolist(), gen.tolist(), per_token, strict=True)}
            )
    model.train(was_training)
    merged: dict[int, tuple[float, float, Any]] = {}
    for part in all_gather(found):
        merged.update(part)
    return merged


def opponent_logps(model, pairs: list[Pair], batches: list[list[int]], pad_id: int, shared_prompt: bool = True) -> None:
    """Fill `pair.opponent` where the generation job did not, with `model` (the policy before its first update)."""
    todo = {i for i, p in enumerate(pairs) if p.opponent is None}
    mine = [[i for i in batch if i in todo] for batch in batches]
    scores = score_pairs(model, pairs, mine, pad_id, shared_prompt=shared_prompt)
    for i, (real, gen, _) in scores.items():
        pairs[i].opponent = (real, gen)


def release(model) -> None:
    import torch

    destroy = getattr(model, "destroy", None)  # a DeepSpeed engine: remove its ZeRO-3 hooks
    if callable(destroy):
        destroy()
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(spec_path: Path, iteration: int) -> int:
    ctx = RunContext.from_file(spec_path)
    ctx.check_iteration(iteration)
    store, t = ctx.store, iteration
    if store.is_published(layout.checkpoint(t)):
        if not store.exists(layout.metrics(t)):  # the last attempt died between the two publishes
            metrics = json.loads((store.fetch(layout.checkpoint(t)) / "spin_metrics.json").read_text())
            publish_metrics(store, t, metrics)
        print(f"{store.uri_of(layout.checkpoint(t))} is already published: nothing to do", flush=True)
        return 0
    return Trainer(ctx, t).run()


class Trainer:
    """One iteration's training; state that the loop and checkpointing share."""

    def __init__(self, ctx: RunContext, t: int):
        self.ctx, self.t = ctx, t
        self.spec = ctx.run.spec
        self.tr = self.spec.training
        self.beta, self.lr, self.epochs = ctx.run.iteration_settings(t)
        self.metric_names = metric_names(self.tr)
        self.variant = variant_label(self.spec)
        # Mixture opponent: weights of M_{t-1}, M_{t-2}, ...; the plain opponent is the one weight [1.0].
        mix = self.tr.opponent_mixture or OpponentMixture()
        self.weights = mixture_weights(mix.alpha, mix.history, t) if self.tr.opponent == "mixture" else [1.0]
        self.warnings: list[str] = []

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, file=sys.stderr, flush=True)

    def step0_check(self, gap: float) -> None:
        """Warn (log, metrics.json, termination summary) when policy and opponent disagree before any update."""
        if gap <= STEP0_TOLERANCE:
            return
        warning = (
            f"iteration {self.t}: before any update the policy's answer log-probs differ from the opponent's by up to "
            f"{gap:.2e} nats per token (tolerance {STEP0_TOLERANCE:g}), though both are M_{self.t - 1}: the SPIN "
            "logits do not start at 0. The opponent was scored differently from the policy (another dtype or "
            "kernel); training.dtype and referenceLogprobs: precompute keep them identical"
        )
        self.warnings.append(warning)
        self.log(f"warning: {warning}")

    def run(self) -> int:
        import deepspeed
        import torch
        import torch.distributed as dist

        tr, t = self.tr, self.t
        gpu = torch.cuda.is_available()
        bf16 = tr.dtype == "bfloat16" or (tr.dtype == "auto" and gpu)
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        # Inputs first: every user-facing error is raised before any distributed work, identically on all ranks.
        self.model_dir = model_dir = self.ctx.fetch_model(t)
        self.tokenizer = load_tokenizer(model_dir, self.ctx.model_uri(t))
        from spin_core.pairs import load_pairs

        # The generating engine's float32 log-probs stand in for the opponent only when training in float32 too.
        loaded = load_pairs(self.ctx, t, self.tokenizer, reuse_dtype=None if bf16 else "float32")
        pairs, self.pair_stats = select_pairs(loaded, tr.drop_identical_pairs, tr.truncated_answers == "drop")
        # The older iterates (mixture opponent) and the base model (klToBase) are fetched before any distributed work.
        self.iterate_dirs = {t - 1 - k: self.ctx.fetch_model(t - k) for k in range(1, len(self.weights))}
        if tr.kl_to_base > 0 and t > 1 and 0 not in self.iterate_dirs:
            self.iterate_dirs[0] = self.ctx.fetch_model(1)
        self.rank, self.world, local_rank = init_distributed()
        if tr.global_batch_size % (tr.micro_batch_size * self.world):
            raise SpinError(
                f"globalBatchSize {tr.global_batch_size} is not a multiple of microBatchSize x world size "
                f"({tr.micro_batch_size} x {self.world})"
            )
        if len(pairs) < tr.global_batch_size:
            dropped = self.pair_stats["pairs/dropped"]
            raise SpinError(
                f"iteration {t} has {len(pairs)} pairs, fewer than globalBatchSize {tr.global_batch_size}"
                + (f" ({dropped} identical or truncated pairs dropped)" if dropped else "")
            )
        self.device = device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
        torch.manual_seed(tr.seed)
        pad = self.tokenizer.pad_token_id
        self.ds_config = deepspeed_config(self.ctx, self.world, bf16)
        if tr.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # While this object lives, from_pretrained builds models inside deepspeed.zero.Init: each rank loads
            # only its partition instead of the whole model (in the training dtype).
            self.hf_deepspeed = HfDeepSpeedConfig(self.ds_config)

        reused = sum(p.opponent is not None for p in pairs)
        model = load_model(model_dir, self.dtype, device, self.tr.attention)
        self.note_partition("policy", model)
        stats = self.pair_stats
        self.log(
            f"iteration {t}: {len(pairs)} pairs from iterations {sorted({p.iteration for p in pairs})} "
            f"({stats['pairs/identical']} of {stats['pairs/total']} identical"
            f"{', dropped' if tr.drop_identical_pairs and stats['pairs/identical'] else ''}; "
            f"{stats['pairs/truncated']} generated answers cut at maxNewTokens"
            f"{', dropped' if tr.truncated_answers == 'drop' and stats['pairs/truncated'] else ''}), "
            "opponent log-probs "
            f"{'reused from generation for ' + str(reused) if reused else 'computed'} ({tr.reference_logprobs}); "
            f"beta {self.beta}, lr {self.lr}, {self.epochs} epoch(s), world {self.world} ({dist.get_backend()}), "
            f"ZeRO {tr.zero_stage}, "
            f"{str(self.dtype).removeprefix('torch.')}; {self.variant}"
            + (
                f", opponent weights {[round(w, 4) for w in self.weights]} on M_{t - 1}..M_{t - len(self.weights)}"
                if len(self.weights) > 1
                else ""
            )
        )
        if stats["pairs/retokenized"]:
            self.log(
                f"{stats['pairs/retokenized']} pairs have an answer tokenised from text (shards written before the "
                "sampled ids were stored, or a real answer whose first token merges with the prompt's last)"
            )
        if tr.opponent_mixture is not None and tr.opponent != "mixture":
            self.log("training.opponentMixture is ignored: training.opponent is previous (set it to mixture to use it)")
        if tr.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        if tr.lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, self.lora_config())
        model.train()
        steps_per_epoch = len(epoch_steps(len(pairs), tr.global_batch_size, 0, tr.seed))
        total = steps_per_epoch * self.epochs
        optimizer = make_optimizer(model, tr.optimizer, self.lr, tr.weight_decay)
        scheduler = linear_with_warmup(optimizer, total, tr.warmup_ratio)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.engine = engine

        # Before the first update (and before a resume loads a later state), the engine is M_{t-1} in the training
        # dtype: it scores the pairs as the opponent, in the micro-batches epoch 1 will train them in.
        batches = scoring_batches(len(pairs), tr, self.rank, self.world)
        opponent = None
        if tr.reference_logprobs == "precompute":
            opponent_logps(engine, pairs, batches, pad, tr.shared_prompt)
        self.score_variants(engine, pairs, batches, pad)
        if tr.reference_logprobs == "online":
            opponent = self.frozen_model(model_dir)

        history = {"steps": [], "epochs": []}
        global_step = self.resume(history)
        self.loop(engine, opponent, pairs, global_step, total, steps_per_epoch, history, device)
        self.publish(engine, pairs, history, model_dir)
        return 0

    def lora_config(self):
        from peft import LoraConfig

        lora = self.tr.lora
        return LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )

    def frozen_model(self, model_dir: Path):
        """A no-grad model of `model_dir` in the training dtype, dropout off; under ZeRO-3 partitioned across the
        ranks (zero.Init, then a DeepSpeed engine without optimizer that gathers each layer for its forward)."""
        import deepspeed

        model = load_model(model_dir, self.dtype, self.device, self.tr.attention)
        model.requires_grad_(False)
        model.eval()
        self.note_partition("opponent" if model_dir == self.model_dir else f"M_{self.model_index(model_dir)}", model)
        if self.tr.zero_stage == 3:
            engine, *_ = deepspeed.initialize(model=model, config=frozen_deepspeed_config(self.ds_config))
            engine.eval()
            return engine
        return model

    def note_partition(self, name: str, model) -> None:
        """Under ZeRO-3, log how much of a model this rank holds (zero.Init: a partition, not the whole model)."""
        if self.tr.zero_stage != 3:
            return
        params = list(model.parameters())
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        self.log(f"ZeRO-3 partition: {name} holds {held} of its {total} parameters on rank {self.rank}")

    def model_index(self, model_dir: Path) -> int | str:
        return next((j for j, d in self.iterate_dirs.items() if d == model_dir), "?")

    def score_variants(self, policy, pairs: list[Pair], batches: list[list[int]], pad: int) -> None:
        """Before training, only for the variants that need them: each pair's log-probs under M_{t-2}, M_{t-3}, ...
        (mixture opponent; `pair.older`) and the real answer's per-token log-probs under the base model M_0
        (klToBase; `pair.base_real_tokens`). One frozen model at a time, freed after its pass."""
        tr, t = self.tr, self.t
        kl = tr.kl_to_base > 0
        if kl and t == 1:  # the base model is M_0 = M_{t-1}: the policy before its first update
            for i, (_, _, tokens) in score_pairs(policy, pairs, batches, pad, True, tr.shared_prompt).items():
                pairs[i].base_real_tokens = tokens
        for j in sorted(self.iterate_dirs, reverse=True):  # M_{t-2}, M_{t-3}, ..., then M_0 (base) if needed
            k = t - 1 - j  # steps back from M_{t-1}
            mixed, base = k < len(self.weights), kl and j == 0
            roles = [role for role, on in (("mixture opponent", mixed), ("base model, per token", base)) if on]
            self.log(f"scoring the pairs under M_{j} ({', '.join(roles)})")
            frozen = self.frozen_model(self.iterate_dirs[j])
            for i, (real, gen, tokens) in score_pairs(frozen, pairs, batches, pad, base, tr.shared_prompt).items():
                if mixed:
                    pairs[i].older.append((real, gen))
                if base:
                    pairs[i].base_real_tokens = tokens
            release(frozen)

    def opponent_of(self, batch: list[Pair], o_real, o_gen, device):
        """The opponent's (real, generated) log-probs of a batch: M_{t-1}'s as given, or with opponent: mixture the
        weighted sum over M_{t-1}, M_{t-2}, ... (`mixture_logps`; with one weight, M_{t-1}'s tensors themselves)."""
        import torch

        reals, gens = [o_real], [o_gen]
        for k in range(1, len(self.weights)):
            reals.append(torch.tensor([p.older[k - 1][0] for p in batch], device=device))
            gens.append(torch.tensor([p.older[k - 1][1] for p in batch], device=device))
        return mixture_logps(reals, self.weights), mixture_logps(gens, self.weights)

    # ------------------------------------------------------------------------------------------- the loop
    def loop(self, engine, opponent, pairs, global_step, total, steps_per_epoch, history, device) -> None:
        import torch
        import torch.distributed as dist
        from tqdm import tqdm

        tr, pad = self.tr, self.tokenizer.pad_token_id
        bar = tqdm(
            total=total,
            initial=global_step,
            desc=f"iteration {self.t} training",
            disable=self.rank != 0,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        names = self.metric_names
        spin_weight, sft_weight, _ = loss_weights(tr)  # objective sft: NLL only
        sft, kl = sft_weight > 0, tr.kl_to_base > 0
        # Accumulators live on the training device: NCCL reduces only device tensors.
        epoch_sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
        first_step = global_step == 0
        while global_step < total:
            epoch, in_epoch = divmod(global_step, steps_per_epoch)
            step_pairs = epoch_steps(len(pairs), tr.global_batch_size, epoch, tr.seed)[in_epoch]
            started = time.perf_counter()
            sums = torch.zeros(len(names) + 2, dtype=torch.float64, device=device)  # metrics..., pairs, tokens
            # Step 0: the policy is still M_{t-1}; how far its log-probs are from the opponent's (per token, max).
            step0 = torch.zeros(1, dtype=torch.float64, device=device)
            for micro in rank_micro_batches(step_pairs, self.rank, self.world, tr.micro_batch_size):
                batch = [pairs[i] for i in micro]
                extra: dict[str, Any] = {}
                if kl:
                    out = pair_token_logps(engine, batch, pad, tr.shared_prompt)
                    real, gen = out.real, out.generated
                    extra.update(
                        policy_real_token_logps=out.real_tokens,
                        base_real_token_logps=base_tokens_like(batch, out.real_mask),
                        real_token_mask=out.real_mask,
                    )
                else:
                    real, gen = pair_logps(engine, batch, pad, tr.shared_prompt)
                if opponent is None:
                    o_real = torch.tensor([p.opponent[0] for p in batch], device=device)
                    o_gen = torch.tensor([p.opponent[1] for p in batch], device=device)
                else:
                    with torch.no_grad():
                        o_real, o_gen = pair_logps(opponent, batch, pad, tr.shared_prompt)
                m_real, m_gen = self.opponent_of(batch, o_real, o_gen, device)
                n_real = real_token_counts(batch, device)
                n_gen = torch.tensor([len(p.generated) for p in batch], dtype=torch.float32, device=device)
                if first_step:
                    gaps = torch.cat([(real.detach() - o_real).abs() / n_real, (gen.detach() - o_gen).abs() / n_gen])
                    step0 = torch.maximum(step0, gaps.max().double())
                losses, r_real, r_gen, terms = spin_objective(
                    real,
                    gen,
                    m_real,
                    m_gen,
                    self.beta,
                    tr.loss,
                    spin_weight=spin_weight,
                    sft_weight=sft_weight,
                    real_token_counts=n_real if sft else None,
                    kl_to_base=tr.kl_to_base,
                    lengths=(n_real, n_gen) if tr.loss == "ipo" else None,
                    **extra,
                )
                engine.backward(losses.mean())
                engine.step()
                values = {
                    "loss": losses.detach(),
                    "loss/spin": terms["spin"],
                    "rewards/real": r_real,
                    "rewards/generated": r_gen,
                    "rewards/accuracies": (r_real > r_gen).float(),
                    "rewards/margins": r_real - r_gen,
                    "logps/real": real.detach(),
                    "logps/generated": gen.detach(),
                    "logps/real_per_token": real.detach() / n_real,
                    "logps/generated_per_token": gen.detach() / n_gen,
                    "logps/real_start": o_real,
                    "logps/real_change": real.detach() - o_real,
                    "pairs/identical_share": torch.tensor([float(p.identical) for p in batch], device=device),
                    "loss/sft": terms.get("sft"),
                    "loss/kl": terms.get("kl"),
                }
                sums[: len(names)] += torch.stack([values[k].double().sum() for k in names])
                sums[-2] += len(batch)
                sums[-1] += sum(len(p.prompt) * 2 + len(p.real) + len(p.generated) for p in batch)
            dist.all_reduce(sums)
            global_step += 1
            seconds = time.perf_counter() - started
            record = {k: (sums[i] / sums[-2]).item() for i, k in enumerate(names)}
            record.update(
                step=global_step,
                epoch=epoch + 1,
                lr=engine.get_lr()[0],
                seconds=seconds,
                **{"tokens/s": sums[-1].item() / seconds},
            )
            if first_step:
                dist.all_reduce(step0, op=dist.ReduceOp.MAX)
                record["check/step0_max_logp_gap_per_token"] = self.step0_gap = step0.item()
                self.step0_check(step0.item())
                first_step = False
            history["steps"].append(record)
            epoch_sums[: len(names)] += sums[: len(names)]
            epoch_sums[-1] += sums[-2]
            bar.update(1)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                acc=f"{record['rewards/accuracies']:.2f}",
                margin=f"{record['rewards/margins']:.3f}",
            )
            end_of_epoch = global_step % steps_per_epoch == 0
            if end_of_epoch:
                summary = {k: (epoch_sums[i] / max(1, epoch_sums[-1])).item() for i, k in enumerate(names)}
                history["epochs"].append({"epoch": epoch + 1, "step": global_step, **summary})
                epoch_sums.zero_()
            if global_step < total and (end_of_epoch or global_step % tr.checkpoint_every_steps == 0):
                self.save_state(global_step, history, keep=end_of_epoch)
                if os.environ.get("SPIN_TEST_EXIT_AFTER_STATE") == str(global_step):
                    os._exit(17)  # fault injection for the kill-and-resume tests: die like a SIGKILL would
        bar.close()

    # ------------------------------------------------------------------------------------------- train state
    def save_state(self, step: int, history: dict, keep: bool) -> None:
        """Every rank saves its DeepSpeed state and publishes its own files (`rank-<r>`: its ZeRO partition); rank 0
        also publishes the files every rank reads (`shared`: the model states of ZeRO 0/2), then the commit record.
        A state is usable only once its commit record exists (all ranks' parts are published)."""
        store, t = self.ctx.store, self.t
        key = layout.train_state(t, step)
        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag="state")
            part = Path(tmp) / "state"
            part.mkdir(exist_ok=True)
            (part / f"rank-{self.rank}.json").write_text(json.dumps({"rank": self.rank, "step": step}))
            files = {p.name: p for p in part.iterdir() if p.is_file()}
            own = {n: f for n, f in files.items() if n == f"rank-{self.rank}.json" or f"zero_pp_rank_{self.rank}_" in n}
            store.publish(f"{key}/rank-{self.rank}", own)
            shared = {n: f for n, f in files.items() if n not in own}
            if self.rank == 0 and shared:
                store.publish(f"{key}/shared", shared)
        barrier()
        if self.rank == 0:
            store.publish_json(
                f"{key}/commit.json", {"step": step, "world": self.world, "history": history, "keep": keep}
            )
            for old in self.committed_states():
                if old < step and not store.read_json(f"{layout.train_state(t, old)}/commit.json").get("keep"):
                    self.delete_state(old)
        barrier()

    def committed_states(self) -> list[int]:
        prefix = layout.train_state_prefix(self.t)
        steps = set()
        for key, _ in self.ctx.store.backend.list(prefix):
            if key.endswith("/commit.json"):
                steps.add(int(key[len(prefix) :].split("/")[0].removeprefix("step-")))
        return sorted(steps)

    def delete_state(self, step: int) -> None:
        key = layout.train_state(self.t, step)
        self.ctx.store.backend.delete([f"{key}/commit.json"])
        for rank_key in self.ctx.store.published(key + "/"):
            self.ctx.store.delete_artefact(rank_key)

    def resume(self, history: dict) -> int:
        """Load the newest committed train state, if any; returns the global step to continue from.

        Each rank downloads only what it reads: its own part and the shared files (states saved before `shared`
        existed keep those in rank 0's part)."""
        store = self.ctx.store
        for step in reversed(self.committed_states()):
            key = layout.train_state(self.t, step)
            commit = store.read_json(f"{key}/commit.json")
            if commit["world"] != self.world:
                self.log(
                    f"train state at step {step} was saved by {commit['world']} processes, not {self.world}: skipped"
                )
                continue
            parts = [f"{key}/rank-{self.rank}"]
            parts.append(f"{key}/shared" if store.is_published(f"{key}/shared") else f"{key}/rank-0")
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp) / "state"
                folder.mkdir()
                try:
                    for part in dict.fromkeys(parts):
                        for f in store.fetch(part).iterdir():
                            shutil.copyfile(f, folder / f.name)
                except NotPublished:
                    continue
                self.engine.load_checkpoint(tmp, tag="state")
            history.update(commit["history"])
            self.log(f"resumed iteration {self.t} from the train state at step {step}")
            return step
        return 0

    # ------------------------------------------------------------------------------------------- publish
    def adapter_weights(self, engine) -> dict[str, Any]:
        """The trained LoRA weights in float32 on CPU (DeepSpeed's float32 master copies, not the bf16 ones the
        forward used). Collective: every rank calls it."""
        import torch
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in engine.module.named_parameters():
            if param.requires_grad:
                full = safe_get_full_fp32_param(param)
                out[name] = (full if full is not None else param.detach()).to("cpu", torch.float32).clone()
        return out

    def merged_lora_model(self, model_dir: Path, adapters: dict[str, Any]):
        """M_{t-1} in float32 with the adapters merged into it in float32: a small update added to a large weight
        is lost when the sum is rounded to bf16 first, so only the merged weight is cast, once, when saved."""
        import torch
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # a plain float32 copy on this rank, not a ZeRO-3 partition
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = get_peft_model(base, self.lora_config())
        unknown = model.load_state_dict(adapters, strict=False).unexpected_keys
        if unknown:
            raise SpinError(f"LoRA weights do not fit a fresh adapter model: {unknown[:3]}")
        return model.merge_and_unload()

    def publish(self, engine, pairs: list[Pair], history: dict, model_dir: Path) -> None:
        import deepspeed

        store, t = self.ctx.store, self.t
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "model"
            adapters = self.adapter_weights(engine) if self.tr.lora is not None else None
            module = engine.module
            params = list(module.parameters())
            zero3 = self.tr.zero_stage == 3 and adapters is None
            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else None
            with gather if gather is not None else contextlib.nullcontext():
                if self.rank == 0:
                    if adapters is not None:
                        module = self.merged_lora_model(model_dir, adapters)
                    # The checkpoint holds the training dtype's weights in that dtype (bf16 files for bf16 training).
                    state = {k: v.detach().to("cpu", self.dtype).clone() for k, v in module.state_dict().items()}
                    module.config.dtype = self.dtype
                    module.save_pretrained(out, state_dict=state, safe_serialization=True)
            if self.rank == 0:
                self.tokenizer.save_pretrained(out)
                for name in ("generation_config.json",):
                    if (model_dir / name).exists():
                        shutil.copyfile(model_dir / name, out / name)
                final = dict(history["epochs"][-1]) if history["epochs"] else {}
                final.pop("epoch", None)
                change, warnings = collapse_check(history["steps"], self.tr.collapse_warn_nats, t)
                gap = history["steps"][0].get("check/step0_max_logp_gap_per_token") if history["steps"] else None
                if gap is not None and not self.warnings:  # a resumed run: the first attempt took step 0
                    self.step0_check(gap)
                warnings = self.warnings + warnings
                final.update(
                    {
                        **self.pair_stats,
                        **change,
                        **({"check/step0_max_logp_gap_per_token": gap} if gap is not None else {}),
                        "opponent/iterates": len(self.weights),
                        "steps": history["steps"][-1]["step"] if history["steps"] else 0,
                    }
                )
                for warning in warnings[len(self.warnings) :]:
                    self.log(f"warning: {warning}")
                metrics = {
                    **history,
                    "final": final,
                    "iteration": t,
                    "variant": self.variant,
                    "dtype": str(self.dtype).removeprefix("torch."),
                    "warnings": warnings,
                }
                (out / "spin_metrics.json").write_text(json.dumps(metrics))
                store.publish(layout.checkpoint(t), out, meta={"iteration": t, "final": final})
                publish_metrics(store, t, metrics)
                for step in self.committed_states():
                    self.delete_state(step)
                summary = {
                    "iteration": t,
                    "checkpoint": store.uri_of(layout.checkpoint(t)),
                    "metrics": {k: round(v, 6) for k, v in final.items() if isinstance(v, int | float)},
                    # Last: the operator keeps the tail of this line in status.
                    "variant": self.variant,
                    "warnings": warnings,
                }
                write_termination_message(summary)  # the operator copies it into the run's status
                print(json.dumps(summary), flush=True)
        barrier()


def publish_metrics(store, t: int, metrics: dict) -> None:
    """iter-<t>/metrics.json, after the model (which carries a copy): a retry may find it already there."""
    with contextlib.suppress(AlreadyPublished):
        store.publish_json(layout.metrics(t), metrics)

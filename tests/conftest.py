"""Test-wide settings. Fixtures live in tests/fixtures/ (one module per concern) and are loaded here."""

import os
from pathlib import Path

from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent

# Nothing may come from a model hub; vLLM and DeepSpeed run on the CPU (see README, "Running on CPU").
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SPIN_CACHE_DIR", str(ROOT / ".cache" / "spin-tests"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Property tests: CI replays the same examples every run (a landing must not hinge on the draw); locally each run
# explores anew, and what it finds is kept in .hypothesis/ and replayed first.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.models",
    "tests.fixtures.helm",
    "tests.fixtures.kube",
    "tests.fixtures.cluster",
]

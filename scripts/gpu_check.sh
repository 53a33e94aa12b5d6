#!/usr/bin/env bash
# `make gpu-check`: one short run on one GPU. A few bf16 preference-training steps of a 7B-architecture
# model (tokens/s, MFU with attention, peak memory); the packed log-prob forward against a plain Hugging
# Face forward (sliding window shorter than the sequences, fp32 tolerance); a 2-layer Mistral-architecture
# model through hardware=deepspeed_zero3 (fit, gather, save, reload, logits parity, generation) and the
# default experiment end to end under ZeRO-3. Prints one JSON line; exits 1 when a check fails.
# Arguments go to `python -m alignexp.gpu_check` (e.g. --layers 4 --lora-r 16; --help lists them).
# See docs/scale.md.
#
# Runs from the repository without installing alignexp. A machine with only torch is made ready by
# `bash scripts/gpu_setup.sh` (make gpu-setup); the check names every package it still lacks, at once,
# before it runs anything (exit 2). Wheels in .whl/ (or $GPU_CHECK_WHEELS), fetched elsewhere by
# `bash scripts/gpu_setup.sh download <python version>`, are installed into /tmp/site, with no index and
# no network, and put first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

shopt -s nullglob
wheels=("${GPU_CHECK_WHEELS:-.whl}"/*.whl)
if (( ${#wheels[@]} )); then
  PYTHON="$PY" GPU_SETUP_NO_CHECK=1 bash scripts/gpu_setup.sh install  # the check names what is missing
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The checkout itself, for the check and the `python -m alignexp.train` it starts (no install needed).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PY" -m alignexp.gpu_check "$@"

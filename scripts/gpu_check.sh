#!/usr/bin/env bash
# `make gpu-check`: one short run on one GPU. A few bf16 preference-training steps of a 7B-architecture
# model (tokens/s, MFU with attention, peak memory); the packed log-prob forward against a plain Hugging
# Face forward (sliding window shorter than the sequences, fp32 tolerance); a 2-layer Mistral-architecture
# model through hardware=deepspeed_zero3 (fit, gather, save, reload, logits parity, generation) and the
# default experiment end to end under ZeRO-3. Prints one JSON line; exits 1 when a check fails.
# Arguments go to `python -m alignexp.gpu_check` (e.g. --layers 4 --lora-r 16; --help lists them).
# See docs/scale.md.
#
# Runs from the repository without installing alignexp. Packages the machine lacks (DeepSpeed, and
# what it needs) can travel as wheels in .whl/ (or $GPU_CHECK_WHEELS): they are installed into
# /tmp/site, with no index and no network, and put first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

shopt -s nullglob
wheels=("${GPU_CHECK_WHEELS:-.whl}"/*.whl)
if (( ${#wheels[@]} )); then
  echo "[gpu_check] installing ${#wheels[@]} wheel(s) from ${GPU_CHECK_WHEELS:-.whl} into /tmp/site" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PY" -m alignexp.gpu_check "$@"

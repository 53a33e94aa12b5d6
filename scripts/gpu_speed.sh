#!/usr/bin/env bash
# One short run on one GPU (about 10 minutes on an H100/H200) for the speed figures of docs/benchmark.md:
#  1. the 7B-architecture preference step (Mistral-7B's layer dimensions, 8 layers, bf16, gradient
#     checkpointing as the 7B configs set it) with the padding-free shared-prefix forward, then with
#     the padded rows: tokens/s, MFU, peak memory (python -m alignexp.gpu_check --layout ...);
#  2. sampled tokens/s of vLLM beside alignexp's HF engine on the same model (python -m alignexp.bench.gpu_sampling;
#     vLLM's row says "skipped" where it does not import).
# Prints one JSON line per measurement; with OUT=<folder>, also writes them there. Arguments go to gpu_check.
# Every measurement runs even when one fails (a failed check does not stop the others); the script exits 1
# at the end, naming the failed ones.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="${OUT:-/tmp/alignexp-gpu-speed}"
mkdir -p "$OUT"
failed=()
for layout in padding-free padded; do
  bash scripts/gpu_check.sh --checkpointing --layout "$layout" --out "$OUT/step-$layout.json" "$@" \
    || failed+=("step-$layout")
done
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m alignexp.bench.gpu_sampling --out "$OUT/sampling.json" || failed+=(sampling)
if (( ${#failed[@]} )); then
  echo "[gpu_speed] FAILED: ${failed[*]} (the others ran; their records are in $OUT)" >&2
  exit 1
fi

#!/usr/bin/env bash
# `make gpu-setup`: make a GPU machine that has only torch ready for `make gpu-check` / `make gpu-speed`.
#
#   bash scripts/gpu_setup.sh                      on the GPU machine: installs what the check lacks
#                                                  (python -m alignexp.gpu_check.requirements missing). With wheels in
#                                                  .whl/ (or $GPU_CHECK_WHEELS), from them, with no index and
#                                                  no network, into /tmp/site (gpu_check.sh puts it first on
#                                                  PYTHONPATH); otherwise from the index into this Python.
#   bash scripts/gpu_setup.sh download [3.12]      on a machine with network and this repository's .venv:
#                                                  fills .whl/ with wheels of every package the check needs,
#                                                  with their dependencies, at the versions of .venv
#                                                  (python -m alignexp.gpu_check.requirements requirements), for the GPU
#                                                  machine's Python version (default: this one's), less torch.
#
# GPU_SETUP_DRY_RUN=1 prints the pip commands instead of running them. See docs/scale.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
WHEELS="${GPU_CHECK_WHEELS:-.whl}"
run() { if [[ -n "${GPU_SETUP_DRY_RUN:-}" ]]; then echo "$*"; else "$@"; fi; }

mode="${1:-install}"
case "$mode" in
  download)
    pyver="${2:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
    mkdir -p "$WHEELS"
    binary=() source_only=()
    while read -r req; do
      case "${req%%==*}" in
        deepspeed|antlr4-python3-runtime) source_only+=("$req") ;;
        *) binary+=("$req") ;;
      esac
    done < <("$PY" -m alignexp.gpu_check.requirements requirements)
    run "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d "$WHEELS" "${binary[@]}"
    # DeepSpeed and antlr4 (Hydra's parser) publish sources only: pure-Python wheels built here.
    run "$PY" -m pip wheel --no-deps -w "$WHEELS" "${source_only[@]}"
    echo "[gpu_setup] wheels for Python $pyver in $WHEELS: carry it with the repository to the GPU machine" >&2
    ;;
  install)
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    if (( ${#wheels[@]} )); then
      echo "[gpu_setup] installing ${#wheels[@]} wheel(s) from $WHEELS into /tmp/site" >&2
      run "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${wheels[@]}"
      export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
      read -r -a need < <("$PY" -m alignexp.gpu_check.requirements missing cuda; echo)
      need+=(hydra-core)
      echo "[gpu_setup] installing from the index: ${need[*]}" >&2
      run "$PY" -m pip install -q "${need[@]}"
    fi
    left="$("$PY" -m alignexp.gpu_check.requirements missing cuda)"
    if [[ -n "$left" && -z "${GPU_SETUP_DRY_RUN:-}${GPU_SETUP_NO_CHECK:-}" ]]; then
      echo "[gpu_setup] still missing: $left" >&2
      exit 1
    fi
    ;;
  *)
    echo "usage: bash scripts/gpu_setup.sh [install | download [python version]]" >&2
    exit 2
    ;;
esac

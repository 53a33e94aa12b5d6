#!/usr/bin/env bash
# The reward/KL frontier on the synthetic task: the RL-free objectives over beta, ranked DPO over
# ranking length, the reference-free listwise losses, and best-of-N (conf/experiment/frontier/), then one report.
# Usage: bash experiments/frontier/run.sh [OUT]   (about 10 minutes on 2 CPU cores, SFT policy cached)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-multirun/frontier}
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
for sweep in beta ranking_length listwise best_of_n; do
  $PY -m alignexp.train -m experiment=frontier/$sweep hydra.sweep.dir="$OUT/$sweep"
done
$PY -m alignexp.report "$OUT" --out experiments/frontier/report

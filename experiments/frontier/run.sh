#!/usr/bin/env bash
# The reward/KL frontier on the synthetic task: the RL-free objectives over beta, ranked DPO over
# ranking length, the reference-free listwise losses, and best-of-N, then one report.
# Usage: bash experiments/frontier/run.sh [OUT]   (about 10 minutes on 2 CPU cores, SFT policy cached)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-multirun/frontier}
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
$PY -m alignexp.train -m loss=dpo,ranked_dpo,ipo loss.beta=0.05,0.1,0.5 hydra.sweep.dir="$OUT/beta"
$PY -m alignexp.train -m loss=ranked_dpo task.ranking_length=2,3 hydra.sweep.dir="$OUT/ranking_length"
$PY -m alignexp.train -m loss=pro,rrhf,slic hydra.sweep.dir="$OUT/listwise"
$PY -m alignexp.train -m sampler=best_of_n sampler.n=4,16 hydra.sweep.dir="$OUT/best_of_n"
$PY -m alignexp.report "$OUT" --out experiments/frontier/report

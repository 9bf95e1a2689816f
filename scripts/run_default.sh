#!/usr/bin/env bash
# Sets up .venv and runs the main job on the built-in synthetic dataset:
# contrastive training, then the zero-shot kNN evaluation of redshift and stellar mass.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workdir="${1:-runs/default}"
.venv/bin/python main.py --config=configs/spender.py --mode=train --workdir="$workdir"
.venv/bin/python main.py --config=configs/spender.py --mode=eval_knn --workdir="$workdir"

#!/usr/bin/env bash
# efficientnet-b0 training, AMP, CPU (1 process), 400 epochs.
# Usage: bash efficientnet/training/AMP/CPU_efficientnet-b0_AMP.sh [WORKSPACE] [main.py flags...]   (dataset: $DATA_DIR, default /imagenet)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
"${PYTHON:-python}" "$ROOT/multiproc.py" --nproc_per_node 1 "$ROOT/launch.py" --model efficientnet-b0 --precision AMP --mode convergence --platform CPU "${DATA_DIR:-/imagenet}" --workspace "${1:-./}" --raport-file raport.json "${@:2}"

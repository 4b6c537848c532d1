#!/usr/bin/env bash
# efficientnet-widese-b4 training, AMP, DGXA100 (8 processes), 400 epochs.
# Usage: bash efficientnet/training/AMP/DGXA100_efficientnet-widese-b4_AMP.sh [WORKSPACE] [main.py flags...]   (dataset: $DATA_DIR, default /imagenet)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
"${PYTHON:-python}" "$ROOT/multiproc.py" --nproc_per_node 8 "$ROOT/launch.py" --model efficientnet-widese-b4 --precision AMP --mode convergence --platform DGXA100 "${DATA_DIR:-/imagenet}" --workspace "${1:-./}" --raport-file raport.json "${@:2}"

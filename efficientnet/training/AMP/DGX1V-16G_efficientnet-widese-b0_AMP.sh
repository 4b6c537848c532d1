#!/usr/bin/env bash
# efficientnet-widese-b0 training, AMP, DGX1V-16G (8 processes), 400 epochs.
# Usage: bash efficientnet/training/AMP/DGX1V-16G_efficientnet-widese-b0_AMP.sh [WORKSPACE] [main.py flags...]   (dataset: $DATA_DIR, default /imagenet)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
"${PYTHON:-python}" "$ROOT/multiproc.py" --nproc_per_node 8 "$ROOT/launch.py" --model efficientnet-widese-b0 --precision AMP --mode convergence --platform DGX1V-16G "${DATA_DIR:-/imagenet}" --workspace "${1:-./}" --raport-file raport.json "${@:2}"

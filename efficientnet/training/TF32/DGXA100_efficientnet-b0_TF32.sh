#!/usr/bin/env bash
# efficientnet-b0 training, TF32, DGXA100 (8 processes), 400 epochs.
# Usage: bash efficientnet/training/TF32/DGXA100_efficientnet-b0_TF32.sh [WORKSPACE] [main.py flags...]   (dataset: $DATA_DIR, default /imagenet)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
"${PYTHON:-python}" "$ROOT/multiproc.py" --nproc_per_node 8 "$ROOT/launch.py" --model efficientnet-b0 --precision TF32 --mode convergence --platform DGXA100 "${DATA_DIR:-/imagenet}" --workspace "${1:-./}" --raport-file raport.json "${@:2}"

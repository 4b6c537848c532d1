#!/usr/bin/env bash
# ResNeXt-101 32x4d training, AMP, DGXA100 (8 processes), 90 epochs, no mixup.
# Usage: bash resnext101-32x4d/training/AMP/DGXA100_resnext101-32x4d_AMP_90E.sh [WORKSPACE] [main.py flags...]   (dataset: $DATA_DIR, default /imagenet)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
"${PYTHON:-python}" "$ROOT/multiproc.py" --nproc_per_node 8 "$ROOT/launch.py" --model resnext101-32x4d --precision AMP --mode convergence --platform DGXA100 "${DATA_DIR:-/imagenet}" --epochs 90 --mixup 0.0 --workspace "${1:-./}" --raport-file raport.json "${@:2}"

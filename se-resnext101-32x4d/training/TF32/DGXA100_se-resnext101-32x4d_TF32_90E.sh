#!/usr/bin/env bash
# SE-ResNeXt-101 32x4d training, TF32, DGXA100 (8 processes), 90 epochs, no mixup.
# Usage: bash se-resnext101-32x4d/training/TF32/DGXA100_se-resnext101-32x4d_TF32_90E.sh [WORKSPACE] [main.py flags...]   (dataset: $DATA_DIR, default /imagenet)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
"${PYTHON:-python}" "$ROOT/multiproc.py" --nproc_per_node 8 "$ROOT/launch.py" --model se-resnext101-32x4d --precision TF32 --mode convergence --platform DGXA100 "${DATA_DIR:-/imagenet}" --epochs 90 --mixup 0.0 --workspace "${1:-./}" --raport-file raport.json "${@:2}"

#!/usr/bin/env bash
# SE-ResNeXt-101 32x4d training, AMP, DGXA100 (8 processes), 250 epochs, mixup 0.2.
# Usage: bash se-resnext101-32x4d/training/AMP/DGXA100_se-resnext101-32x4d_AMP_250E.sh [WORKSPACE] [main.py flags...]   (dataset: $DATA_DIR, default /imagenet)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
"${PYTHON:-python}" "$ROOT/multiproc.py" --nproc_per_node 8 "$ROOT/launch.py" --model se-resnext101-32x4d --precision AMP --mode convergence --platform DGXA100 "${DATA_DIR:-/imagenet}" --workspace "${1:-./}" --raport-file raport.json "${@:2}"

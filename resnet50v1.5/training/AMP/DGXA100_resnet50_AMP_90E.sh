#!/usr/bin/env bash
# ResNet-50 v1.5 training, AMP, DGXA100 (8 processes), 90 epochs, no mixup.
# Usage: bash resnet50v1.5/training/AMP/DGXA100_resnet50_AMP_90E.sh [WORKSPACE] [main.py flags...]   (dataset: $DATA_DIR, default /imagenet)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
"${PYTHON:-python}" "$ROOT/multiproc.py" --nproc_per_node 8 "$ROOT/launch.py" --model resnet50 --precision AMP --mode convergence --platform DGXA100 "${DATA_DIR:-/imagenet}" --epochs 90 --mixup 0.0 --workspace "${1:-./}" --raport-file raport.json "${@:2}"

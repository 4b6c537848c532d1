#!/usr/bin/env bash
# ResNet-50 v1.5 training, TF32, DGXA100 (8 processes), 250 epochs, mixup 0.2.
# Usage: bash resnet50v1.5/training/TF32/DGXA100_resnet50_TF32_250E.sh [WORKSPACE] [main.py flags...]   (dataset: $DATA_DIR, default /imagenet)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
"${PYTHON:-python}" "$ROOT/multiproc.py" --nproc_per_node 8 "$ROOT/launch.py" --model resnet50 --precision TF32 --mode convergence --platform DGXA100 "${DATA_DIR:-/imagenet}" --workspace "${1:-./}" --raport-file raport.json "${@:2}"

#!/usr/bin/env bash
# ResNet-50 v1.5 training, FP32, DGX2V (8 processes), 250 epochs, mixup 0.2.
# Usage: bash resnet50v1.5/training/FP32/DGX2V_resnet50_FP32_250E.sh [WORKSPACE] [main.py flags...]   (dataset: $DATA_DIR, default /imagenet)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
"${PYTHON:-python}" "$ROOT/multiproc.py" --nproc_per_node 8 "$ROOT/launch.py" --model resnet50 --precision FP32 --mode convergence --platform DGX2V "${DATA_DIR:-/imagenet}" --workspace "${1:-./}" --raport-file raport.json "${@:2}"

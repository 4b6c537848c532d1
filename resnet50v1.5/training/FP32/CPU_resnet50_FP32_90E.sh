#!/usr/bin/env bash
# ResNet-50 v1.5 training, FP32, CPU (1 process), 90 epochs, no mixup.
# Usage: bash resnet50v1.5/training/FP32/CPU_resnet50_FP32_90E.sh [WORKSPACE] [main.py flags...]   (dataset: $DATA_DIR, default /imagenet)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
"${PYTHON:-python}" "$ROOT/multiproc.py" --nproc_per_node 1 "$ROOT/launch.py" --model resnet50 --precision FP32 --mode convergence --platform CPU "${DATA_DIR:-/imagenet}" --epochs 90 --mixup 0.0 --workspace "${1:-./}" --raport-file raport.json "${@:2}"

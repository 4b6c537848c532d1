#!/usr/bin/env bash
# efficientnet-quant-b4 quantization-aware training, FP32, DGX1V-32G (8 processes), 2 epochs from trained B4 weights.
# Usage: bash efficientnet/quantization/DGX1V-32G_efficientnet-quant-b4_FP32.sh B4_WEIGHTS [WORKSPACE] [quant_main.py flags...]   (dataset: $DATA_DIR, default /imagenet)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${1:?usage: $0 B4_WEIGHTS [WORKSPACE] [quant_main.py flags...]}"
"${PYTHON:-python}" "$ROOT/multiproc.py" --nproc_per_node 8 "$ROOT/quant_main.py" --arch efficientnet-quant-b4 --pretrained-from-file "$1" --epochs 2 -j 8 -b 32 --optimizer rmsprop --lr 4.09e-06 --rmsprop-alpha 0.853 --rmsprop-eps 0.00422 --momentum 0.9 --weight-decay 9.714e-04 --lr-schedule linear "${DATA_DIR:-/imagenet}" --workspace "${2:-./}" --raport-file raport.json "${@:3}"

#!/usr/bin/env bash
# efficientnet-quant-b0 quantization-aware training, FP32, DGX1V-32G (8 processes), 10 epochs from trained B0 weights.
# Usage: bash efficientnet/quantization/DGX1V-32G_efficientnet-quant-b0_FP32.sh B0_WEIGHTS [WORKSPACE] [quant_main.py flags...]   (dataset: $DATA_DIR, default /imagenet)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${1:?usage: $0 B0_WEIGHTS [WORKSPACE] [quant_main.py flags...]}"
"${PYTHON:-python}" "$ROOT/multiproc.py" --nproc_per_node 8 "$ROOT/quant_main.py" --arch efficientnet-quant-b0 --pretrained-from-file "$1" --epochs 10 -j 8 -b 128 --optimizer sgd --lr 0.0125 --momentum 0.89 --weight-decay 4.5e-05 --lr-schedule cosine "${DATA_DIR:-/imagenet}" --workspace "${2:-./}" --raport-file raport.json "${@:3}"

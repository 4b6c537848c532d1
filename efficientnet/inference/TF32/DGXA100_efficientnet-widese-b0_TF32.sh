#!/usr/bin/env bash
# efficientnet-widese-b0 inference benchmark, TF32, DGXA100 (8 processes): one run per batch size, raport_<bs>.json.
# Usage: bash efficientnet/inference/TF32/DGXA100_efficientnet-widese-b0_TF32.sh [WORKSPACE] [main.py flags...]   (dataset: $DATA_DIR, default /imagenet)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
for bs in 1 2 4 8 16 32 64 128 256; do
    "${PYTHON:-python}" "$ROOT/multiproc.py" --nproc_per_node 8 "$ROOT/launch.py" --model efficientnet-widese-b0 --precision TF32 --mode benchmark_inference --platform DGXA100 "${DATA_DIR:-/imagenet}" -b $bs --workspace "${1:-./}" --raport-file raport_$bs.json "${@:2}"
done

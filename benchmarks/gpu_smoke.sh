#!/usr/bin/env bash
# GPU smoke check: every CUDA path once (compiled training too), one PASSED / FAILED / SKIPPED line each
# (a few minutes), after one line naming the machine.
# The checks are tests/test_gpu_smoke.py (pytest marker "gpu"); extra arguments go to pytest.
#   bash benchmarks/gpu_smoke.sh                # on a host
#   docker run --gpus all --rm convnets bash benchmarks/gpu_smoke.sh   # in the image (see README)
# Without a CUDA device it prints one line and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu smoke: no CUDA device visible; nothing to check (pass)"
    exit 0
fi
python -c "from image_classification.machine import describe; print(describe())"
exec python -m pytest -m gpu -v --no-header -p no:cacheprovider tests/test_gpu_smoke.py "$@"

#!/usr/bin/env bash
# The name the reference README gives DGX1V_resnet50_AMP_250E.sh: the same recipe, same arguments.
# Usage: bash resnet50v1.5/training/AMP/DGX1_resnet50_AMP_250E.sh [WORKSPACE] [main.py flags...]   (dataset: $DATA_DIR, default /imagenet)
exec bash "$(dirname "${BASH_SOURCE[0]}")/DGX1V_resnet50_AMP_250E.sh" "$@"

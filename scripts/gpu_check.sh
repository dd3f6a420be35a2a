#!/usr/bin/env bash
# The prepared GPU check (issue #7): under 5 minutes on one H100/H200, no Ray needed.
# Usage on the GPU box, from the repo root, with the project's deps installed:
#   bash scripts/gpu_check.sh [OUT_DIR]
set -euo pipefail
OUT="${1:-${OUT:-.}}"
PY="${PYTHON:-python}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
timeout 280 "$PY" scripts/gpu_check.py --model hybrid_base --img-size 224 --batch 128 --steps 30 \
    --out "$OUT/gpu_check.json"

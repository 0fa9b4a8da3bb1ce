#!/usr/bin/env bash
# One-GPU check (< 5 minutes): ViT-B/16 SLIP, bf16, the largest batch that fits, 50 timed
# steps after warm-up, JAX vs PyTorch AMP; prints img/s, step time, peak memory and MFU.
#
#   bash tools/gpu_check.sh [OUT.json] [extra tools/benchmarks/gpu.py flags]
#   bash tools/gpu_check.sh /tmp/gpu.json --batches 256 128 64
#   bash tools/gpu_check.sh /tmp/smoke.json --smoke          # the CPU path, tiny settings
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check.json}"
shift || true
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
fi
# The interpreter that has both JAX and PyTorch (`python3` on images that lack `python`).
PY="${PYTHON:-$(command -v python || command -v python3)}"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
start=$(date +%s)
timeout "${GPU_CHECK_TIMEOUT:-290}" "$PY" tools/benchmarks/gpu.py --out "$OUT" "$@"
echo "wrote $OUT in $(( $(date +%s) - start )) s"

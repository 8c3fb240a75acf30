#!/usr/bin/env bash
# GPU check at real sizes (bf16, random weights): teacher forward throughput, student training-step
# throughput and MFU, written to OUT_DIR/results.json and OUT_DIR/results.md.
#
#   benchmarks/gpu_check.sh OUT_DIR [--student-batch 24 --crop-seconds 6 ...]   # options: gpu_check.py --help
#   PEAK_TFLOPS=756 benchmarks/gpu_check.sh OUT_DIR                            # a peak the table does not know
#
# Without CUDA it runs the same code once on tiny configs on the CPU and records
# "cuda: not available, GPU measurements skipped" (exit 0). Python: $PYTHON, else the checkout's
# .venv, else python3. The package is imported from the checkout (no install needed), but its
# dependencies must be there: on a bare CUDA image with torch + transformers + accelerate, add
# omegaconf, antlr4-python3-runtime, datasets (+ dill, multiprocess), soundfile and soxr.
set -euo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: $0 OUT_DIR [gpu_check.py options]" >&2
    exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$1"
shift
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec "$PYTHON" "$root/benchmarks/gpu_check.py" "$out" "$@"

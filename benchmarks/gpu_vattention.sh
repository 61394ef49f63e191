#!/usr/bin/env bash
# The GPU checks for vAttention in one run (a few minutes on an H100/H200): the CUDA
# backend's tests, then benchmarks/vattention.py.
#   bash benchmarks/gpu_vattention.sh OUTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_site.sh "$@"
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_vattention_gpu.py 2>&1 \
  | tee "$out/vattention-tests.txt"
timeout 240 python benchmarks/vattention.py --out "$out" 2>&1 | tee "$out/vattention-bench.txt"

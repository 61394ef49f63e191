#!/usr/bin/env bash
# The GPU checks for vAttention in one run (a few minutes on an H100/H200): the CUDA
# backend's tests, then benchmarks/vattention.py. For the lent GPU machine, whose image
# has torch, Triton, cuda-bindings and pytest but no network and no vLLM: the package is
# put on PYTHONPATH as it installs (allocators/ and kernels/ inside vllm_ext/).
#   bash benchmarks/gpu_vattention.sh OUTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
site="$(mktemp -d)"
cp -r vllm_ext "$site/vllm_ext"
for d in schedulers kernels allocators patches; do cp -r "$d" "$site/vllm_ext/$d"; done
export PYTHONPATH="$site"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_vattention_gpu.py 2>&1 \
  | tee "$out/vattention-tests.txt"
timeout 240 python benchmarks/vattention.py --out "$out" 2>&1 | tee "$out/vattention-bench.txt"

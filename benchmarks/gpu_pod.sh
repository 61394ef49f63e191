#!/usr/bin/env bash
# The GPU checks for POD-Attention in one run (at most ~8 minutes on an H100/H200):
# the kernel tests compiled for CUDA, then the benchmark sweep. For the lent GPU
# machine, whose image has torch, Triton and pytest but no network and no vLLM: the
# package is put on PYTHONPATH as it installs (kernels/ inside vllm_ext/), not installed.
#   bash benchmarks/gpu_pod.sh OUTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
site="$(mktemp -d)"
cp -r vllm_ext "$site/vllm_ext"
for d in schedulers kernels allocators patches; do cp -r "$d" "$site/vllm_ext/$d"; done
export PYTHONPATH="$site"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
timeout 180 python -m pytest -q -p no:cacheprovider tests/test_pod_kernel.py 2>&1 | tee "$out/pod-tests.txt"
timeout 300 python benchmarks/pod.py --out "$out" 2>&1 | tee "$out/pod-bench.txt"

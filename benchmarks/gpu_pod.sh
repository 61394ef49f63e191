#!/usr/bin/env bash
# The GPU checks for POD-Attention in one run (at most ~8 minutes on an H100/H200):
# the kernel tests compiled for CUDA, then the benchmark sweep.
#   bash benchmarks/gpu_pod.sh OUTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_site.sh "$@"
timeout 180 python -m pytest -q -p no:cacheprovider tests/test_pod_kernel.py 2>&1 | tee "$out/pod-tests.txt"
timeout 300 python benchmarks/pod.py --out "$out" 2>&1 | tee "$out/pod-bench.txt"

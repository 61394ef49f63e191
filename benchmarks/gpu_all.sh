#!/usr/bin/env bash
# Every GPU check of the project in one run, within 8 minutes on one H100/H200 whose
# image has torch (CUDA), Triton, cuda-bindings and pytest but no vLLM and no network:
#   bash benchmarks/gpu_all.sh OUT
# 1. the POD kernel compiled, against the PyTorch reference: mixed batches of awkward
#    shapes, NaN-poisoned outputs, split merges over 300 launches, two streams at once,
#    one rank's KV shard (--kvp);
#    the vAttention pool's CUDA backend (memory follows mapped pages, no copies, zeroed
#    pages, reused handles);
# 2. the POD sweep: one fused launch against two launches and each half alone;
# 3. the vAttention pool: map/unmap latency per page size and the zero-fill's share,
#    decode attention over pool tensors against a plain allocation, memory against live
#    tokens, maps on the critical path.
# Each part has its own time limit (450 s in all) and the run goes on past a failed part;
# OUT/status.txt says how each ended. Results: OUT/*.md, *.json, *.png, logs (the POD
# sweep writes its table after every point, so a part cut short keeps what it measured).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
# The package goes on PYTHONPATH laid out as it installs (the root folders inside
# vllm_ext/), not installed: the image has no network.
site="$(mktemp -d)"
cp -r vllm_ext "$site/vllm_ext"
for d in schedulers kernels allocators patches; do rm -f "$site/vllm_ext/$d"; cp -r "$d" "$site/vllm_ext/$d"; done
export PYTHONPATH="$site:$PWD/tests" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$out/gpu.txt"
: > "$out/status.txt"
part() {  # name, seconds, command...
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$out/status.txt"
  tail -n 5 "$out/$name.log"
}
part tests 150 python -m pytest -q -p no:cacheprovider -m gpu tests/test_pod_kernel.py \
  tests/test_vattention_gpu.py
part tests-shapes 80 python -m pytest -q -p no:cacheprovider tests/test_pod_kernel.py \
  tests/test_kvp_shards.py -k "batches or dtypes or split or kernel_attends"
part pod-sweep 120 python benchmarks/pod.py --out "$out"
part vattention 100 python benchmarks/vattention.py --out "$out"
echo "total $SECONDS s" | tee -a "$out/status.txt"

#!/usr/bin/env bash
# Every GPU check of the project in one run, within 8 minutes on one H100/H200 whose
# image has torch (CUDA), Triton, cuda-bindings, nvcc and pytest but no vLLM and no
# network:
#   bash benchmarks/gpu_wheels.sh          (here, once: FlashInfer for part 5; optional)
#   bash benchmarks/gpu_all.sh OUT         (there, with .whl carried)
# In order, what could stop everything else first:
# 1. smoke: the vAttention pool's tensor over a fresh reservation, and one compiled POD
#    launch against the reference;
# 2. serving: a captured decode-step CUDA graph replayed for batches written in place
#    (equal to the reference), the kernel builds over a serving-like sweep of random
#    batches (one per model), and the pool asked for more physical memory than the
#    device has (it keeps what it got, maps up to it, refuses past it, nothing crashes);
# 3. tests: the rest of the GPU tests (split merges over 300 launches, two streams, the
#    pool's CUDA backend: memory follows mapped pages, no copies, reused handles);
# 4. shapes: the kernel tests' mixed batches, dtypes and split merges, compiled;
# 5. pod-sweep: one fused launch against two launches and each half alone;
# 6. flashinfer: FlashInfer's POD wrapper beside ours on the sweep's batches, where its
#    wheels came along (.whl/, from benchmarks/gpu_wheels.sh);
# 7. vattention: map/unmap latency per page size, attention over pool tensors against a
#    plain allocation, memory against live tokens, maps on the critical path.
# Each part has its own limit, cut to what is left of the 470 s the run allows, and the
# run goes on past a failed part; OUT/status.txt says how each ended. Results: OUT/*.md,
# *.json, *.png and a log per part (the sweeps write their tables after every point, so a
# part cut short keeps what it measured).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
BUDGET=470
# The package goes on PYTHONPATH laid out as it installs (the root folders inside
# vllm_ext/), not installed: the image has no network.
site="$(mktemp -d)"
cp -r vllm_ext "$site/vllm_ext"
for d in schedulers kernels allocators patches; do rm -f "$site/vllm_ext/$d"; cp -r "$d" "$site/vllm_ext/$d"; done
if compgen -G ".whl/*.whl" > /dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    .whl/*.whl 2>&1 | tail -n 2
fi
export PYTHONPATH="$site:$PWD/tests:$PWD/benchmarks" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$out/gpu.txt"
: > "$out/status.txt"
part() {  # name, seconds, command...
  local name="$1" limit="$2"; shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 15)); then
    echo "$name: skipped, the run's $BUDGET s are spent" | tee -a "$out/status.txt"
    return
  fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$out/status.txt"
  tail -n 5 "$out/$name.log"
}
pytest=(python -m pytest -q -p no:cacheprovider)
serving="graph_replays or serving_sweep or more_physical"
part smoke 60 "${pytest[@]}" -x -m gpu tests/test_vattention_gpu.py tests/test_pod_kernel.py \
  -k "first_call or llama3_8b_shapes_compiled"
part serving 90 "${pytest[@]}" -m gpu tests/test_pod_kernel.py tests/test_vattention_gpu.py \
  -k "$serving"
part tests 90 "${pytest[@]}" -m gpu tests/test_pod_kernel.py tests/test_vattention_gpu.py \
  -k "not (first_call or llama3_8b_shapes_compiled or $serving)"
part shapes 50 "${pytest[@]}" tests/test_pod_kernel.py tests/test_kvp_shards.py \
  -k "batches or dtypes or split or kernel_attends"
part pod-sweep 80 python benchmarks/pod.py --out "$out"
part flashinfer 50 python benchmarks/flashinfer_pod.py --quick --out "$out"
part vattention 50 python benchmarks/vattention.py --out "$out"
echo "total $SECONDS s" | tee -a "$out/status.txt"

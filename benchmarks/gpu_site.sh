# Sourced by the gpu_*.sh scripts: the lent GPU machine's image has torch, Triton,
# cuda-bindings and pytest but no network and no vLLM, so the package goes on PYTHONPATH
# laid out as it installs (the root folders inside vllm_ext/), not installed. Sets $out.
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
site="$(mktemp -d)"
cp -r vllm_ext "$site/vllm_ext"
for d in schedulers kernels allocators patches; do cp -r "$d" "$site/vllm_ext/$d"; done
export PYTHONPATH="$site"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"

"""`--attn pod` as vLLM attention backends: `backends` (the class for each platform,
registered as vLLM's CUSTOM backend in every process), `support` (what it can run, said
once for both), `cpu` (the CPU platform's backend) and `cuda` (CUDA's: the metadata
builder plans, the kernel in `vllm_ext.kernels.pod` runs)."""

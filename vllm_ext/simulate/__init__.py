"""`vllm-ext simulate`: vLLM's own scheduler on a virtual clock (see docs/simulate.md)."""

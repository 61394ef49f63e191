"""`vllm-ext simulate`: vLLM's own scheduler on a virtual clock (see README, "Simulate")."""

"""The `vllm-ext` command and what it runs for a person or a test, never for vLLM:
`cli` (the command), `doctor`, `profile`, `demo`, `models` (synthetic models),
`serve` (a real `vllm serve` on 127.0.0.1), `driver` (vLLM's scheduler stepped without a
model) and `compat` (the compatibility matrix)."""

"""Triton kernels with plain-PyTorch references beside them (`vllm_ext.kernels.reference`).

- `pod_attention`: POD-Attention, a hybrid prefill+decode batch over vLLM's paged KV
  cache in one launch (`vllm_ext.kernels.pod` holds the kernel, its planner and limits).

Imported lazily, so `import vllm_ext.kernels` needs neither torch nor Triton.
"""

from __future__ import annotations

__all__ = ["pod_attention"]


def __getattr__(name: str):
    if name == "pod_attention":
        from vllm_ext.kernels.pod import pod_attention

        return pod_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

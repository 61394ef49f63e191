"""KV-cache memory backends: vAttention's virtual KV memory with physical pages on demand.

- `VirtualKVPool` (`pool.py`): contiguous per-layer KV tensors over a reserved
  virtual range; pages mapped and unmapped by index, byte range or block range,
  synchronously or on a background thread, optionally onto physical memory set
  aside up front.
- Physical backends with one protocol: `host.HostBackend` (CPU memory, mmap/madvise)
  and `cuda.CudaBackend` (CUDA VMM through cuda-python).
- `PagePlanner` (`pages.py`): which pages a set of live KV blocks needs, which free
  block to hand out next so memory stays compact, and the map/unmap orders that
  follow, with look-ahead mapping, deferred reclamation and a physical cap.

Nothing here imports vLLM; the engine glue is `vllm_ext.engine.vattention`.
"""

from __future__ import annotations

from vllm_ext.allocators.errors import DriverError, KVPoolError, PhysicalMemoryError

__all__ = ["DriverError", "KVPoolError", "PagePlanner", "PhysicalMemoryError", "VirtualKVPool"]


def __getattr__(name: str):
    if name == "VirtualKVPool":
        from vllm_ext.allocators.pool import VirtualKVPool

        return VirtualKVPool
    if name == "PagePlanner":
        from vllm_ext.allocators.pages import PagePlanner

        return PagePlanner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

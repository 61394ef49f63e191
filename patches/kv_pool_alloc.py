"""Patch: with `--kv-allocator vattention`, the worker's KV cache lives in a VirtualKVPool.

vLLM 0.32 allocates all KV memory in `allocate_kv_cache` (one zeroed buffer, then a
view per layer) and has no hook to supply that memory.

Invariant bent: the KV buffer is one physical allocation, mapped and zeroed up
front. Safe because the views keep vLLM's shapes and per-block strides (only each
layer's start moves, to a page boundary); vLLM already zeroes every block it hands
out before first use (`new_block_ids_to_zero`), so nothing relied on the up-front
zeroing; and every block the scheduler hands out is in a page mapped before the
step that uses it runs (see `vllm_ext.vattention`). Without the flag the original
function runs unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_ext import envs
from vllm_ext.patches.base import Patch


class KVPoolAlloc(Patch):
    name = "kv_pool_alloc"
    target = "vllm.v1.worker.gpu_model_runner:allocate_kv_cache"
    vllm_versions = SpecifierSet(">=0.32,<0.33")

    def _apply(self, owner: Any, attr: str, original: Any) -> None:
        @functools.wraps(original)
        def allocate_kv_cache(kv_cache_config, device, layout, kernel_block_sizes=None):
            if not envs.kv_pool_selected():
                return original(kv_cache_config, device, layout, kernel_block_sizes)
            from vllm_ext import vattention

            return vattention.allocate_kv_cache(kv_cache_config, device, layout,
                                                kernel_block_sizes, vattention.selected())

        setattr(owner, attr, allocate_kv_cache)

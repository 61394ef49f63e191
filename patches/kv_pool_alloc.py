"""Patch: with `--kv-allocator vattention`, an engine's KV cache lives in a VirtualKVPool.

vLLM 0.32 allocates all KV memory in `allocate_kv_cache` (one zeroed buffer, then a
view per layer) and has no hook to supply that memory. Both model runners import the
function under their own name, the V1 runner (`gpu_model_runner`, which the CPU runner
inherits) and the V2 runner (`gpu/attn_utils`, CUDA's default), so both names are
wrapped. The engine is told apart by the config vLLM sets around the allocation.

Invariant bent: the KV buffer is one physical allocation, mapped and zeroed up
front. Safe because the views keep vLLM's shapes and per-block strides (only each
layer's start moves, to a page boundary); vLLM zeroes every block it hands out before
first use (`new_block_ids_to_zero`) for the layouts vattention accepts; and every
block the scheduler hands out is in a page mapped before the step that uses it runs
(see `vllm_ext.vattention`). For other engines the original function runs unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_ext.patches.base import Patch, Target

_PARAMS = ("kv_cache_config", "device", "layout", "kernel_block_sizes")


class KVPoolAlloc(Patch):
    """vattention: the worker's KV memory in a VirtualKVPool (both model runners)"""

    name = "kv_pool_alloc"
    targets = (Target("vllm.v1.worker.gpu_model_runner:allocate_kv_cache", _PARAMS),
               Target("vllm.v1.worker.gpu.attn_utils:allocate_kv_cache", _PARAMS),
               Target("vllm.v1.kv_cache_interface:create_kv_cache_views",
                      ("raw", "spec", "num_blocks", "layout", "kv_cache_tensor",
                       "kernel_block_size")))
    replaces = 2
    vllm_versions = SpecifierSet(">=0.32,<0.33")
    components = ("kv_allocator=vattention",)

    def wrap(self, original: Any) -> Any:
        @functools.wraps(original)
        def allocate_kv_cache(kv_cache_config, device, layout, kernel_block_sizes=None):
            from vllm.config import get_current_vllm_config_or_none

            from vllm_ext import vattention

            config = get_current_vllm_config_or_none()
            settings = vattention.settings_for(config)
            if settings is None:
                return original(kv_cache_config, device, layout, kernel_block_sizes)
            self.reached()
            return vattention.allocate_kv_cache(config, kv_cache_config, device, layout,
                                                kernel_block_sizes, settings)

        return allocate_kv_cache

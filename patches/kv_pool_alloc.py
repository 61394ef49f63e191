"""Patch: with `--kv-allocator vattention`, an engine's KV cache lives in a VirtualKVPool.

vLLM allocates all KV memory in `allocate_kv_cache` (one zeroed buffer, then a view
per layer). Up to 0.33 there is no hook to supply that memory, and both model runners
import the function under their own name: the V1 runner (`gpu_model_runner`, which the
CPU runner inherits) and the V2 runner (`gpu/attn_utils`, CUDA's default), so both
names are wrapped. 0.34 removed V1 and gave the function an `allocate(size)` hook, which
only its own extensible KV cache uses; its views are laid out over one buffer, while
the pool gives each layer its own page-aligned region, so the function is still
wrapped (V2's name) and vattention engines run with the extensible KV cache off (see
docs/vattention.md, "vAttention and vLLM 0.34's extensible KV cache"). The engine is told
apart by the config vLLM sets around the allocation.

Invariant bent: the KV buffer is one physical allocation, zeroed up front. Safe
because the views keep vLLM's shapes and per-block strides (only each layer's start
moves, to a page boundary); every block the scheduler hands out is in a page mapped
before the step that uses it runs (see `vllm_ext.engine.vattention`); and memory a page gets
fresh from the device is zeroed when mapped, as vLLM's buffer is (vLLM zeroes blocks
it hands out only for Mamba and mixed-precision caches, which vattention refuses), so
no attention kernel reads memory stock vLLM would not have given it. For other engines
the original function runs unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_ext.patches.base import WORKER, Patch, Target

_PARAMS = ("kv_cache_config", "device", "layout", "kernel_block_sizes")
_V1 = SpecifierSet("<0.34")  # V1 runner, no allocation hook


class KVPoolAlloc(Patch):
    """vattention: the worker's KV memory in a VirtualKVPool (every model runner)"""

    name = "kv_pool_alloc"
    process = WORKER
    targets = (Target("vllm.v1.worker.gpu_model_runner:allocate_kv_cache", _PARAMS, _V1),
               Target("vllm.v1.worker.gpu.attn_utils:allocate_kv_cache", _PARAMS, _V1),
               Target("vllm.v1.worker.gpu.attn_utils:allocate_kv_cache", (*_PARAMS, "allocate"),
                      SpecifierSet(">=0.34")),
               Target("vllm.v1.kv_cache_interface:create_kv_cache_views",
                      ("raw", "spec", "num_blocks", "layout", "kv_cache_tensor",
                       "kernel_block_size")),
               # Names the file that tells the scheduler the pool's physical pages; the
               # rank, in what a worker of a tensor-parallel engine logs and refuses.
               Target("vllm.config.vllm:VllmConfig", attrs=("instance_id", "parallel_config")),
               Target("vllm.config.parallel:ParallelConfig",
                      attrs=("rank", "tensor_parallel_size")),
               # What the pool reads of vLLM's KV placement (vattention.geometry).
               Target("vllm.v1.kv_cache_interface:KVCacheConfig",
                      attrs=("kv_cache_groups", "kv_cache_tensors", "num_blocks")),
               Target("vllm.v1.kv_cache_interface:KVCacheTensor",
                      attrs=("size", "layers", "block_stride", "offset", "layer_stride")),
               Target("vllm.v1.kv_cache_interface:KVCacheGroupSpec", attrs=("kv_cache_spec",)),
               Target("vllm.v1.kv_cache_interface:KVCacheSpec",
                      attrs=("page_size_bytes", "block_size")))
    replaces = 3
    vllm_versions = SpecifierSet(">=0.32,<0.35")
    components = ("kv_allocator=vattention",)

    def wrap(self, original: Any) -> Any:
        @functools.wraps(original)
        def allocate_kv_cache(kv_cache_config, device, layout, kernel_block_sizes=None,
                              *hook, **hook_by_name):
            from vllm.config import get_current_vllm_config_or_none

            from vllm_ext.engine import vattention

            config = get_current_vllm_config_or_none()
            settings = vattention.settings_for(config)
            if settings is None:
                return original(kv_cache_config, device, layout, kernel_block_sizes, *hook,
                                **hook_by_name)
            if any(a is not None for a in (*hook, *hook_by_name.values())):
                raise vattention.VAttentionError(
                    "--kv-allocator vattention supplies the KV memory itself; vLLM's "
                    "extensible KV cache must be off (--disable-extensible-kv-cache, which "
                    "vllm-ext sets for vattention engines)")
            self.reached()
            return vattention.allocate_kv_cache(config, kv_cache_config, device, layout,
                                                kernel_block_sizes, settings)

        return allocate_kv_cache

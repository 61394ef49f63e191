"""Patch: with `--kv-allocator vattention`, the scheduler's BlockPool hands out blocks page-aware.

The KV cache manager is built inside `Scheduler.__init__`, and vLLM 0.32 has no
hook to supply its block pool, so the coordinator factory the manager calls is
wrapped: the pool it built is made a `PagedBlockPool` before any block is handed out.

Invariant bent: which free block vLLM hands out next (vLLM takes the head of its
LRU free queue; the planner takes the lowest mapped page's free blocks, so memory
stays compact) and how many blocks count as free (only those under the physical
cap). Safe because vLLM never relied on block identity, only on a free block
being free; cached blocks are still evicted through vLLM's own path before reuse,
and a page is only unmapped after its cached blocks were evicted. Prefix-cache
eviction order changes from LRU to page order (noted in the README).
"""

from __future__ import annotations

import functools
from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_ext import envs
from vllm_ext.patches.base import Patch


class PagedBlockPoolPatch(Patch):
    name = "paged_block_pool"
    target = "vllm.v1.core.kv_cache_manager:get_kv_cache_coordinator"
    vllm_versions = SpecifierSet(">=0.32,<0.33")

    def _apply(self, owner: Any, attr: str, original: Any) -> None:
        @functools.wraps(original)
        def get_kv_cache_coordinator(kv_cache_config, max_model_len, *args, **kwargs):
            coordinator = original(kv_cache_config, max_model_len, *args, **kwargs)
            if envs.kv_pool_selected():
                from vllm_ext import vattention

                vattention.make_paged(coordinator.block_pool, kv_cache_config, max_model_len,
                                      vattention.selected())
            return coordinator

        setattr(owner, attr, get_kv_cache_coordinator)

"""Patch: the block pool learns which request it is allocating for (vattention's slots layout).

In the slots layout every request's blocks are consecutive ids in a slot of its own,
so the pool must know the request when it hands out a block and when it counts the
free blocks that request could get. vLLM 0.32's `BlockPool` sees neither; every
allocation for a request goes through `KVCacheManager.allocate_slots`, which is
wrapped to name the request on the pool for the duration of the call. The wrapper is
put on each vattention engine's own KV cache manager when `paged_block_pool` makes its
pool paged, not on vLLM's class: the call runs for every scheduled request of every
step, and engines that did not choose vattention should not pay for it.

Invariant bent: the block pool is request-agnostic. Safe because the name is only
set on a paged pool (other engines' managers are untouched), is cleared when the call
returns or raises, and the engine allocates for one request at a time.
"""

from __future__ import annotations

import functools
from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_ext.patches.base import ENGINE_CORE, Patch, Target


class SlotOwner(Patch):
    """vattention: the block pool knows which request it allocates for"""

    name = "slot_owner"
    process = ENGINE_CORE
    targets = (Target("vllm.v1.core.kv_cache_manager:KVCacheManager.allocate_slots",
                      ("self", "request", "...")),)
    vllm_versions = SpecifierSet(">=0.32,<0.35")
    components = ("kv_allocator=vattention",)

    replaces = 0  # installed on each vattention engine (`install`, from paged_block_pool)

    def install(self, sched: Any) -> None:
        """Name each request on this scheduler's (paged) pool while allocating for it."""
        manager = sched.kv_cache_manager
        original = manager.allocate_slots

        @functools.wraps(original)
        def allocate_slots(request, *args, **kwargs):
            self.reached()
            pool = manager.block_pool
            pool.owner = request.request_id
            try:
                return original(request, *args, **kwargs)
            finally:
                pool.owner = None

        manager.allocate_slots = allocate_slots

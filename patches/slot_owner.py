"""Patch: the block pool learns which request it is allocating for (vattention's slots layout).

In the slots layout every request's blocks are consecutive ids in a slot of its own,
so the pool must know the request when it hands out a block and when it counts the
free blocks that request could get. vLLM 0.32's `BlockPool` sees neither; every
allocation for a request goes through `KVCacheManager.allocate_slots`, which is
wrapped to name the request on a paged pool for the duration of the call.

Invariant bent: the block pool is request-agnostic. Safe because the name is only
set on a paged pool (other engines' pools are untouched), is cleared when the call
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

    def wrap(self, original: Any) -> Any:
        @functools.wraps(original)
        def allocate_slots(manager, request, *args, **kwargs):
            pool = manager.block_pool
            if not hasattr(pool, "planner"):
                return original(manager, request, *args, **kwargs)
            self.reached()
            pool.owner = request.request_id
            try:
                return original(manager, request, *args, **kwargs)
            finally:
                pool.owner = None

        return allocate_slots

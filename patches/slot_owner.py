"""Patch: the block pool learns which request it is allocating for (vattention's slots layout).

In the slots layout every request's blocks are consecutive ids in a slot of its own,
so the pool must know the request when it hands out a block and when it counts the
free blocks that request could get. vLLM 0.32's `BlockPool` sees neither; every
allocation for a request goes through `KVCacheManager.allocate_slots`, which is
wrapped to name the request on the pool for the duration of the call.

Invariant bent: the block pool is request-agnostic. Safe because the name is only
read by a `PagedBlockPool` (other pools ignore it), is cleared when the call returns
or raises, and the engine allocates for one request at a time.
"""

from __future__ import annotations

import functools
from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_ext.patches.base import Patch


class SlotOwner(Patch):
    name = "slot_owner"
    target = "vllm.v1.core.kv_cache_manager:KVCacheManager.allocate_slots"
    vllm_versions = SpecifierSet(">=0.32,<0.33")

    def _apply(self, owner: Any, attr: str, original: Any) -> None:
        @functools.wraps(original)
        def allocate_slots(self, request, *args, **kwargs):
            pool = self.block_pool
            if not hasattr(pool, "planner"):
                return original(self, request, *args, **kwargs)
            pool.owner = request.request_id
            try:
                return original(self, request, *args, **kwargs)
            finally:
                pool.owner = None

        setattr(owner, attr, allocate_slots)

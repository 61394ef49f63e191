"""Patch: with `--kv-allocator vattention`, an engine's BlockPool hands out blocks page-aware.

The KV cache manager and its block pool are built inside `Scheduler.__init__`, and
vLLM 0.32 has no hook to supply the pool, so the constructor is wrapped: for an
engine that selected vattention, the pool it built becomes a `PagedBlockPool` before
any block is handed out (the object keeps its identity, because the coordinator's
managers already hold it). The class change overrides vLLM's free-block queue
methods, mirrored here, the pool's free count and its usage: those are this patch's
targets too. The cap is the fewer of the pages under `--vattention-physical-limit`
and the pages the workers got physical memory for, which they allocated before
vLLM builds the scheduler (`vattention.provisioned_pages`, keyed by the config's
`instance_id`).

Invariant bent: which free block vLLM hands out next (vLLM takes the head of its
LRU free queue; the planner takes the lowest mapped page's free blocks, so memory
stays compact), how many blocks count as free (only those under the physical cap)
and what the KV cache usage measures (live blocks over those under the cap, where
vLLM's formula would count the free blocks above the cap as used). Safe because
vLLM never relied on block identity, only on a free block being free; cached blocks
are still evicted through vLLM's own path before reuse, and a page is only unmapped
after its cached blocks were evicted; the usage feeds only statistics and the data
parallel load balancer, for which live over what fits is the measure meant. Prefix-
cache eviction order changes from LRU to page order (noted in docs/vattention.md).
"""

from __future__ import annotations

import functools
from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_ext.patches.base import ENGINE_CORE, Patch, Target

_QUEUE = "vllm.v1.core.kv_cache_utils:FreeKVCacheBlockQueue"


class PagedBlockPool(Patch):
    """vattention: page-aware choice of free blocks, physical cap"""

    name = "paged_block_pool"
    process = ENGINE_CORE
    targets = (
        Target("vllm.v1.core.sched.scheduler:Scheduler.__init__",
               ("self", "vllm_config", "kv_cache_config", "...")),
        Target("vllm.v1.core.block_pool:BlockPool.get_num_free_blocks", ("self",)),
        Target("vllm.v1.core.block_pool:BlockPool.get_usage", ("self",)),
        Target("vllm.v1.core.block_pool:BlockPool._maybe_evict_cached_block",
               ("self", "block")),
        Target(f"{_QUEUE}.__init__", ("self", "blocks")),
        Target(f"{_QUEUE}.popleft", ("self",)),
        Target(f"{_QUEUE}.popleft_n", ("self", "n")),
        Target(f"{_QUEUE}.remove", ("self", "block")),
        Target(f"{_QUEUE}.append", ("self", "block")),
        Target(f"{_QUEUE}.append_n", ("self", "blocks")),
        Target(f"{_QUEUE}.prepend_n", ("self", "blocks")),
        # The mirror above is exact: a method vLLM adds could change the free list
        # without the planner being told.
        Target(_QUEUE, attrs=("num_free_blocks",), methods=(
            "__init__", "append", "append_n", "get_all_free_blocks", "iter_blocks_after",
            "popleft", "popleft_n", "prepend_n", "remove")),
        Target("vllm.v1.core.block_pool:BlockPool",
               attrs=("blocks", "null_block", "enable_caching", "free_block_queue")),
        Target("vllm.v1.core.kv_cache_utils:KVCacheBlock", attrs=("block_id",)),
        Target("vllm.v1.core.kv_cache_manager:KVCacheManager", attrs=("block_pool",)),
        Target("vllm.v1.core.sched.scheduler:Scheduler", attrs=("kv_cache_manager",)),
        Target("vllm.config.vllm:VllmConfig", attrs=("instance_id",)),
    )
    vllm_versions = SpecifierSet(">=0.32,<0.35")
    components = ("kv_allocator=vattention",)

    def __init__(self, per_engine: tuple[Patch, ...] = (),
                 relies_on: tuple[Patch, ...] = ()) -> None:
        super().__init__()
        # Patches installed on each vattention engine's scheduler once its pool is paged.
        self.per_engine = per_engine
        # Declarations in force for a vattention engine whatever its scheduler: the
        # engine's statistics folder, where its workers tell it their pages.
        self.relies_on = relies_on

    def wrap(self, original: Any) -> Any:
        @functools.wraps(original)
        def __init__(sched, vllm_config, kv_cache_config, *args, **kwargs):
            original(sched, vllm_config, kv_cache_config, *args, **kwargs)
            from vllm_ext.engine import vattention

            settings = vattention.settings_for(vllm_config)
            if settings is not None:
                self.reached()
                for reliance in self.relies_on:
                    reliance.reached()
                make_paged(sched.kv_cache_manager.block_pool, kv_cache_config,
                           vllm_config.model_config.max_model_len, settings,
                           vattention.provisioned_pages(vllm_config))
                # This engine's own hot paths, not vLLM's classes: other engines of the
                # process run vLLM's code alone.
                for per_engine in self.per_engine:
                    per_engine.install(sched)

        return __init__


def make_paged(block_pool, kv_cache_config, max_model_len: int, settings,
               provisioned: int | None = None):
    """Turn a freshly built BlockPool (only the null block taken) into a PagedBlockPool;
    `provisioned`: the physical pages the workers got, if they said."""
    from vllm_ext.engine.vattention import plan_pages

    planner = plan_pages(kv_cache_config, max_model_len, settings, block_pool.enable_caching,
                         block_pool.null_block.block_id, provisioned)
    cls = _paged_classes()
    block_pool.__class__ = cls.pool
    block_pool.planner = planner
    block_pool.owner = None
    planner.on_unmap = block_pool._forget
    null = block_pool.null_block
    free = [b for b in block_pool.blocks if b is not null]
    block_pool.free_block_queue = cls.queue(free, block_pool)
    return block_pool


@functools.cache
def _paged_classes():
    """The subclasses, built on first use: vLLM is imported only in engine processes."""
    from types import SimpleNamespace

    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue

    class PagedFreeQueue(FreeKVCacheBlockQueue):
        """vLLM's free-block queue, with the planner choosing which free block goes next.

        The linked list stays vLLM's; every change to it is also told to the planner.
        """

        def __init__(self, free_blocks, pool) -> None:
            super().__init__(free_blocks)
            self._pool = pool
            self.planner = pool.planner

        def popleft(self):
            return self.popleft_n(1)[0]

        def popleft_n(self, n: int):
            taken = self.planner.take(n, owner=self._pool.owner) if n else []
            blocks = [self._pool.blocks[i] for i in taken]
            for block in blocks:
                FreeKVCacheBlockQueue.remove(self, block)
            return blocks

        def remove(self, block) -> None:  # a prefix-cache hit on a free block
            super().remove(block)
            self.planner.use(block.block_id)

        def append(self, block) -> None:
            super().append(block)
            self.planner.free((block.block_id,))

        def append_n(self, blocks) -> None:
            super().append_n(blocks)
            self.planner.free(b.block_id for b in blocks)

        def prepend_n(self, blocks) -> None:
            super().prepend_n(blocks)
            self.planner.free(b.block_id for b in blocks)

    class PagedBlockPool(BlockPool):
        """A `BlockPool` whose blocks live in pages mapped on demand.

        `owner` names the request whose blocks are being allocated (set around vLLM's
        `allocate_slots` by the `slot_owner` patch); the slots layout needs it.
        """

        def get_num_free_blocks(self) -> int:
            return min(self.free_block_queue.num_free_blocks,
                       self.planner.allocatable(self.owner))

        def get_usage(self) -> float:
            return self.planner.usage()

        def take_page_ops(self):
            return self.planner.drain()

        def _forget(self, block_ids) -> None:
            for block_id in block_ids:
                self._maybe_evict_cached_block(self.blocks[block_id])

    return SimpleNamespace(pool=PagedBlockPool, queue=PagedFreeQueue)

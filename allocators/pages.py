"""PagePlanner: which pages a set of live KV blocks needs, and in what order to map them.

Blocks are numbered as the engine numbers them; page j holds blocks
[j*k, (j+1)*k). The planner runs where blocks are handed out (the scheduler)
and decides; the pool runs where the memory is (the worker) and obeys the
`PageOps` the planner drains once per step. Its rules:

- Compact: a block is handed out from the lowest mapped page that already holds
  live blocks, then from the lowest mapped idle page, and only then from a new
  page, so memory follows the live blocks instead of scattering over all pages.
- Look-ahead (vAttention's overlap): `premap` idle pages are kept mapped ahead of
  need and mapped in the background, so in steady state a step's new blocks land
  in pages that are mapped already and no map is on the step's critical path.
- Deferred reclamation: a page whose last live block is freed stays mapped for
  reuse; idle pages beyond `premap + watermark` are unmapped, highest first.
- Cap: at most `max_pages` pages are mapped at once; `allocatable()` reports only
  the blocks that fit under it, so the engine preempts instead of failing.

Invariant (checked by the tests): mapped pages <= pages holding live blocks +
premap + watermark, and <= max_pages.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vllm_ext.allocators.errors import KVPoolError


@dataclass(frozen=True, slots=True)
class PageOps:
    """What the pool must do before (map_now, unmap) and during (map_ahead) the next step."""

    map_now: tuple[int, ...]  # pages of blocks handed out since the last drain, not mapped ahead
    touched: tuple[int, ...]  # every page a block was handed out from since the last drain
    unmap: tuple[int, ...]
    map_ahead: tuple[int, ...]
    live_blocks: int  # after these ops, for the pool's statistics
    live_pages: int  # pages holding at least one live block
    mapped_pages: int

    def __bool__(self) -> bool:
        return bool(self.map_now or self.unmap or self.map_ahead)


class PagePlanner:
    """See the module doc. `on_unmap(block_ids)` is told which blocks' memory is about to go."""

    def __init__(self, num_blocks: int, blocks_per_page: int, *, premap: int = 2,
                 watermark: int = 8, max_pages: int | None = None,
                 live_from_start: Iterable[int] = (0,),
                 on_unmap: Callable[[range], None] | None = None) -> None:
        if blocks_per_page < 1 or num_blocks < 1:
            raise KVPoolError(f"need at least one block and one block per page, got "
                              f"{num_blocks} blocks, {blocks_per_page} per page")
        if premap < 0 or watermark < 0:
            raise KVPoolError(f"premap and watermark are page counts >= 0, got {premap}, "
                              f"{watermark}")
        self.k = blocks_per_page
        self.num_blocks = num_blocks
        self.num_pages = -(-num_blocks // blocks_per_page)
        self.premap, self.watermark = premap, watermark
        self.max_pages = self.num_pages if max_pages is None else min(max_pages, self.num_pages)
        self.on_unmap = on_unmap
        self._free = [set(self.blocks_of(j)) for j in range(self.num_pages)]
        self._live = [0] * self.num_pages
        self._mapped = bytearray(self.num_pages)
        self._n_mapped = 0
        self._live_total = 0
        self._free_mapped = 0  # free blocks inside mapped pages
        self._open: list[int] = []  # heaps of page ids, checked lazily on pop
        self._idle: list[int] = []
        self._unmapped = list(range(self.num_pages))
        self._map_now: list[int] = []
        self._touched: set[int] = set()
        for block in live_from_start:
            page = block // self.k
            if not self._mapped[page]:
                self._set_mapped(page)
            self._claim_block(block)
        self._map_now.clear()  # the pool maps these pages when it is created
        self._touched.clear()
        if self._n_mapped > self.max_pages:
            raise KVPoolError(f"a physical cap of {self.max_pages} pages cannot even hold the "
                              f"engine's reserved blocks ({self._n_mapped} pages)")

    # -- queries -------------------------------------------------------------------------
    def blocks_of(self, page: int) -> range:
        return range(page * self.k, min((page + 1) * self.k, self.num_blocks))

    @property
    def mapped_pages(self) -> int:
        return self._n_mapped

    @property
    def live_blocks(self) -> int:
        return self._live_total

    @property
    def live_pages(self) -> int:
        return sum(1 for n in self._live if n)

    def is_mapped(self, page: int) -> bool:
        return bool(self._mapped[page])

    def allocatable(self) -> int:
        """Free blocks that can be handed out without exceeding the cap."""
        free_unmapped = self.num_blocks - self._live_total - self._free_mapped
        # New pages are taken lowest first and only the last page can be short.
        return self._free_mapped + min((self.max_pages - self._n_mapped) * self.k, free_unmapped)

    # -- changes -------------------------------------------------------------------------
    def take(self, n: int) -> list[int]:
        """Hand out n free blocks, compactly; pages they open are mapped by the next drain."""
        if n > self.allocatable():
            raise KVPoolError(f"asked for {n} blocks, only {self.allocatable()} fit under the cap "
                              f"of {self.max_pages} pages")
        out: list[int] = []
        while len(out) < n:
            page = self._next_page()
            free = self._free[page]
            for block in sorted(free)[:n - len(out)]:
                self._claim_block(block)
                out.append(block)
        return out

    def use(self, block: int) -> None:
        """A particular free block goes live (a prefix-cache hit on a freed block)."""
        page = block // self.k
        if not self._mapped[page]:
            raise KVPoolError(f"block {block} is in unmapped page {page}; its contents are gone")
        self._claim_block(block)

    def free(self, blocks: Iterable[int]) -> None:
        for block in blocks:
            page = block // self.k
            if block in self._free[page]:
                raise KVPoolError(f"block {block} is already free")
            self._free[page].add(block)
            self._live[page] -= 1
            self._live_total -= 1
            self._free_mapped += 1
            heapq.heappush(self._idle if self._live[page] == 0 else self._open, page)

    def drain(self) -> PageOps:
        """The pool's orders since the last drain, after trimming and looking ahead."""
        unmap = self._trim(self.premap + self.watermark)
        ahead = []
        idle = self._idle_pages()
        while len(idle) + len(ahead) < self.premap and self._n_mapped < self.max_pages:
            page = self._pop_unmapped()
            if page is None:
                break
            self._set_mapped(page)
            heapq.heappush(self._idle, page)
            ahead.append(page)
        return self._ops(unmap, ahead)

    def trim(self, keep: int = 0) -> PageOps:
        """Unmap idle pages down to `keep` (memory pressure, or an idle engine)."""
        return self._ops(self._trim(keep), [])

    # -- internals -----------------------------------------------------------------------
    def _ops(self, unmap: list[int], ahead: list[int]) -> PageOps:
        ops = PageOps(tuple(self._map_now), tuple(sorted(self._touched)), tuple(unmap),
                      tuple(ahead), self._live_total, self.live_pages, self._n_mapped)
        self._map_now.clear()
        self._touched.clear()
        return ops

    def _claim_block(self, block: int) -> None:
        page = block // self.k
        self._free[page].remove(block)
        self._live[page] += 1
        self._live_total += 1
        self._free_mapped -= 1
        self._touched.add(page)
        if self._free[page]:
            heapq.heappush(self._open, page)

    def _set_mapped(self, page: int) -> None:
        self._mapped[page] = 1
        self._n_mapped += 1
        self._free_mapped += len(self._free[page])

    def _pop(self, heap: list[int], ok: Callable[[int], bool]) -> int | None:
        while heap:
            page = heap[0]
            if ok(page):
                return page
            heapq.heappop(heap)
        return None

    def _pop_unmapped(self) -> int | None:
        page = self._pop(self._unmapped, lambda j: not self._mapped[j])
        if page is not None:
            heapq.heappop(self._unmapped)
        return page

    def _next_page(self) -> int:
        page = self._pop(self._open, lambda j: self._mapped[j] and self._live[j] and self._free[j])
        if page is None:
            page = self._pop(self._idle, lambda j: self._mapped[j] and not self._live[j])
        if page is None:
            page = self._pop_unmapped()
            assert page is not None, "allocatable() said the blocks exist"
            self._set_mapped(page)
            self._map_now.append(page)
        return page

    def _idle_pages(self) -> list[int]:
        # Rebuilt from the truth so that duplicate or stale heap entries cannot count twice.
        idle = sorted({j for j in self._idle if self._mapped[j] and not self._live[j]})
        self._idle = list(idle)  # sorted is a valid heap
        return idle

    def _trim(self, keep: int) -> list[int]:
        idle = self._idle_pages()
        unmap = sorted(idle, reverse=True)[:max(0, len(idle) - keep)]
        for page in unmap:
            self._mapped[page] = 0
            self._n_mapped -= 1
            self._free_mapped -= len(self._free[page])
            heapq.heappush(self._unmapped, page)
            if self.on_unmap is not None:
                self.on_unmap(self.blocks_of(page))
        return sorted(unmap)

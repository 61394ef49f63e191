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
  the blocks that fit under it, so the engine preempts instead of failing, and
  `usage()` measures the live blocks against it.

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
        live_from_start = tuple(live_from_start)
        self._held_for_good = len(live_from_start)
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

    def allocatable(self, owner: object = None) -> int:
        """Free blocks that can be handed out without exceeding the cap."""
        free_unmapped = self.num_blocks - self._live_total - self._free_mapped
        # New pages are taken lowest first and only the last page can be short.
        return self._free_mapped + min((self.max_pages - self._n_mapped) * self.k, free_unmapped)

    def usage(self) -> float:
        """Live blocks over the blocks that fit under the cap, leaving out the blocks live
        from the start (the engine's null block): 0 when idle, at most 1."""
        held = self._held_for_good
        capacity = min(self.num_blocks, self.max_pages * self.k) - held
        return (self._live_total - held) / capacity if capacity > 0 else 0.0

    # -- changes -------------------------------------------------------------------------
    def take(self, n: int, owner: object = None) -> list[int]:
        """Hand out n free blocks, compactly; pages they open are mapped by the next drain.

        `owner` (the request) matters only to `SlotPlanner`."""
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

    def _trim(self, keep: int, protect: frozenset[int] = frozenset()) -> list[int]:
        idle = self._idle_pages()
        removable = sorted((j for j in idle if j not in protect), reverse=True)
        unmap = removable[:max(0, len(idle) - keep)]
        for page in unmap:
            self._mapped[page] = 0
            self._n_mapped -= 1
            self._free_mapped -= len(self._free[page])
            heapq.heappush(self._unmapped, page)
            if self.on_unmap is not None:
                self.on_unmap(self.blocks_of(page))
        return sorted(unmap)


class SlotPlanner(PagePlanner):
    """vAttention's own layout: each request owns a contiguous slot of `slot_blocks` blocks.

    A request's blocks are consecutive ids from the start of its slot, so its KV is one
    contiguous range in every layer and a kernel can address it without a block table.
    Slots start on page boundaries (page 0 holds the engine's null block) so that no
    two requests share a page. The slot is the request's until all its blocks are
    freed; a new request takes the lowest free slot, whose first pages may still be
    mapped from its last owner (deferred reclamation). Look-ahead maps, for the
    requests closest to their next page, that page.
    """

    def __init__(self, num_blocks: int, blocks_per_page: int, slot_blocks: int, **kwargs) -> None:
        super().__init__(num_blocks, blocks_per_page, **kwargs)
        if slot_blocks % self.k:
            raise KVPoolError(f"a slot of {slot_blocks} blocks does not fill whole pages of "
                              f"{self.k} blocks")
        self.slot_blocks = slot_blocks
        self.first_block = self.k  # page 0 is the null block's
        self.num_slots = (num_blocks - self.first_block) // slot_blocks
        if self.num_slots < 1:
            raise KVPoolError(f"{num_blocks} blocks hold no slot of {slot_blocks} blocks; "
                              f"give the KV cache more space or lower max_model_len")
        self._free_slots = list(range(self.num_slots))
        self._slot_of: dict[object, int] = {}
        self._owner: dict[int, object] = {}
        self._next = [0] * self.num_slots  # blocks handed out so far in each slot
        self._held = [0] * self.num_slots  # of those, not freed yet

    def slot_range(self, slot: int) -> range:
        start = self.first_block + slot * self.slot_blocks
        return range(start, start + self.slot_blocks)

    def allocatable(self, owner: object = None) -> int:
        if owner is None:  # no request in view (statistics): blocks under the cap
            return super().allocatable()
        slot = self._slot_of.get(owner)
        if slot is None:
            if not self._free_slots:
                return 0
            slot = self._free_slots[0]
        blocks = self.slot_range(slot)[self._next[slot]:]
        budget = self.max_pages - self._n_mapped
        fits = 0
        for page in range(blocks.start // self.k, -(-blocks.stop // self.k)):
            if not self._mapped[page]:
                if budget == 0:
                    break
                budget -= 1
            fits += min(blocks.stop, (page + 1) * self.k) - max(blocks.start, page * self.k)
        return fits

    def take(self, n: int, owner: object = None) -> list[int]:
        if owner is None:
            raise KVPoolError("the slots layout hands out blocks only for a named request")
        if n > self.allocatable(owner):
            raise KVPoolError(f"request {owner!r} asked for {n} blocks, only "
                              f"{self.allocatable(owner)} fit in its slot under the cap")
        slot = self._slot_of.get(owner)
        if slot is None:
            slot = heapq.heappop(self._free_slots)
            self._slot_of[owner], self._owner[slot] = slot, owner
        first = self.slot_range(slot).start + self._next[slot]
        out = list(range(first, first + n))
        for block in out:
            page = block // self.k
            if not self._mapped[page]:
                self._set_mapped(page)
                self._map_now.append(page)
            self._claim_block(block)
        self._next[slot] += n
        self._held[slot] += n
        return out

    def free(self, blocks: Iterable[int]) -> None:
        blocks = list(blocks)
        super().free(blocks)
        for block in blocks:
            slot = (block - self.first_block) // self.slot_blocks
            self._held[slot] -= 1
            if self._held[slot] == 0:  # the request let go of everything: the slot is free
                del self._slot_of[self._owner.pop(slot)]
                self._next[slot] = 0
                heapq.heappush(self._free_slots, slot)

    def use(self, block: int) -> None:
        raise KVPoolError("the slots layout does not share blocks between requests "
                          "(prefix caching is off with it)")

    def _upcoming(self) -> list[tuple[int, int]]:
        """(blocks left before the page is needed, page) for every request's next page."""
        out = []
        for slot in self._owner:
            nxt = self.slot_range(slot).start + self._next[slot]
            left = (self.k - nxt % self.k) % self.k
            page = nxt // self.k + (1 if left else 0)
            if page * self.k < self.slot_range(slot).stop:
                out.append((left, page))
        return sorted(out)

    def drain(self) -> PageOps:
        upcoming = self._upcoming()
        ready = frozenset([p for _, p in upcoming
                           if self._mapped[p] and not self._live[p]][:self.premap])
        wanted = [p for _, p in upcoming if not self._mapped[p]][:max(0, self.premap - len(ready))]
        # Kept pages of finished requests serve only their slot's next owner, so they
        # share the reserve with the look-ahead pages instead of standing in for them.
        unmap = self._trim(self.premap + self.watermark - len(wanted), protect=ready)
        ahead = []
        for page in wanted:
            if self._n_mapped >= self.max_pages:
                break
            self._set_mapped(page)
            heapq.heappush(self._idle, page)
            ahead.append(page)
        return self._ops(unmap, ahead)

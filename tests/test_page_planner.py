"""PagePlanner, the scheduler-side half of vattention, driven like vLLM's block pool drives
it. A model pool applies its orders, so the tests see what the worker would map."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vllm_ext.allocators import KVPoolError
from vllm_ext.allocators.pages import PagePlanner


class ModelPool:
    """What the worker's pool would hold after carrying out the planner's orders."""

    def __init__(self, planner: PagePlanner) -> None:
        self.planner = planner
        self.mapped = {0}  # the null block's page, mapped when the pool is made

    def apply(self, ops) -> None:
        assert not set(ops.map_now) & self.mapped, "map_now names a mapped page"
        self.mapped |= set(ops.map_now)
        assert set(ops.unmap) <= self.mapped, "unmap names a page that is not mapped"
        self.mapped -= set(ops.unmap)
        assert not set(ops.map_ahead) & self.mapped
        self.mapped |= set(ops.map_ahead)
        assert set(ops.touched) <= self.mapped | set(ops.unmap)


def test_blocks_fill_mapped_pages_before_new_ones():
    p = PagePlanner(64, 4, premap=0, watermark=0)
    assert p.take(3) == [1, 2, 3]  # block 0 is the engine's null block, page 0 is mapped
    assert p.drain().map_now == ()
    assert p.take(2) == [4, 5]
    assert p.drain().map_now == (1,)
    p.free([2, 4])
    assert p.take(2) == [2, 4]  # holes in mapped pages first, no new page
    p.free([4, 5])
    ops = p.drain()
    assert ops.unmap == (1,) and ops.live_pages == 1  # an idle page goes (no watermark)


def test_look_ahead_keeps_pages_ready_and_steady_state_needs_no_sync_map():
    p = PagePlanner(1000, 1, premap=3, watermark=0)
    assert p.drain().map_ahead == (1, 2, 3)
    for _ in range(20):  # one new block per step, as a decode crossing a block boundary
        p.take(1)
        ops = p.drain()
        assert ops.map_now == () and len(ops.map_ahead) == 1


def test_freed_pages_are_kept_up_to_the_watermark_then_given_back_highest_first():
    p = PagePlanner(100, 1, premap=0, watermark=2)
    blocks = p.take(6)
    p.drain()
    p.free(blocks)
    ops = p.drain()
    assert ops.unmap == (3, 4, 5, 6) and p.mapped_pages == 3  # null page + 2 kept
    assert p.trim().unmap == (1, 2)


def test_cap_limits_allocatable_blocks_and_what_can_be_taken():
    forgotten = []
    p = PagePlanner(100, 4, premap=1, watermark=0, max_pages=3, on_unmap=forgotten.extend)
    assert p.allocatable() == 3 + 2 * 4
    p.take(11)
    assert p.allocatable() == 0 and p.drain().map_ahead == ()
    with pytest.raises(KVPoolError, match="only 0 fit under the cap of 3 pages"):
        p.take(1)
    p.free(range(4, 12))
    # One idle page stays as the look-ahead page; the other goes, cache entries first.
    assert p.drain().unmap == (2,) and forgotten == [*range(8, 12)]


def test_usage_is_live_blocks_over_those_under_the_cap():
    p = PagePlanner(100, 4, premap=2, watermark=2, max_pages=3)
    assert p.usage() == 0.0  # idle: only the null block, which does not count
    blocks = p.take(11)  # all 11 that fit under the cap (12 blocks, the null one aside)
    assert p.usage() == 1.0
    p.free(blocks[:5])
    assert p.usage() == 6 / 11
    p.free(blocks[5:])
    p.drain()
    assert p.usage() == 0.0  # pages kept mapped for reuse hold nothing live
    whole = PagePlanner(9, 4)  # no cap: every block counts
    whole.take(4)
    assert whole.usage() == 0.5


def test_misuse_is_refused():
    p = PagePlanner(16, 4)
    p.take(1)
    p.free([1])
    with pytest.raises(KVPoolError, match="already free"):
        p.free([1])
    p.trim()
    with pytest.raises(KVPoolError, match="unmapped page 1; its contents are gone"):
        p.use(5)
    with pytest.raises(KVPoolError, match="cannot even hold"):
        PagePlanner(16, 4, max_pages=0)


class PlannerMachine(RuleBasedStateMachine):
    """Random take/free/prefix-hit/drain sequences; invariants after every rule."""

    @initialize(num_blocks=st.integers(8, 200), k=st.integers(1, 8), premap=st.integers(0, 3),
                watermark=st.integers(0, 3), cap=st.one_of(st.none(), st.integers(4, 40)))
    def setup(self, num_blocks, k, premap, watermark, cap):
        self.forgotten: set[int] = set()
        self.p = PagePlanner(num_blocks, k, premap=premap, watermark=watermark, max_pages=cap,
                             on_unmap=self.forgotten.update)
        self.pool = ModelPool(self.p)
        self.live: set[int] = {0}
        self.cached: set[int] = set()  # free blocks whose contents a prefix hit may reuse

    @rule(n=st.integers(1, 12))
    def take(self, n):
        n = min(n, self.p.allocatable())
        got = self.p.take(n)
        assert len(got) == n and not set(got) & self.live
        self.live |= set(got)
        self.cached -= set(got)

    @precondition(lambda self: len(self.live) > 1)
    @rule(data=st.data())
    def free(self, data):
        victims = data.draw(st.sets(st.sampled_from(sorted(self.live - {0})), min_size=1))
        self.p.free(victims)
        self.live -= victims
        self.cached |= victims

    @precondition(lambda self: self.cached)
    @rule(data=st.data())
    def prefix_hit(self, data):
        block = data.draw(st.sampled_from(sorted(self.cached)))
        self.p.use(block)
        self.cached.discard(block)
        self.live.add(block)

    @rule()
    def drain(self):
        self.forgotten.clear()
        ops = self.p.drain()
        self.pool.apply(ops)
        assert not self.forgotten & self.live, "a live block's page was unmapped"
        self.cached -= self.forgotten  # their prefix-cache entries are evicted
        live_pages = {b // self.p.k for b in self.live}
        assert ops.live_pages == len(live_pages) and ops.live_blocks == len(self.live)
        assert len(self.pool.mapped) <= len(live_pages) + self.p.premap + self.p.watermark
        assert self.pool.mapped == {j for j in range(self.p.num_pages) if self.p.is_mapped(j)}

    @invariant()
    def live_blocks_are_in_mapped_pages_and_under_the_cap(self):
        if not hasattr(self, "p"):
            return
        assert all(self.p.is_mapped(b // self.p.k) for b in self.live)
        assert self.p.mapped_pages <= self.p.max_pages
        free_now = self.p.num_blocks - len(self.live)
        assert 0 <= self.p.allocatable() <= free_now


TestPlanner = PlannerMachine.TestCase
TestPlanner.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_slots_give_each_request_consecutive_blocks_on_its_own_pages():
    from vllm_ext.allocators.pages import SlotPlanner

    p = SlotPlanner(1 + 4 * 8 + 4, 4, slot_blocks=8, premap=0, watermark=0)
    assert p.num_slots == 4 and p.slot_range(0) == range(4, 12)
    a = p.take(3, owner="a") + p.take(2, owner="a")
    b = p.take(1, owner="b")
    assert a == [4, 5, 6, 7, 8] and b == [12]
    assert p.allocatable("a") == 3 and p.allocatable("new") == 8
    with pytest.raises(KVPoolError, match="only 3 fit in its slot"):
        p.take(4, owner="a")
    p.free(a)
    assert p.take(2, owner="c") == [4, 5]  # the lowest free slot, from its start
    ops = p.drain()
    assert ops.unmap == (2,)  # a's second page held nothing any more


def test_slots_look_ahead_maps_the_next_page_of_the_request_closest_to_it():
    from vllm_ext.allocators.pages import SlotPlanner

    p = SlotPlanner(1 + 3 * 16, 4, slot_blocks=16, premap=1, watermark=0)
    p.take(4, owner="a")  # page 1 full: a needs page 2 with its next block
    p.take(1, owner="b")  # b has 3 blocks left on page 5
    ops = p.drain()
    assert ops.map_now == (1, 5) and ops.map_ahead == (2,)
    assert p.take(1, owner="a") == [8] and p.drain().map_now == ()


class SlotMachine(RuleBasedStateMachine):
    @initialize(k=st.integers(1, 4), pages_per_slot=st.integers(1, 4), slots=st.integers(1, 6),
                premap=st.integers(0, 3), watermark=st.integers(0, 3),
                cap=st.one_of(st.none(), st.integers(3, 20)))
    def setup(self, k, pages_per_slot, slots, premap, watermark, cap):
        from vllm_ext.allocators.pages import SlotPlanner

        self.forgotten: set[int] = set()
        self.p = SlotPlanner(k + slots * k * pages_per_slot + k - 1, k,
                             slot_blocks=k * pages_per_slot, premap=premap, watermark=watermark,
                             max_pages=cap, on_unmap=self.forgotten.update)
        self.pool = ModelPool(self.p)
        self.blocks: dict[int, list[int]] = {}
        self.n = 0

    @rule(owner=st.integers(0, 8), n=st.integers(1, 5))
    def take(self, owner, n):
        n = min(n, self.p.allocatable(owner))
        if n == 0:
            return
        got = self.p.take(n, owner=owner)
        held = self.blocks.setdefault(owner, [])
        held += got
        assert held == list(range(held[0], held[0] + len(held)))  # consecutive
        assert (held[0] - self.p.first_block) % self.p.slot_blocks == 0  # from a slot's start

    @precondition(lambda self: self.blocks)
    @rule(data=st.data())
    def finish(self, data):
        owner = data.draw(st.sampled_from(sorted(self.blocks)))
        self.p.free(self.blocks.pop(owner))

    @rule()
    def drain(self):
        self.forgotten.clear()
        ops = self.p.drain()
        self.pool.apply(ops)
        live = {b for held in self.blocks.values() for b in held}
        assert not self.forgotten & live
        pages = [{b // self.p.k for b in held} for held in self.blocks.values()]
        assert sum(map(len, pages)) == len(set().union(*pages))  # no page shared
        live_pages = set().union(*pages) | {0}
        assert len(self.pool.mapped) <= len(live_pages) + self.p.premap + self.p.watermark
        assert self.p.mapped_pages <= self.p.max_pages


TestSlots = SlotMachine.TestCase
TestSlots.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)

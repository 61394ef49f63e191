"""The host backend of VirtualKVPool: real address space, real page faults, measured with
mincore and the process's resident set (no vLLM involved); physical memory set aside up
front against a limit, as a device with that much memory would."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_ext.allocators import KVPoolError, PhysicalMemoryError, VirtualKVPool
from vllm_ext.allocators.host import HostBackend
from vllm_ext.allocators.settings import page_size_for, size_in_bytes

PAGE = 64 << 10
LAYERS = 3


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _resident(pool: VirtualKVPool) -> int:
    return pool.backend.resident_bytes(pool._base, pool.reserved_bytes)


def _maps_at(addr: int) -> bool:
    with open("/proc/self/maps") as f:
        return any(int(line.split("-")[0], 16) <= addr < int(line.split()[0].split("-")[1], 16)
                   for line in f)


@pytest.fixture
def pool():
    p = VirtualKVPool(LAYERS, 64 * PAGE + 100, page_size=PAGE)
    yield p
    p.close()


def test_reservation_shapes_and_views(pool):
    assert pool.num_pages == 65  # 64 pages and 100 bytes round up to 65
    assert pool.reserved_bytes == LAYERS * 65 * PAGE
    # Only page 0, mapped before the tensor was made over the range.
    assert pool.mapped_bytes == _resident(pool) == LAYERS * PAGE and pool.is_mapped(0)
    for i in range(LAYERS):
        layer = pool.layer(i)
        assert layer.dtype == torch.int8 and layer.is_contiguous()
        assert layer.numel() == 64 * PAGE + 100
        assert layer.data_ptr() == pool._base + i * 65 * PAGE


def test_resident_memory_follows_mapped_pages(pool):
    big = VirtualKVPool(2, 512 * PAGE, page_size=PAGE)  # 64 MiB reserved, one page resident
    try:
        rss0 = _rss()
        big.map(range(2, 258, 2))  # 128 pages x 2 layers = 16 MiB
        assert _resident(big) == big.mapped_bytes == 129 * 2 * PAGE
        grown = _rss() - rss0
        assert 0.95 * 128 * 2 * PAGE <= grown <= big.mapped_bytes + (4 << 20)
        big.unmap(range(2, 258, 4)).result()  # half of them back to the OS
        assert _resident(big) == big.mapped_bytes == 65 * 2 * PAGE
        assert _rss() - rss0 <= big.mapped_bytes + (4 << 20)
    finally:
        big.close()
    assert _rss() - rss0 <= 4 << 20


def test_data_survives_mapping_and_unmapping_of_other_pages(pool):
    pool.map([3])
    pattern = torch.arange(PAGE, dtype=torch.int32).to(torch.int8)
    for i in range(LAYERS):
        pool.layer(i)[3 * PAGE:4 * PAGE] = pattern + i
    for _ in range(3):
        pool.map([2, 4, 10])
        for i in range(LAYERS):
            pool.layer(i)[2 * PAGE:3 * PAGE].fill_(-1)
            pool.layer(i)[4 * PAGE:5 * PAGE].fill_(-1)
        pool.unmap([2, 4, 10]).result()
    for i in range(LAYERS):
        assert torch.equal(pool.layer(i)[3 * PAGE:4 * PAGE], pattern + i)
    pool.map([4])  # a page mapped again starts from zeros, not from old data
    assert not pool.layer(1)[4 * PAGE:5 * PAGE].any()


def test_byte_and_block_ranges_map_the_pages_under_them(pool):
    assert pool.map_bytes(PAGE - 1, 2) == [1]  # page 0 is mapped from the start
    assert pool.map_bytes(0, PAGE) == []  # already there: byte ranges are idempotent
    assert pool.map_blocks(5, 3, block_bytes=PAGE // 2) == [2, 3]  # blocks 5..7
    assert _resident(pool) == 4 * LAYERS * PAGE
    assert pool.unmap_blocks(4, 4, block_bytes=PAGE // 2) == [2, 3]
    pool.wait()
    assert [pool.is_mapped(j) for j in range(5)] == [True, True, False, False, False]


def test_background_maps_are_waited_for_and_counted(pool):
    pool.map_async(range(1, 11))
    pool.wait()
    assert _resident(pool) == 11 * LAYERS * PAGE
    pool.map([20])
    s = pool.stats()
    assert s.maps == 12 and s.mapped_pages == 12 and s.critical_maps >= 1  # page 0 counts
    assert s.map_seconds > 0 and s.max_map_seconds > 0


def test_bad_requests_raise_and_name_the_allowed_range(pool):
    pool.map([1])
    with pytest.raises(KVPoolError, match=r"already mapped"):
        pool.map([1])
    pool.unmap([1])
    with pytest.raises(KVPoolError, match=r"not mapped \(double unmap\?\)"):
        pool.unmap([1])
    with pytest.raises(KVPoolError, match=r"page 65 is outside the pool's pages 0\.\.64"):
        pool.map([65])
    with pytest.raises(KVPoolError, match=r"outside a layer's \[0, "):
        pool.map_bytes(64 * PAGE, 200)
    with pytest.raises(KVPoolError, match=r"layer 3 is outside 0\.\.2"):
        pool.layer(3)
    pool.close()
    with pytest.raises(KVPoolError, match="closed"):
        pool.map([0])


def test_close_returns_memory_and_address_space():
    pool = VirtualKVPool(2, 32 * PAGE, page_size=PAGE)
    base = pool._base
    pool.map(range(1, 32))
    assert _maps_at(base)
    pool.close()
    pool.close()  # idempotent
    assert not _maps_at(base)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["map", "map_async", "unmap", "wait"]),
                          st.sets(st.integers(0, 15), max_size=6)), max_size=30))
def test_random_sequences_end_with_nothing_mapped_or_leaked(ops):
    pool = VirtualKVPool(2, 16 * PAGE, page_size=PAGE)
    base, mapped = pool._base, {0}
    try:
        for op, pages in ops:
            if op == "wait":
                pool.wait()
                continue
            fresh = pages - mapped if op != "unmap" else pages & mapped
            if op == "unmap":
                pool.unmap(fresh)
                mapped -= fresh
            else:
                getattr(pool, op)(fresh)
                mapped |= fresh
            assert {j for j in range(16) if pool.is_mapped(j)} == mapped
        pool.wait()
        assert _resident(pool) == len(mapped) * 2 * PAGE == pool.mapped_bytes
        pool.unmap(mapped)
        pool.wait()
        assert _resident(pool) == 0 and pool.mapped_bytes == 0
        s = pool.stats()
        assert s.maps == s.unmaps
    finally:
        pool.close()
    assert not _maps_at(base)


def test_reading_an_unmapped_page_faults_like_a_gpu_would():
    code = ("from vllm_ext.allocators import VirtualKVPool\n"
            "p = VirtualKVPool(1, 1 << 20, page_size=64 << 10)\n"
            "p.map([1]); print(int(p.layer(0)[64 << 10])); p.unmap([1]).result()\n"
            "print(int(p.layer(0)[64 << 10]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == ["0"]
    assert proc.returncode == -11  # SIGSEGV: the bytes are gone, not silently zero


class OrderedBackend(HostBackend):
    """The host backend, recording which of its calls came first."""

    __slots__ = ("calls",)

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.calls: list[str] = []

    def commit(self, addrs, nbytes):
        self.calls.append(f"commit {len(addrs)}")
        super().commit(addrs, nbytes)

    def tensor(self, addr, nbytes):
        self.calls.append("tensor")
        return super().tensor(addr, nbytes)


def test_the_tensor_is_made_only_over_mapped_memory():
    backend = OrderedBackend()
    pool = VirtualKVPool(LAYERS, 8 * PAGE, page_size=PAGE, backend=backend)
    try:
        # Page 0 of every layer, in one commit, before torch sees the pointer.
        assert backend.calls == [f"commit {LAYERS}", "tensor"]
        assert pool.layer(LAYERS - 1)[:PAGE].eq(0).all()
        pool.map([1, 2, 3])
        assert backend.calls[-1] == f"commit {3 * LAYERS}"  # one call for a map's pages
    finally:
        pool.close()


def test_physical_pages_are_set_aside_up_to_the_limit_and_maps_stay_within():
    page_bytes = LAYERS * PAGE
    limit = 5 * page_bytes + PAGE  # five whole pages; the sixth would be short a layer
    pool = VirtualKVPool(LAYERS, 16 * PAGE, page_size=PAGE, physical_pages=12,
                         backend=HostBackend(limit=limit))
    try:
        assert pool.physical_pages == 5  # as many as fit, page 0's among them
        assert pool.stats().provisioned_bytes == 5 * page_bytes
        pool.map([1, 2, 3, 4])
        assert _resident(pool) == 5 * page_bytes
    finally:
        pool.close()
    unlimited = VirtualKVPool(LAYERS, 16 * PAGE, page_size=PAGE, physical_pages=100)
    assert unlimited.physical_pages == 16  # never more than the pool has
    unlimited.close()


def test_a_commit_beyond_the_limit_fails_whole_and_the_pool_goes_on():
    pool = VirtualKVPool(LAYERS, 16 * PAGE, page_size=PAGE,
                         backend=HostBackend(limit=4 * LAYERS * PAGE))
    try:
        pool.map([1, 2])
        with pytest.raises(PhysicalMemoryError, match="pass the backend's limit"):
            pool.map([3, 4])  # one would fit: neither is mapped
        assert [pool.is_mapped(j) for j in range(5)] == [True, True, True, False, False]
        assert _resident(pool) == pool.mapped_bytes == 3 * LAYERS * PAGE
        pool.unmap([2])
        pool.map([3])  # the memory given back is there again
        assert pool.mapped_pages == 3
    finally:
        pool.close()


def test_a_pool_with_no_memory_for_page_0_is_refused():
    with pytest.raises(PhysicalMemoryError):
        VirtualKVPool(LAYERS, 16 * PAGE, page_size=PAGE, physical_pages=4,
                      backend=HostBackend(limit=PAGE))


@pytest.mark.parametrize("block, requested, gran, expected", [
    (64 << 10, 64 << 10, 4096, 64 << 10),
    (16 << 10, 64 << 10, 4096, 64 << 10),
    (12288, 64 << 10, 4096, 73728),  # head_dim 96: pages hold whole blocks
    (12288, 2 << 20, 2 << 20, 6 << 20),
    (1 << 20, 4096, 4096, 1 << 20),  # a block larger than the asked page
], ids=["equal", "four-blocks", "odd-block", "odd-block-cuda", "big-block"])
def test_page_size_holds_whole_blocks(block, requested, gran, expected):
    page = page_size_for(block, requested, gran)
    assert page == expected and page % block == 0 and page % gran == 0


@pytest.mark.parametrize("text, value", [("65536", 65536), ("64KiB", 65536), ("2MiB", 2 << 20),
                                         ("1.5GiB", 3 << 29), ("64k", 65536), ("1GB", 10**9)])
def test_sizes(text, value):
    assert size_in_bytes(text) == value


@pytest.mark.parametrize("text", ["", "abc", "12 parsecs", "-1", "0"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError, match="size"):
        size_in_bytes(text)

"""CudaBackend's bookkeeping against a stand-in driver (this machine has no GPU): every
result is checked and names the call, a failed map is rolled back, kept physical pages
are reused, physical pages set aside up front are what maps use (and as many as the
device has, when it has fewer), the clears of one map call are waited for once, and
running out of memory fails clearly without leaking a handle.
The real driver is exercised by tests/test_vattention_gpu.py on a GPU."""

from __future__ import annotations

import enum
import itertools
from types import SimpleNamespace

import pytest

from vllm_ext.allocators import DriverError, PhysicalMemoryError, VirtualKVPool
from vllm_ext.allocators.cuda import CudaBackend

GRAN = 2 << 20


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_OUT_OF_MEMORY = 2


class FakeDriver:
    """Records calls; `fail[name] = CUresult` makes the next call of `name` fail."""

    CUresult = CUresult

    def __init__(self, capacity_pages: int = 1000) -> None:
        self.calls: list[str] = []
        self.fail: dict[str, CUresult] = {}
        self.live: set[int] = set()  # physical handles not released
        self.mapped: dict[int, int] = {}  # address -> handle
        self.capacity = capacity_pages
        self._ids = itertools.count(1)
        self.CUmemAllocationProp = lambda: SimpleNamespace(location=SimpleNamespace())
        self.CUmemAccessDesc = lambda: SimpleNamespace(location=SimpleNamespace())
        names = ("CU_MEM_ALLOCATION_TYPE_PINNED", "CU_MEM_LOCATION_TYPE_DEVICE",
                 "CU_MEM_ACCESS_FLAGS_PROT_READWRITE", "CU_MEM_ALLOC_GRANULARITY_MINIMUM")
        ns = SimpleNamespace(**{n: n for n in names})
        self.CUmemAllocationType = self.CUmemLocationType = ns
        self.CUmemAccess_flags = self.CUmemAllocationGranularity_flags = ns
        self.CUstream_flags = SimpleNamespace(CU_STREAM_NON_BLOCKING=1)
        self.cleared: list[int] = []  # addresses zeroed, in order

    def _r(self, name, *values):
        self.calls.append(name)
        code = self.fail.pop(name, CUresult.CUDA_SUCCESS)
        return (code, *values) if code == CUresult.CUDA_SUCCESS else (code, *([None] * len(values)))

    def cuGetErrorString(self, code):
        return CUresult.CUDA_SUCCESS, f"fake {code.name}".encode()

    def cuInit(self, flags): return self._r("cuInit")
    def cuDeviceGet(self, i): return self._r("cuDeviceGet", i)
    def cuDevicePrimaryCtxRetain(self, dev): return self._r("cuDevicePrimaryCtxRetain", "ctx")
    def cuCtxSetCurrent(self, ctx): return self._r("cuCtxSetCurrent")
    def cuMemGetAllocationGranularity(self, prop, flag): return self._r("granularity", GRAN)
    def cuMemAddressReserve(self, size, align, addr, flags): return self._r("reserve", 1 << 40)
    def cuMemAddressFree(self, addr, size): return self._r("cuMemAddressFree")

    def cuMemCreate(self, size, prop, flags):
        if len(self.live) >= self.capacity:
            self.fail.setdefault("cuMemCreate", CUresult.CUDA_ERROR_OUT_OF_MEMORY)
        out = self._r("cuMemCreate", next(self._ids))
        if out[0] == CUresult.CUDA_SUCCESS:
            self.live.add(out[1])
        return out

    def cuMemRelease(self, handle):
        self.live.discard(handle)
        return self._r("cuMemRelease")

    def cuMemMap(self, addr, size, offset, handle, flags):
        out = self._r("cuMemMap")
        if out[0] == CUresult.CUDA_SUCCESS:
            self.mapped[addr] = handle
        return out

    def cuMemUnmap(self, addr, size):
        self.mapped.pop(addr)
        return self._r("cuMemUnmap")

    def cuMemSetAccess(self, addr, size, desc, count): return self._r("cuMemSetAccess")
    def cuStreamCreate(self, flags): return self._r("cuStreamCreate", "stream")
    def cuStreamSynchronize(self, stream): return self._r("cuStreamSynchronize")
    def cuStreamDestroy(self, stream): return self._r("cuStreamDestroy")

    def cuMemsetD8Async(self, addr, value, size, stream):
        assert addr in self.mapped and value == 0 and size == GRAN
        out = self._r("cuMemsetD8Async")
        if out[0] == CUresult.CUDA_SUCCESS:
            self.cleared.append(addr)
        return out


class NoTensorBackend(CudaBackend):
    __slots__ = ()

    def tensor(self, addr, nbytes):
        return None  # no device to view

    def fence(self):
        return None  # no device work to wait for


def _pool(driver, layers=2, physical_pages=None, **kw):
    return VirtualKVPool(layers, 8 * GRAN, backend=NoTensorBackend(driver=driver, **kw),
                         physical_pages=physical_pages)


def test_pages_map_on_every_layer_and_handles_are_reused_up_to_the_limit():
    drv = FakeDriver()
    pool = _pool(drv, keep_handles=2)
    assert len(drv.mapped) == 2  # page 0, mapped with the pool
    pool.map([1, 2])
    assert len(drv.mapped) == 6 and len(drv.live) == 6  # 3 pages x 2 layers
    pool.unmap([1, 2]).result()
    assert len(drv.mapped) == 2 and len(drv.live) == 4  # two kept for reuse, two released
    creates = drv.calls.count("cuMemCreate")
    pool.map([5])
    assert drv.calls.count("cuMemCreate") == creates  # reused, no new physical memory
    assert pool.trim() == 0 and len(drv.live) == 4
    pool.close()
    assert drv.live == set() and drv.mapped == {} and "cuMemAddressFree" in drv.calls[-2:]


def test_every_mapped_page_is_cleared_before_use_fresh_or_reused():
    drv = FakeDriver()
    pool = _pool(drv, keep_handles=4)
    pool.map([1])
    assert sorted(drv.cleared) == sorted(drv.mapped)  # fresh from cuMemCreate
    pool.unmap([1]).result()
    drv.cleared.clear()
    creates = drv.calls.count("cuMemCreate")
    pool.map([1])
    assert drv.calls.count("cuMemCreate") == creates and len(drv.cleared) == 2  # kept, cleared
    pool.close()


def test_the_clears_of_one_map_call_are_waited_for_once():
    drv = FakeDriver()
    pool = _pool(drv, layers=4)
    start = len(drv.calls)
    pool.map([1, 2, 3])  # 3 pages x 4 layers
    calls = drv.calls[start:]
    assert calls.count("cuMemsetD8Async") == 12 and calls.count("cuStreamSynchronize") == 1
    assert calls[-1] == "cuStreamSynchronize"  # after the last clear, before map() returns
    pool.close()


@pytest.mark.parametrize("failing", ["cuMemMap", "cuMemSetAccess", "cuMemsetD8Async"])
def test_a_failed_map_is_rolled_back_and_names_the_call(failing):
    drv = FakeDriver()
    pool = _pool(drv)
    drv.fail[failing] = CUresult.CUDA_ERROR_INVALID_VALUE
    with pytest.raises(DriverError, match=f"{failing} failed: fake CUDA_ERROR_INVALID_VALUE"):
        pool.map([3, 4])  # a call's pages are mapped together or not at all
    assert not pool.is_mapped(3) and not pool.is_mapped(4) and pool.mapped_pages == 1
    assert len(drv.mapped) == 2  # page 0's layers only
    assert set(drv.mapped.values()) == drv.live  # nothing half-mapped, no handle leaked
    pool.map([3])  # and the page can be mapped afterwards
    pool.close()
    assert drv.live == set()


def test_out_of_memory_reuses_kept_pages_then_fails_clearly_without_leaks():
    drv = FakeDriver(capacity_pages=4)
    pool = _pool(drv, keep_handles=4)
    pool.map([1])  # all 4 physical pages in use (page 0 and page 1, 2 layers each)
    pool.unmap([1]).result()  # 2 kept
    pool.map([2])  # reuses the kept ones
    with pytest.raises(PhysicalMemoryError, match="cuMemCreate failed"):
        pool.map([3])
    assert pool.mapped_pages == 2
    pool.close()
    assert drv.live == set()


def test_physical_pages_set_aside_up_front_are_all_maps_use():
    drv = FakeDriver()
    pool = _pool(drv, physical_pages=5)
    assert pool.physical_pages == 5 and len(drv.live) == 10  # 5 pages x 2 layers
    creates = drv.calls.count("cuMemCreate")
    pool.map([1, 2, 3, 4])
    pool.unmap([2, 3]).result()
    pool.map([6])
    assert drv.calls.count("cuMemCreate") == creates  # maps only map (and clear)
    assert len(drv.live) == 10 and "cuMemRelease" not in drv.calls  # unmaps keep them
    assert pool.trim() == 0 and len(drv.live) == 10  # kept for the pool's life
    pool.close()
    assert drv.live == set() and drv.mapped == {}


def test_a_device_with_fewer_pages_than_asked_gives_what_it_has_and_maps_stay_within():
    drv = FakeDriver(capacity_pages=7)  # 3 pages of 2 layers, and half a page
    pool = _pool(drv, physical_pages=8)
    assert pool.physical_pages == 3 and len(drv.live) == 6  # the half page went back
    assert pool.stats().provisioned_bytes == 3 * 2 * GRAN
    pool.map([1, 2])
    with pytest.raises(PhysicalMemoryError, match="cuMemCreate failed"):
        pool.map([3])  # beyond what was set aside: loud, and nothing changes
    assert pool.mapped_pages == 3 and len(drv.live) == 6
    pool.close()
    assert drv.live == set()


def test_a_step_waits_once_for_its_pages_whatever_their_number_and_layers(monkeypatch):
    from vllm_ext.allocators.pages import PageOps
    from vllm_ext.allocators.settings import VAttentionSettings
    from vllm_ext.engine.vattention import Geometry, PoolRuntime

    monkeypatch.delenv("VLLMEXT_STATS_DIR", raising=False)
    drv = FakeDriver()
    layers = 4
    pool = _pool(drv, layers=layers, physical_pages=8)
    runtime = PoolRuntime(pool, Geometry(8, layers, GRAN, GRAN, 1), VAttentionSettings("cuda"))
    start = len(drv.calls)
    # A step whose new blocks open 3 pages, with 2 more mapped ahead in the background.
    runtime.apply(PageOps(map_now=(1, 2, 3), touched=(1, 2, 3), unmap=(), map_ahead=(4, 5),
                          live_blocks=4, live_pages=4, mapped_pages=6))
    pool.wait()
    calls = drv.calls[start:]
    assert calls.count("cuMemsetD8Async") == 5 * layers
    # One wait before the step runs, one on the pool's thread for the look-ahead: not
    # one per page and layer (20), as before.
    assert calls.count("cuStreamSynchronize") == 2
    assert "cuMemCreate" not in calls  # the pages were set aside when the pool was made
    runtime.shutdown()
    pool.close()

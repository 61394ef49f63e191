"""VirtualKVPool: KV memory reserved as contiguous virtual ranges, physical pages mapped on demand.

The pool reserves `num_layers` regions of `layer_bytes` (each rounded up to whole
pages) in one address range, so every layer's KV is one contiguous tensor whose
pointer never moves. A *page* is `page_size` bytes at the same offset in every
layer's region: mapping page j commits `num_layers * page_size` bytes, because a
block of tokens lives at the same offset in every layer.

Every map and unmap runs on one background thread, in the order asked: a caller
that needs pages now waits for them (`map`), one that will need them soon does
not (`map_async`, vAttention's overlap of mapping with compute), and `unmap` can
wait for the device to finish with the pages first (`fence`). Bookkeeping and
range checks happen in the caller's thread, so a bad request raises at once. The
pages of one call are committed together: on CUDA, one wait for all their clears.

Page 0 is mapped when the pool is made, before its tensor: torch is never handed a
pointer with no memory behind it (some releases ask the driver whose pointer it is).
With `physical_pages`, the pool sets aside physical memory for that many pages up
front, or for as many as the device has (`physical_pages` then says how many): maps
up to that count cannot run out of memory later, and on CUDA they skip the slow
allocation. Without it, memory is taken as pages are mapped and given back as they
are unmapped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from vllm_ext.allocators.errors import KVPoolError

DEFAULT_PAGE_SIZE = {"cuda": 2 << 20, "host": 64 << 10}


def make_backend(kind: str, **kwargs):
    if kind == "host":
        from vllm_ext.allocators.host import HostBackend

        return HostBackend(**kwargs)
    if kind == "cuda":
        from vllm_ext.allocators.cuda import CudaBackend

        return CudaBackend(**kwargs)
    raise KVPoolError(f"unknown KV pool backend {kind!r}; choose from: cuda, host")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True, slots=True)
class PoolStats:
    """What the pool has done so far. Latencies are per page (all layers); the pages
    mapped by one call share its time equally."""

    reserved_bytes: int
    mapped_bytes: int
    mapped_pages: int
    provisioned_bytes: int  # physical memory set aside up front (0: none)
    maps: int  # pages mapped, in total
    unmaps: int
    map_seconds: float  # summed over those pages
    unmap_seconds: float
    max_map_seconds: float
    critical_maps: int  # pages a caller had to wait for (sync maps and unfinished async ones)
    critical_wait_seconds: float


class VirtualKVPool:
    """Contiguous per-layer KV tensors over reserved virtual memory; see the module doc.

    `backend` is "host" (CPU memory, `mmap`/`madvise`) or "cuda" (CUDA VMM through
    cuda-python), or a backend object. `page_size` is rounded up to the backend's
    granularity (64 KiB on host and 2 MiB on CUDA by default). `physical_pages`: pages
    of physical memory to set aside up front (None: none, memory follows the maps).
    """

    def __init__(self, num_layers: int, layer_bytes: int, page_size: int | None = None,
                 backend="host", physical_pages: int | None = None,
                 **backend_kwargs) -> None:
        if num_layers < 1 or layer_bytes < 1:
            raise KVPoolError(f"a pool needs at least one layer of at least one byte, got "
                              f"{num_layers} layers of {layer_bytes} bytes")
        if isinstance(backend, str):
            backend = make_backend(backend, **backend_kwargs)
        self.backend = backend
        gran = self.backend.granularity
        requested = page_size or DEFAULT_PAGE_SIZE.get(self.backend.device, gran)
        self.page_size = round_up(requested, gran)
        self.num_layers = num_layers
        self.layer_bytes = layer_bytes
        self.region_bytes = round_up(layer_bytes, self.page_size)
        self.num_pages = self.region_bytes // self.page_size
        self.reserved_bytes = num_layers * self.region_bytes
        self._base = self.backend.reserve(self.reserved_bytes, self.page_size)
        self._mapped = bytearray(self.num_pages)  # as callers will see it once queued work is done
        self._actual = bytearray(self.num_pages)  # as the backend has it now
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="kv-pool")
        self._last: Future | None = None
        self._pending: dict[int, Future] = {}  # pages queued by map_async, until waited for
        self._lock = threading.Lock()
        self._counts = dict(maps=0, unmaps=0, map_seconds=0.0, unmap_seconds=0.0,
                            max_map_seconds=0.0, critical_maps=0, critical_wait_seconds=0.0)
        self._closed = False
        try:
            self.physical_pages = self._provision(physical_pages)
            self._mapped[0] = 1  # before the tensor (see the module doc)
            self._commit([0])
            self.buffer = self.backend.tensor(self._base, self.reserved_bytes)
        except BaseException:
            self._thread.shutdown()
            self.backend.free(self._base, self.reserved_bytes)
            raise

    # -- views ---------------------------------------------------------------------------
    def layer(self, i: int):
        """Layer i's KV bytes: one contiguous int8 tensor over the reserved range."""
        if not 0 <= i < self.num_layers:
            raise KVPoolError(f"layer {i} is outside 0..{self.num_layers - 1}")
        start = i * self.region_bytes
        return self.buffer[start:start + self.layer_bytes]

    @property
    def mapped_pages(self) -> int:
        return sum(self._actual)

    @property
    def mapped_bytes(self) -> int:
        return self.mapped_pages * self.page_size * self.num_layers

    def is_mapped(self, page: int) -> bool:
        return bool(self._mapped[self._check_page(page)])

    # -- mapping -------------------------------------------------------------------------
    def map(self, pages: Iterable[int]) -> None:
        """Map `pages` and return once they are usable (the caller's critical path)."""
        todo = self._claim(pages, want_mapped=False)
        t0 = time.perf_counter()
        self._result(self._submit(self._commit, todo))
        self._critical(len(todo), time.perf_counter() - t0)

    def map_async(self, pages: Iterable[int]) -> Future:
        """Queue `pages` for mapping in the background; `wait(pages)` before touching them."""
        todo = self._claim(pages, want_mapped=False)
        future = self._submit(self._commit, todo)
        self._pending.update(dict.fromkeys(todo, future))
        return future

    def unmap(self, pages: Iterable[int], fence=None) -> Future:
        """Give `pages` back; with a `fence` (backend.fence()), once the device is past it."""
        todo = self._claim(pages, want_mapped=True)
        for j in todo:
            self._pending.pop(j, None)
        return self._submit(self._decommit, todo, fence)

    def wait(self, pages: Iterable[int] | None = None) -> None:
        """Block until `pages` (default: all queued work) are mapped; re-raises a failure.

        Waiting for a page whose background map is unfinished counts as a critical map.
        """
        if pages is None:
            work = {self._last} if self._last is not None else set()
            late = [j for j, f in self._pending.items() if not f.done()]
            self._pending.clear()
        else:
            found = {j: self._pending.pop(j) for j in pages if j in self._pending}
            work = set(found.values())
            late = [j for j, f in found.items() if not f.done()]
        t0 = time.perf_counter()
        for future in work:
            self._result(future)
        self._critical(len(late), time.perf_counter() - t0)

    def idle(self) -> bool:
        """Whether every queued map and unmap has been carried out."""
        return self._last is None or self._last.done()

    def last_work(self) -> Future | None:
        """The most recently queued work (done when everything queued so far is done)."""
        return self._last

    def map_bytes(self, offset: int, nbytes: int) -> list[int]:
        """Map the pages under [offset, offset+nbytes) of every layer that are not mapped yet."""
        pages = [j for j in self._pages_of(offset, nbytes) if not self._mapped[j]]
        self.map(pages)
        return pages

    def unmap_bytes(self, offset: int, nbytes: int, fence=None) -> list[int]:
        """Unmap every page under [offset, offset+nbytes); each must be mapped."""
        pages = list(self._pages_of(offset, nbytes))
        self.unmap(pages, fence)
        return pages

    def map_blocks(self, first: int, count: int, block_bytes: int) -> list[int]:
        return self.map_bytes(first * block_bytes, count * block_bytes)

    def unmap_blocks(self, first: int, count: int, block_bytes: int, fence=None) -> list[int]:
        return self.unmap_bytes(first * block_bytes, count * block_bytes, fence)

    def trim(self) -> int:
        """Give back physical memory held for reuse (CUDA handles); returns bytes freed."""
        return self._result(self._submit(self.backend.trim))

    def stats(self) -> PoolStats:
        with self._lock:
            counts = dict(self._counts)
        provisioned = (self.physical_pages or 0) * self.page_size * self.num_layers
        return PoolStats(self.reserved_bytes, self.mapped_bytes, self.mapped_pages, provisioned,
                         **counts)

    def close(self) -> None:
        """Unmap everything and free the address range; tensors over it must be gone."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._thread.shutdown(wait=True)
            mapped = [j for j in range(self.num_pages) if self._actual[j]]
            if mapped:
                self._decommit(mapped, None)
            self.buffer = None
            self.backend.free(self._base, self.reserved_bytes)

    def __enter__(self) -> VirtualKVPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------
    def _check_page(self, page: int) -> int:
        if not 0 <= page < self.num_pages:
            raise KVPoolError(f"page {page} is outside the pool's pages 0..{self.num_pages - 1} "
                              f"({self.page_size} bytes each)")
        return page

    def _pages_of(self, offset: int, nbytes: int) -> range:
        if nbytes <= 0 or offset < 0 or offset + nbytes > self.layer_bytes:
            raise KVPoolError(f"byte range [{offset}, {offset + nbytes}) is outside a layer's "
                              f"[0, {self.layer_bytes})")
        return range(offset // self.page_size, (offset + nbytes - 1) // self.page_size + 1)

    def _claim(self, pages: Iterable[int], want_mapped: bool) -> list[int]:
        """Check and record the change in the caller's view; the thread makes it real."""
        if self._closed:
            raise KVPoolError("the pool is closed")
        todo = sorted(set(map(self._check_page, pages)))
        wrong = [j for j in todo if bool(self._mapped[j]) != want_mapped]
        if wrong:
            state = "not mapped (double unmap?)" if want_mapped else "already mapped"
            raise KVPoolError(f"pages {wrong[:8]}{'...' if len(wrong) > 8 else ''} are {state}")
        for j in todo:
            self._mapped[j] = not want_mapped
        return todo

    def _result(self, future: Future):
        """A failure is raised to one caller only; the pool stays usable after it."""
        try:
            return future.result()
        except BaseException:
            if self._last is future:
                self._last = None
            raise

    def _submit(self, fn, *args) -> Future:
        future = self._thread.submit(fn, *args)
        self._last = future
        return future

    def _addresses(self, page: int):
        for layer in range(self.num_layers):
            yield self._base + layer * self.region_bytes + page * self.page_size

    def _provision(self, pages: int | None) -> int | None:
        """Set aside physical memory for up to `pages` pages (every layer's share of a page
        or none of it); returns how many the device gave."""
        if pages is None:
            return None
        got = 0
        while got < min(pages, self.num_pages) and \
                self.backend.provision(self.page_size, self.num_layers):
            got += 1
        return got

    def _commit(self, pages: list[int]) -> None:
        if not pages:
            return
        t0 = time.perf_counter()
        try:
            self.backend.commit([a for j in pages for a in self._addresses(j)], self.page_size)
        except BaseException:
            for j in pages:
                self._mapped[j] = 0  # the caller's view falls back to what really happened
            raise
        for j in pages:
            self._actual[j] = 1
        dt = time.perf_counter() - t0
        with self._lock:
            c = self._counts
            c["maps"] += len(pages)
            c["map_seconds"] += dt
            c["max_map_seconds"] = max(c["max_map_seconds"], dt / len(pages))

    def _decommit(self, pages: list[int], fence) -> None:
        self.backend.wait(fence)
        t0 = time.perf_counter()
        self.backend.decommit([a for j in pages for a in self._addresses(j)], self.page_size)
        for j in pages:
            self._actual[j] = 0
        with self._lock:
            self._counts["unmaps"] += len(pages)
            self._counts["unmap_seconds"] += time.perf_counter() - t0

    def _critical(self, pages: int, seconds: float) -> None:
        if pages:
            with self._lock:
                self._counts["critical_maps"] += pages
                self._counts["critical_wait_seconds"] += seconds

"""Host backend: virtual memory on the CPU with the semantics of CUDA's VMM API.

`reserve` takes address space only (PROT_NONE, MAP_NORESERVE: no physical memory,
no swap accounting). `commit` makes a range readable and writable and faults its
pages in now, so the cost is paid where the caller decides (a background thread),
not at the first store of a kernel. `decommit` hands the pages back to the OS
(MADV_DONTNEED on private anonymous memory frees them at once) and makes the
range inaccessible again, so a stray read of unmapped KV faults here as it would
on a GPU instead of silently reading zeros.

With a `limit` the backend behaves like a device with that much memory: a commit
beyond it raises PhysicalMemoryError, and `provision` sets aside no more than it.
Nothing on the CPU needs that; it lets the tests run out of "device" memory where the
host has plenty (the engine glue sets it from VLLMEXT_HOST_KV_LIMIT, a test-only knob).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Sequence

from vllm_ext.allocators.errors import DriverError, PhysicalMemoryError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)

_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_PROT_NONE = 0
_MADV_DONTNEED = 4
_MADV_POPULATE_WRITE = 23  # Linux 5.14+; older kernels say EINVAL and we touch the pages
OS_PAGE = mmap.PAGESIZE


def _check(call: str, result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        cls = PhysicalMemoryError if err == errno.ENOMEM else DriverError
        raise cls(call, errno.errorcode.get(err, err), os.strerror(err))


class HostBackend:
    """Reserve, commit and decommit page-aligned ranges of CPU memory."""

    __slots__ = ("granularity", "_populate", "limit", "_committed", "_provisioned")
    device = "cpu"

    def __init__(self, limit: int | None = None) -> None:
        """`limit`: bytes this backend may commit at once (None: what the OS gives)."""
        self.granularity = OS_PAGE
        self._populate = True
        self.limit = limit
        self._committed = 0
        self._provisioned = 0

    def reserve(self, nbytes: int, alignment: int) -> int:
        """Address of `nbytes` of address space aligned to `alignment`; no memory behind it."""
        span = nbytes + alignment
        addr = _libc.mmap(None, span, _PROT_NONE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        if addr in (None, _MAP_FAILED):
            _check("mmap(PROT_NONE)", -1)
        start = -(-addr // alignment) * alignment
        # Give back the unaligned head and the tail so exactly [start, start+nbytes) stays.
        if start > addr:
            _check("munmap", _libc.munmap(addr, start - addr))
        tail = addr + span - (start + nbytes)
        if tail:
            _check("munmap", _libc.munmap(start + nbytes, tail))
        return start

    def free(self, addr: int, nbytes: int) -> None:
        _check("munmap", _libc.munmap(addr, nbytes))

    def provision(self, nbytes: int, count: int) -> bool:
        """Set aside `count` pages of `nbytes` for the backend's life, all or none.

        The OS hands out memory only when a page is committed, so there is nothing to
        hold here: the pages are only counted against `limit`.
        """
        if self.limit is not None and self._provisioned + count * nbytes > self.limit:
            return False
        self._provisioned += count * nbytes
        return True

    def commit(self, addrs: Sequence[int], nbytes: int) -> None:
        """Make `nbytes` at each of `addrs` readable, writable and resident; all or none."""
        total = len(addrs) * nbytes
        if self.limit is not None and self._committed + total > self.limit:
            raise PhysicalMemoryError("commit", "ENOMEM",
                                      f"{total} more bytes would pass the backend's limit of "
                                      f"{self.limit} ({self._committed} committed)")
        done: list[int] = []
        try:
            for addr in addrs:
                self._commit_one(addr, nbytes)
                done.append(addr)
        except BaseException:
            self._decommit_each(done, nbytes)
            raise
        self._committed += total

    def _commit_one(self, addr: int, nbytes: int) -> None:
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        _check("mprotect(READ|WRITE)", _libc.mprotect(addr, nbytes, rw))
        if self._populate:
            if _libc.madvise(addr, nbytes, _MADV_POPULATE_WRITE) == 0:
                return
            if ctypes.get_errno() != errno.EINVAL:
                _check("madvise(MADV_POPULATE_WRITE)", -1)
            self._populate = False
        # Freshly committed pages read as zeros, so writing zeros only faults them in.
        ctypes.memset(addr, 0, nbytes)

    def decommit(self, addrs: Sequence[int], nbytes: int) -> None:
        self._decommit_each(addrs, nbytes)
        self._committed -= len(addrs) * nbytes

    def _decommit_each(self, addrs: Sequence[int], nbytes: int) -> None:
        for addr in addrs:
            _check("madvise(MADV_DONTNEED)", _libc.madvise(addr, nbytes, _MADV_DONTNEED))
            _check("mprotect(PROT_NONE)", _libc.mprotect(addr, nbytes, _PROT_NONE))

    def tensor(self, addr: int, nbytes: int):
        """An int8 tensor over [addr, addr+nbytes), sharing the memory (no copy)."""
        import torch

        return torch.frombuffer((ctypes.c_int8 * nbytes).from_address(addr), dtype=torch.int8)

    def fence(self) -> None:
        return None  # the CPU runs nothing asynchronously on pool memory

    def wait(self, fence: None) -> None:
        pass

    def resident_bytes(self, addr: int, nbytes: int) -> int:
        """Bytes of [addr, addr+nbytes) backed by physical memory now (mincore)."""
        pages = -(-nbytes // OS_PAGE)
        vec = (ctypes.c_ubyte * pages)()
        _check("mincore", _libc.mincore(addr, nbytes, vec))
        return sum(b & 1 for b in vec) * OS_PAGE

    def trim(self) -> int:
        return 0  # decommitted pages already went back to the OS

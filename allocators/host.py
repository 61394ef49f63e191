"""Host backend: virtual memory on the CPU with the semantics of CUDA's VMM API.

`reserve` takes address space only (PROT_NONE, MAP_NORESERVE: no physical memory,
no swap accounting). `commit` makes a range readable and writable and faults its
pages in now, so the cost is paid where the caller decides (a background thread),
not at the first store of a kernel. `decommit` hands the pages back to the OS
(MADV_DONTNEED on private anonymous memory frees them at once) and makes the
range inaccessible again, so a stray read of unmapped KV faults here as it would
on a GPU instead of silently reading zeros.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

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

    __slots__ = ("granularity", "_populate")
    device = "cpu"

    def __init__(self) -> None:
        self.granularity = OS_PAGE
        self._populate = True

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

    def commit(self, addr: int, nbytes: int) -> None:
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

    def decommit(self, addr: int, nbytes: int) -> None:
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

"""A KV pool's statistics, shared between processes through a memory-mapped file.

The pool lives in a worker process and `/metrics` is served by the front end, so
each pool writes its own file (one writer, no locks): the latest totals and a ring
of (time, live bytes, bytes of the pages holding them, mapped bytes) samples, one
per engine step, each taken once the pool's queued work for the step before is done.
Readers in any process sum the files of a directory.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass, fields
from pathlib import Path

from vllm_ext.allocators.pool import PoolStats

_MAGIC = 0x5645_5854_4B56_504C  # "VEXTKVPL"
_HEADER = struct.Struct("<QQQ")  # magic, ring capacity, samples written
EXTRA = ("live_bytes", "live_page_bytes", "slot_requests", "slot_breaks")  # from the caller
TOTALS = (*EXTRA, *(f.name for f in fields(PoolStats)))
SAMPLE = ("t", "live_bytes", "live_page_bytes", "mapped_bytes")
_MAXIMA = frozenset({"max_map_seconds"})


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    totals: dict[str, float]  # summed over pools
    samples: tuple[tuple[float, ...], ...]  # SAMPLE fields, in time order


class PoolStatsWriter:
    __slots__ = ("path", "_mm", "_doubles", "_capacity", "_count")

    def __init__(self, directory: str | os.PathLike, capacity: int = 16384) -> None:
        self.path = Path(directory) / f"kvpool-{os.getpid()}.bin"
        size = _HEADER.size + 8 * (len(TOTALS) + len(SAMPLE) * capacity)
        with open(self.path, "w+b") as f:
            f.truncate(size)
            self._mm = mmap.mmap(f.fileno(), size)
        _HEADER.pack_into(self._mm, 0, _MAGIC, capacity, 0)
        self._doubles = memoryview(self._mm)[_HEADER.size:].cast("d")
        self._capacity, self._count = capacity, 0

    def write(self, stats: PoolStats, **extra: int) -> None:
        """`extra` holds the EXTRA values; live_bytes and live_page_bytes are required."""
        values = {**dict.fromkeys(EXTRA, 0), **extra,
                  **{f: getattr(stats, f) for f in TOTALS[len(EXTRA):]}}
        live_bytes, live_page_bytes = extra["live_bytes"], extra["live_page_bytes"]
        for i, name in enumerate(TOTALS):
            self._doubles[i] = float(values[name])
        n = len(SAMPLE)
        at = len(TOTALS) + n * (self._count % self._capacity)
        self._doubles[at:at + n] = memoryview(struct.pack(
            f"<{n}d", time.monotonic(), live_bytes, live_page_bytes, stats.mapped_bytes)).cast("d")
        self._count += 1  # publish after the sample is complete
        struct.pack_into("<Q", self._mm, 16, self._count)

    def close(self) -> None:
        self._doubles.release()
        self._mm.close()


def read_pool_dir(directory: str | os.PathLike | None) -> PoolSnapshot:
    """Every pool's statistics under `directory` (all engines, all ranks), combined."""
    totals = dict.fromkeys(TOTALS, 0.0)
    samples: list[tuple[float, ...]] = []
    for pool in read_pool_files(directory):
        for name, value in pool.totals.items():
            # A slowest map is a maximum over pools (tensor-parallel ranks), not a sum.
            totals[name] = max(totals[name], value) if name in _MAXIMA else totals[name] + value
        samples.extend(pool.samples)
    return PoolSnapshot(totals, tuple(sorted(samples)))


def read_pool_files(directory: str | os.PathLike | None) -> list[PoolSnapshot]:
    """Each pool's statistics under `directory` on its own (one per worker process)."""
    return [_read_file(path) for path in
            (sorted(Path(directory).glob("**/kvpool-*.bin")) if directory else ())]


def _read_file(path: Path) -> PoolSnapshot:
    data = path.read_bytes()
    magic, capacity, count = _HEADER.unpack_from(data, 0)
    if magic != _MAGIC:
        raise ValueError(f"{path} is not a vllm-ext KV pool statistics file")
    doubles = memoryview(data)[_HEADER.size:].cast("d")
    totals = {name: doubles[i] for i, name in enumerate(TOTALS)}
    ring = doubles[len(TOTALS):]
    samples = []
    for n in range(max(0, count - capacity), count):
        at = len(SAMPLE) * (n % capacity)
        samples.append(tuple(ring[at:at + len(SAMPLE)]))
    return PoolSnapshot(totals, tuple(samples))

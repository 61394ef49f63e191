"""Per-step scheduler statistics, shared between processes through a memory-mapped file.

The scheduler runs in the engine process and the metrics endpoint in the front-end
process, and vLLM's stats message has no room for extra fields. So each engine
process writes its own file (one writer, no locks): cumulative totals, cumulative
step-time histogram buckets, and a ring of the latest steps. Readers in any process
sum the files of a directory.
"""

from __future__ import annotations

import bisect
import mmap
import operator
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

_MAGIC = 0x5645_5854_5354_4550  # "VEXTSTEP"
_VERSION = 5
_HEADER = struct.Struct("<QQQQ")  # magic, version, ring capacity, steps written
STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One engine step as the scheduler saw it."""

    t_start: float  # the scheduler's clock (an engine's time.monotonic()) when scheduling began
    # From schedule() (or the previous step's output, if later) to this step's output
    # processed: scheduling + model execution + output processing on the synchronous
    # loop, the interval between two steps' outputs on the async one.
    wall_s: float
    decode_tokens: int
    prefill_tokens: int
    prefill_reqs: int  # requests computing prompt tokens this step
    partial_prefills: int  # of those, the ones whose prompt is still unfinished after it
    # Decodes that were running when the step was scheduled and had a token to compute
    # (those it did not schedule waited: a stall, unless the budget could not cover them);
    # decodes preempted by the step are counted in `preempted` instead.
    running_decodes: int
    preempted: int
    waiting: int  # requests still waiting after the step was scheduled
    # What the latency model needs (see vllm_ext.schedulers.latency):
    prefill_attention: float = 0.0  # sum over chunks of tokens * (earlier context + tokens / 2)
    decode_context: int = 0  # sum of the decodes' context lengths
    predicted_s: float = 0.0  # the step time the scheduler predicted (0: no prediction)
    # Prefill chunks scheduled while an earlier chunk of the same prompt was still in
    # the pipeline (sequence pipeline parallelism; only with pipeline parallelism).
    pipelined_chunks: int = 0
    # Deadline-aware scheduling (Mnemosyne): the least slack of the step's prefills when
    # it was scheduled (seconds; 0 without prefills or deadlines), and the first tokens
    # the step delivered, with those past their request's first-token deadline.
    min_slack_s: float = 0.0
    first_tokens: int = 0
    deadline_misses: int = 0
    # Running decodes that gave their slot to a stricter class's prefill this step
    # (Mnemosyne with per-request SLOs).
    decodes_deferred: int = 0


_FIELDS = tuple(f.name for f in fields(StepRecord))
_NF = len(_FIELDS)
_TOTALS = ("decode_tokens", "prefill_tokens", "prefill_reqs", "partial_prefills", "preempted",
           "wall_s", "predicted_s", "pipelined_chunks", "first_tokens", "deadline_misses",
           "decodes_deferred")
# An append runs every engine step: fields read and written as whole structs.
_RECORD, _RECORD_VALUES = struct.Struct(f"<{_NF}d"), operator.attrgetter(*_FIELDS)
_SUMS, _TOTAL_VALUES = struct.Struct(f"<{len(_TOTALS)}d"), operator.attrgetter(*_TOTALS)


def _layout(capacity: int) -> tuple[int, int, int, int]:
    """Byte offsets of totals, buckets, ring, and the file size."""
    totals = _HEADER.size
    buckets = totals + 8 * len(_TOTALS)
    ring = buckets + 8 * (len(STEP_SECONDS_BUCKETS) + 1)
    return totals, buckets, ring, ring + 8 * _NF * capacity


class StepLogWriter:
    """Appends step records to `<dir>/steps-<pid>.bin`; one writer per file."""

    __slots__ = ("path", "_mm", "_doubles", "_capacity", "_count", "_layout")

    def __init__(self, directory: str | os.PathLike, capacity: int = 8192) -> None:
        self.path = Path(directory) / f"steps-{os.getpid()}.bin"
        *_, size = _layout(capacity)
        with open(self.path, "w+b") as f:
            f.truncate(size)
            self._mm = mmap.mmap(f.fileno(), size)
        _HEADER.pack_into(self._mm, 0, _MAGIC, _VERSION, capacity, 0)
        self._doubles = memoryview(self._mm)[_HEADER.size:].cast("d")
        self._capacity = capacity
        self._count = 0
        self._layout = _layout(capacity)

    def append(self, rec: StepRecord) -> None:
        mm, (totals, _, ring, _) = self._mm, self._layout
        _SUMS.pack_into(mm, totals, *map(operator.add, _SUMS.unpack_from(mm, totals),
                                         _TOTAL_VALUES(rec)))
        # The first bucket whose upper bound the step is within (the last: beyond all).
        self._doubles[len(_TOTALS) + bisect.bisect_left(STEP_SECONDS_BUCKETS, rec.wall_s)] += 1
        _RECORD.pack_into(mm, ring + _RECORD.size * (self._count % self._capacity),
                          *_RECORD_VALUES(rec))
        # Publish the step only after its record is complete: readers trust `count`.
        self._count += 1
        struct.pack_into("<Q", mm, 24, self._count)

    def close(self) -> None:
        self._doubles.release()
        self._mm.close()


@dataclass(frozen=True, slots=True)
class StepStats:
    """Totals over every engine step in a directory, and the latest steps in time order."""

    steps: int
    totals: dict[str, float]
    step_seconds_buckets: tuple[tuple[float, int], ...]  # (upper bound, count in that bucket)
    recent: tuple[StepRecord, ...]


def read_dir(directory: str | os.PathLike | None) -> StepStats:
    """Sum every step file under `directory` (missing or empty directory: all zeros)."""
    steps = 0
    totals = dict.fromkeys(_TOTALS, 0.0)
    buckets = [0] * (len(STEP_SECONDS_BUCKETS) + 1)
    recent: list[StepRecord] = []
    for path in sorted(Path(directory).glob("**/steps-*.bin")) if directory else ():
        count, file_totals, file_buckets, records = _read_file(path)
        steps += count
        for name, v in zip(_TOTALS, file_totals):
            totals[name] += v
        buckets = [a + int(b) for a, b in zip(buckets, file_buckets)]
        recent.extend(records)
    recent.sort(key=lambda r: r.t_start)
    bounds = (*STEP_SECONDS_BUCKETS, float("inf"))
    return StepStats(steps, totals, tuple(zip(bounds, buckets)), tuple(recent))


def _read_file(path: Path) -> tuple[int, Sequence[float], Sequence[float], list[StepRecord]]:
    data = path.read_bytes()
    magic, version, capacity, count = _HEADER.unpack_from(data, 0)
    if magic != _MAGIC or version != _VERSION:
        raise ValueError(f"{path} is not a vllm-ext step log (version {_VERSION})")
    doubles = memoryview(data)[_HEADER.size:_layout(capacity)[3]].cast("d")
    nt, nb = len(_TOTALS), len(STEP_SECONDS_BUCKETS) + 1
    ring = doubles[nt + nb:]
    first = max(0, count - capacity)
    records = [_record(ring, (i % capacity) * _NF) for i in range(first, count)]
    return count, doubles[:nt], doubles[nt:nt + nb], records


_FLOAT = {"t_start", "wall_s", "prefill_attention", "predicted_s", "min_slack_s"}


def _record(ring: memoryview, at: int) -> StepRecord:
    vals = ring[at:at + _NF]
    return StepRecord(**{name: (v if name in _FLOAT else int(v))
                         for name, v in zip(_FIELDS, vals)})


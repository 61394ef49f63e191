"""User-facing latency metrics of one streamed request (Metron), free of any engine import.

A request is what its client saw: when it was sent, and each streamed event with
the time it arrived and how many tokens it carried. An event of k tokens counts as
one gap followed by k-1 zero gaps; an event of no tokens (a keep-alive, a final
usage chunk) is not a token and leaves the gaps alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class Timeline:
    sent: float
    events: tuple[tuple[float, int], ...]  # (arrival time, tokens in the event)
    completed: bool = True  # False: aborted or failed before its last token
    # Derived once: the bootstrap asks every timeline for these thousands of times.
    token_times: tuple[float, ...] = field(init=False, repr=False, compare=False)
    gaps: tuple[float, ...] = field(init=False, repr=False, compare=False)
    gap_array: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        times = tuple(t for t, n in self.events for _ in range(n))
        object.__setattr__(self, "token_times", times)  # arrival of every token, in order
        # Time between consecutive tokens (the first token's wait is TTFT, not a gap).
        object.__setattr__(self, "gaps", tuple(b - a for a, b in zip(times, times[1:])))
        object.__setattr__(self, "gap_array", np.asarray(self.gaps, dtype=float))

    @classmethod
    def of(cls, sent: float, events: Iterable[tuple[float, int]], completed: bool = True):
        return cls(sent, tuple((float(t), int(n)) for t, n in events), completed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        times = self.token_times
        return times[0] - self.sent if times else None

    @property
    def e2e(self) -> float | None:
        times = self.token_times
        return times[-1] - self.sent if times else None

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (tokens - 1); undefined below two tokens."""
        n = self.num_tokens
        return (self.e2e - self.ttft) / (n - 1) if n >= 2 else None

    @property
    def normalized_latency(self) -> float | None:
        return self.e2e / self.num_tokens if self.num_tokens else None


def deadline_misses(tl: Timeline, ttft_deadline: float, tbt_deadline: float) -> tuple[int, int]:
    """(missed, total) token deadlines of one request, Metron's slack-carrying walk.

    The first token is due `ttft_deadline` after sending (predicted prefill time plus
    TTFT slack); each later one `tbt_deadline` after the previous. Time saved on
    early tokens is banked as slack; a late token counts every deadline it overran
    and empties the bank.
    """
    times = tl.token_times
    if not times:
        return 0, 0
    missed = total = 0
    slack = 0.0
    prev = tl.sent
    for i, t in enumerate(times):
        gap, deadline = t - prev, (ttft_deadline if i == 0 else tbt_deadline)
        prev = t
        if gap <= deadline + slack:
            slack += deadline - gap
            total += 1
            continue
        if i == 0:
            misses = math.floor((gap - slack - ttft_deadline) / tbt_deadline) + 1
        else:
            misses = math.floor((gap - slack) / tbt_deadline)
        missed += misses
        total += misses
        slack = 0.0
    return missed, total


def fluidity_index(tl: Timeline, ttft_deadline: float, tbt_deadline: float) -> float | None:
    missed, total = deadline_misses(tl, ttft_deadline, tbt_deadline)
    return 1.0 - missed / total if total else None


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100] (value k = (n - 1) q / 100 of the
    sorted values, interpolated); NaN for no values."""
    if len(values) == 0:
        return float("nan")
    # A partition, not a sort: the bootstrap takes percentiles of every token gap of a
    # run a thousand times over.
    return float(np.percentile(np.asarray(values, dtype=float), q))


def pooled_gaps(timelines: Iterable[Timeline]) -> np.ndarray:
    """Every time-between-tokens gap of every request, as Metron pools them."""
    arrays = [tl.gap_array for tl in timelines]
    return np.concatenate(arrays) if arrays else np.zeros(0)

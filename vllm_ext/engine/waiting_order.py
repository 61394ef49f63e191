"""vLLM's waiting queue kept in a policy's order from step to step, not sorted every step.

A deadline policy (Mnemosyne's) orders a queue of thousands by keys that rarely change: a
request's key changes only when it falls behind its deadline and when it becomes overdue
(`MnemosynePolicy.order_key_until` says when). vLLM admits from the queue's head, puts
back the requests it skipped in their order, and removals keep an order; so only a
request that joins (an arrival at the tail, a preempted one at the head) and one whose key
expired need a place, found by bisection over the keys, which are kept in a list beside
the queue (comparing tuples in C, not calling a key function per probe).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any


class OrderedWaiting:
    """The order of one scheduler's waiting queue (a deque of vLLM requests).

    `key(req)` makes a request's key now and keeps it; `kept(req)` is the key last made,
    and `until(req)` when it expires (None: no key kept). Between steps `keys` holds the
    queue's keys in its order, and the queue is sorted by them."""

    def __init__(self, key: Callable[[Any], tuple], kept: Callable[[Any], tuple],
                 until: Callable[[Any], float | None]) -> None:
        self._key, self._kept, self._until = key, kept, until
        self.keys: list[tuple] = []
        self._expiries: list[tuple[float, int, Any]] = []  # a heap: (until, n, request)
        self._pushes = itertools.count()

    def in_step(self, waiting: deque) -> bool:
        """Whether the kept order still describes the queue (else sort it: `sort`)."""
        return len(self.keys) == len(waiting)

    def sort(self, waiting: deque) -> None:
        ordered = sorted(waiting, key=self._key)
        waiting.clear()
        waiting.extend(ordered)
        self.keys = list(map(self._kept, ordered))
        self._expiries = []
        for req in ordered:
            self._note_expiry(req)

    def place(self, waiting: deque, req: Any) -> None:
        """Put a request that is not in the queue where its key goes."""
        key = self._key(req)
        i = bisect.bisect_right(self.keys, key)
        self.keys.insert(i, key)
        waiting.insert(i, req)
        self._note_expiry(req)

    def take(self, waiting: deque, req: Any) -> bool:
        """Take a request out of the queue by its kept key; False if it is not there."""
        i = bisect.bisect_left(self.keys, self._kept(req))
        if i < len(waiting) and waiting[i] is req:
            del self.keys[i]
            del waiting[i]
            return True
        return False

    def left(self, waiting: deque, reqs: Iterable[Any]) -> None:
        """vLLM took these requests out of the queue (admitted them): drop their keys."""
        for key in map(self._kept, reqs):
            i = bisect.bisect_left(self.keys, key)
            if i < len(self.keys) and self.keys[i] == key:
                del self.keys[i]

    def expire(self, waiting: deque, now: float, still_waiting: Callable[[Any], bool]) -> None:
        """Place again each request whose key expired by `now`: all taken out by their
        old keys (the order they are in) before any is keyed anew."""
        expired = []
        while self._expiries and self._expiries[0][0] <= now:
            until, _, req = heapq.heappop(self._expiries)
            if still_waiting(req) and self._until(req) == until:
                expired.append(req)
        taken = [req for req in expired if self.take(waiting, req)]
        for req in taken:
            self.place(waiting, req)

    def _note_expiry(self, req: Any) -> None:
        until = self._until(req)
        if until is not None and until < math.inf:
            heapq.heappush(self._expiries, (until, next(self._pushes), req))

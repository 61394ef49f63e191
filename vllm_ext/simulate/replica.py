"""One simulated engine of a fleet: its own scheduler and KV cache on its own virtual
clock, taking in the requests routed to it at its step boundaries, as an engine core
takes in its input queue between steps."""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import dataclass

from vllm_ext.ab.client import RequestRecord
from vllm_ext.schedulers.latency import StepShape

# A scheduler that schedules nothing this many steps running, with requests waiting
# and none arriving, never will: the engine would hang the same way.
STUCK_STEPS = 100


@dataclass(slots=True)
class ReplicaFigures:
    """What one replica did: the figures that make imbalance between replicas visible."""

    requests: int = 0  # routed to it
    output_tokens: int = 0
    steps: int = 0
    busy_steps: int = 0  # steps that scheduled work
    busy_s: float = 0.0  # and their time on the device
    host_s: float = 0.0  # the scheduler's host time, as scaled onto the virtual clock
    max_running: int = 0

    def add(self, other: ReplicaFigures) -> None:
        for name in self.__slots__:
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, max(mine, theirs) if name == "max_running" else mine + theirs)


class Replica:
    """A `Driver` (vLLM's scheduler stepped without a model) and the requests routed to
    it that it has not yet taken in. `publish(kind, time, *values)` receives what the
    engine makes known: its request counts when they change (`counts`: waiting, running,
    KV usage), its KV usage at each step boundary (`kv`), and each request's end
    (`finished`: the request's id)."""

    def __init__(self, index: int, config, num_blocks: int,
                 step_time: Callable[[StepShape], float], host_scale: float,
                 records: list[RequestRecord], ids: dict[str, int],
                 first_scheduled: dict[str, float], publish, observed: frozenset[str]) -> None:
        from vllm_ext.tools.driver import Driver

        self.index = index
        self.driver = Driver(config, num_blocks, step_time, host_scale=host_scale)
        self.pending: collections.deque = collections.deque()  # routed, not yet taken in
        self.figures = ReplicaFigures()
        self._records, self._ids, self._first = records, ids, first_scheduled
        self._publish, self._observed = publish, observed
        self._counts = (0, 0)
        self._usage = 0.0
        self.empty_steps = 0  # in a row

    @property
    def has_work(self) -> bool:
        return bool(self.pending) or self.driver.busy

    @property
    def stalled(self) -> bool:
        """Busy, yet scheduling nothing for long: only a new request can change that."""
        return self.empty_steps >= STUCK_STEPS

    def next_time(self) -> float:
        """When this replica's next step starts (inf: it waits for a request)."""
        if self.driver.busy and not self.stalled:
            return self.driver.now
        if self.pending:  # idle (or stalled) until the next arrival
            return max(self.driver.now, self.pending[0].arrival)
        return math.inf

    def route(self, req) -> None:
        self.pending.append(req)
        self.figures.requests += 1

    def step(self):
        """Take in what has arrived, then one engine step; the step's Tick."""
        driver, figures = self.driver, self.figures
        driver.now = max(driver.now, self.next_time())
        while self.pending and self.pending[0].arrival <= driver.now:
            driver.add(self.pending.popleft())
            self.empty_steps = 0
        self._tell(driver.now)
        tick = driver.advance()
        figures.steps += 1
        figures.host_s += tick.host_s * driver.host_scale
        figures.max_running = max(figures.max_running, len(driver.scheduler.running))
        for r in tick.output.num_scheduled_tokens:
            self._first.setdefault(r, tick.start)
        records, ids = self._records, self._ids
        for r, n in tick.delivered.items():
            records[ids[r]].events.append((tick.done, n))
            figures.output_tokens += n
        for r in tick.finished:
            rec = records[ids[r]]
            rec.completed, rec.finish_reason = True, "length"
            rec.usage_tokens = sum(n for _, n in rec.events)
            self._publish("finished", tick.done, self.index, r)
        if tick.output.total_num_scheduled_tokens:
            self.empty_steps = 0
            figures.busy_steps += 1
            figures.busy_s += tick.duration
        else:
            self.empty_steps += 1
        self._tell(tick.done)
        return tick

    def _tell(self, t: float) -> None:
        """What the engine core publishes at a loop boundary (see routers.py)."""
        if not self._observed & {"counts", "kv"}:
            return
        sched = self.driver.scheduler
        usage = sched.get_kv_cache_usage()
        if "counts" in self._observed:
            running, waiting = sched.get_request_counts()
            if (running, waiting) != self._counts:
                self._counts = (running, waiting)
                self._publish("counts", t, self.index, waiting, running, usage)
        if "kv" in self._observed and usage != self._usage:
            self._usage = usage
            self._publish("kv", t, self.index, usage)

    def stuck_message(self) -> str:
        sched = self.driver.scheduler
        req = next(iter(sched.waiting), None) or next(iter(sched.running))
        rec = self._records[self._ids[req.request_id]]
        return (f"the scheduler scheduled nothing for {STUCK_STEPS} steps with "
                f"{len(sched.waiting)} requests waiting and {len(sched.running)} running, e.g. "
                f"request {rec.index} ({rec.prompt_tokens} prompt + {rec.max_tokens} output "
                f"tokens), and "
                f"{self.driver.block_pool.get_num_free_blocks()} of "
                f"{self.driver.initial_free_blocks} KV blocks free: a prompt may need more "
                f"KV than the cache holds (--kv-memory, --num-gpu-blocks)")

    def close(self) -> None:
        self.driver.close()

"""One trace through one arm on a virtual clock: one engine, or a fleet of replicas
behind a router.

Each replica's scheduler is the class the arm's flags select, built by
`vllm_ext.tools.driver.Driver` from the arm's engine config over a KV cache of a given
number of blocks. Each step is vLLM's `schedule()`, a duration from the step-time
source for the step's batch, then the made-up model output (one token for every
request whose prompt is complete, none for a partial prefill) through
`update_from_output()`, on the engine loop the arm's config runs (async or
synchronous). The scheduler's own host time, measured on each call and scaled to the
serving host (`host_scale`), takes virtual time as that loop spends it (see
`vllm_ext.tools.driver`). A token reaches its client when its step's output is
processed; nothing else (network, detokenization, the API server) takes time.

A fleet's replicas are independent engines, each on its own clock; the loop below
always moves the one furthest behind, and routes each arrival once every replica has
reached it, handing the router (`routers.py`) what the engines made known until then.
With one replica this is exactly the single engine's loop.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vllm_ext.ab.client import SEND_VALUES, RequestRecord, SLOSending
from vllm_ext.ab.traces import Trace
from vllm_ext.schedulers.latency import StepShape
from vllm_ext.simulate.replica import STUCK_STEPS, Replica, ReplicaFigures
from vllm_ext.simulate.routers import Router, make_router

__all__ = ["STUCK_STEPS", "Fleet", "SimRun", "SimulationError", "simulate_trace"]


class SimulationError(RuntimeError):
    """A simulation that cannot finish (say, a prompt larger than the whole KV cache)."""


@dataclass(frozen=True, slots=True)
class Fleet:
    """How many replicas serve an arm, and how requests are routed between them."""

    replicas: int = 1
    router: str = "vllm-dp"
    api_servers: int | None = None  # vllm-dp: vLLM's --api-server-count (default: replicas)

    def make_router(self) -> Router:
        return make_router(self.router, self.replicas, self.api_servers)


@dataclass
class SimRun:
    """What one trace did in one arm: the client's view of each request, and the
    engines' (time from arrival to first scheduling, and each replica's figures)."""

    records: list[RequestRecord]
    sched_delays: list[float]  # per request, seconds
    steps: int
    simulated_s: float  # virtual time from the first arrival to the last token
    busy_steps: int  # steps that scheduled work (what a server's vllm_ext_steps counts)
    busy_s: float  # and their virtual time on the device
    wall_s: float  # how long simulating took
    max_running: int
    host_s: float = 0.0  # the scheduler's host time, as scaled onto the virtual clock
    replicas: list[ReplicaFigures] = field(default_factory=list)

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.wall_s if self.wall_s else float("nan")


def simulate_trace(config, num_blocks: int, trace: Trace, step_time: Callable[[StepShape], float],
                   on_done: Callable[[], None] | None = None, host_scale: float = 0.0,
                   sending: SLOSending = SEND_VALUES, fleet: Fleet = Fleet()) -> SimRun:
    """Every request of `trace` through `fleet.replicas` fresh schedulers of `config`
    (each with `num_blocks` KV blocks), routed by `fleet.router`: open-loop traces at
    their arrival times, closed loops (`trace.concurrency`) one in as one finishes.
    A request's SLOs reach the scheduler as a served request's do once the API server
    has taken them, as `sending` says: in its SamplingParams.extra_args, and its priority."""
    from vllm_ext.tools.driver import Req

    started = time.perf_counter()
    reqs = [Req.of(f"{trace.seed}-{i}", r.arrival, r.prompt_tokens, r.output_tokens,
                   sending.fields(r) or None, sending.request(r)[0].get("priority", 0))
            for i, r in enumerate(trace.requests)]
    ids = {r.req_id: i for i, r in enumerate(reqs)}
    records = [RequestRecord.planned(i, r, r.arrival) for i, r in enumerate(trace.requests)]
    # A server refuses a request that cannot fit its context (HTTP 400): so does this.
    limit = config.model_config.max_model_len
    for rec in records:
        if rec.prompt_tokens + rec.max_tokens > limit:
            rec.error = (f"{rec.prompt_tokens} prompt + {rec.max_tokens} output tokens exceed "
                         f"max_model_len {limit}")
    served = [r for r, rec in zip(reqs, records) if not rec.error]
    first_scheduled: dict[str, float] = {}
    loop = _Loop(config, num_blocks, step_time, host_scale, records, ids, first_scheduled,
                 fleet, served, trace.concurrency, on_done)
    try:
        loop.run()
    finally:
        loop.close()
    figures = [r.figures for r in loop.replicas]
    last = max((r.events[-1][0] for r in records if r.events), default=0.0)
    delays = [first_scheduled[r.req_id] - records[ids[r.req_id]].sent for r in served]
    if on_done is not None:
        for _ in range(len(reqs) - len(served)):
            on_done()
    return SimRun(records, delays, sum(f.steps for f in figures),
                  last - min(r.sent for r in records), sum(f.busy_steps for f in figures),
                  sum(f.busy_s for f in figures), time.perf_counter() - started,
                  max(f.max_running for f in figures), sum(f.host_s for f in figures), figures)


class _Loop:
    """The fleet's event loop: arrivals and router events in heaps, replicas moved in
    order of their next step."""

    def __init__(self, config, num_blocks, step_time, host_scale, records, ids,
                 first_scheduled, fleet: Fleet, served, concurrency, on_done) -> None:
        self.router = fleet.make_router()
        self.records, self.ids, self.on_done = records, ids, on_done
        self.events: list[tuple] = []  # (time, order, kind, args) for the router
        self.order = 0
        self.replicas: list[Replica] = []
        for i in range(fleet.replicas):
            self.replicas.append(Replica(i, config, num_blocks, step_time, host_scale, records,
                                         ids, first_scheduled, self._publish,
                                         self.router.observes))
        # Closed loop: the first `concurrency` now, the next one as each request ends.
        first = served if concurrency is None else served[:concurrency]
        self.later = [] if concurrency is None else list(reversed(served[concurrency:]))
        self.arrivals = [(r.arrival, self._next(), r) for r in first]
        heapq.heapify(self.arrivals)
        self.moves: list[tuple[float, int, int]] = []  # (next step, order, replica)

    def _next(self) -> int:
        self.order += 1
        return self.order

    def _publish(self, kind: str, t: float, replica: int, *args) -> None:
        if kind == "finished":
            req = args[0]
            if self.later:  # closed loop: the next request is sent as this one ends
                heapq.heappush(self.arrivals, (t, self._next(), _sent_at(self.later.pop(), t)))
            if self.on_done is not None:
                self.on_done()
            if "finished" not in self.router.observes:
                return
            args = (self.ids[req],)
        heapq.heappush(self.events, (t, self._next(), kind, (t, replica, *args)))

    def _schedule(self, replica: Replica) -> None:
        t = replica.next_time()
        if t < math.inf:
            heapq.heappush(self.moves, (t, self._next(), replica.index))

    def _next_move(self) -> tuple[float, Replica | None]:
        while self.moves:
            t, _, i = self.moves[0]
            replica = self.replicas[i]
            if replica.next_time() == t:
                return t, replica
            heapq.heappop(self.moves)  # stale: the replica has moved since
        return math.inf, None

    def run(self) -> None:
        router = self.router
        while True:
            t_move, replica = self._next_move()
            if self.arrivals and self.arrivals[0][0] <= t_move:
                t, _, req = heapq.heappop(self.arrivals)
                while self.events and self.events[0][0] <= t:
                    _, _, kind, args = heapq.heappop(self.events)
                    getattr(router, kind)(*args)
                target = self.replicas[router.route(t, self.ids[req.req_id])]
                target.route(req)
                self.records[self.ids[req.req_id]].sent = req.arrival
                self._schedule(target)
            elif replica is not None:
                heapq.heappop(self.moves)
                replica.step()
                self._schedule(replica)
            else:
                stuck = [r for r in self.replicas if r.has_work]
                if stuck:  # work left, none of it can move, and nothing more will arrive
                    raise SimulationError(stuck[0].stuck_message())
                return

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()


def _sent_at(req, t: float):
    return dataclasses.replace(req, arrival=t)

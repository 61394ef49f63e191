"""One trace through one arm's scheduler on a virtual clock.

The scheduler is the class the arm's flags select, built by `vllm_ext.tools.driver.Driver`
from the arm's engine config over a KV cache of a given number of blocks. Each step
is vLLM's `schedule()`, a duration from the step-time source for the step's batch,
then the made-up model output (one token for every request whose prompt is complete,
none for a partial prefill) through `update_from_output()`, on the engine loop the
arm's config runs (async or synchronous). The scheduler's own host time, measured on
each call and scaled to the serving host (`host_scale`), takes virtual time as that loop
spends it (see `vllm_ext.tools.driver`). A token reaches its client when its step's
output is processed; nothing else (network, detokenization, the API server) takes time.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from vllm_ext.ab.client import SEND_VALUES, RequestRecord, SLOSending
from vllm_ext.ab.traces import Trace
from vllm_ext.schedulers.latency import StepShape

# A scheduler that schedules nothing this many steps running, with requests waiting
# and none arriving, never will: the engine would hang the same way.
STUCK_STEPS = 100


class SimulationError(RuntimeError):
    """A simulation that cannot finish (say, a prompt larger than the whole KV cache)."""


@dataclass
class SimRun:
    """What one trace did in one arm: the client's view of each request, and the
    engine's (time from arrival to first scheduling)."""

    records: list[RequestRecord]
    sched_delays: list[float]  # per request, seconds
    steps: int
    simulated_s: float  # virtual time from the first arrival to the last token
    busy_steps: int  # steps that scheduled work (what a server's vllm_ext_steps counts)
    busy_s: float  # and their virtual time on the device
    wall_s: float  # how long simulating took
    max_running: int
    host_s: float = 0.0  # the scheduler's host time, as scaled onto the virtual clock

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.wall_s if self.wall_s else float("nan")


def simulate_trace(config, num_blocks: int, trace: Trace, step_time: Callable[[StepShape], float],
                   on_done: Callable[[], None] | None = None, host_scale: float = 0.0,
                   sending: SLOSending = SEND_VALUES) -> SimRun:
    """Every request of `trace` through a fresh scheduler of `config`: open-loop traces
    at their arrival times, closed loops (`trace.concurrency`) one in as one finishes.
    A request's SLOs reach the scheduler as a served request's do once the API server
    has taken them, as `sending` says: in its SamplingParams.extra_args, and its priority."""
    from vllm_ext.tools.driver import Driver, Req

    started = time.perf_counter()
    reqs = [Req.of(f"{trace.seed}-{i}", r.arrival, r.prompt_tokens, r.output_tokens,
                   sending.fields(r) or None, sending.request(r)[0].get("priority", 0))
            for i, r in enumerate(trace.requests)]
    index = {r.req_id: i for i, r in enumerate(reqs)}
    records = [RequestRecord.planned(i, r, r.arrival) for i, r in enumerate(trace.requests)]
    first_scheduled: dict[str, float] = {}
    # A server refuses a request that cannot fit its context (HTTP 400): so does this.
    limit = config.model_config.max_model_len
    for r, rec in zip(reqs, records):
        if rec.prompt_tokens + rec.max_tokens > limit:
            rec.error = (f"{rec.prompt_tokens} prompt + {rec.max_tokens} output tokens exceed "
                         f"max_model_len {limit}")
    refused = {r.req_id for r, rec in zip(reqs, records) if rec.error}
    reqs = [r for r in reqs if r.req_id not in refused]
    closed = trace.concurrency is not None
    pending = collections.deque(reqs[:trace.concurrency] if closed else reqs)
    later = collections.deque(reqs[trace.concurrency:] if closed else ())
    steps = busy_steps = idle = max_running = 0
    busy = 0.0
    host = 0.0
    with Driver(config, num_blocks, step_time, host_scale=host_scale) as driver:
        sched = driver.scheduler
        while pending or later or driver.busy:
            if pending and not driver.busy:
                driver.now = max(driver.now, pending[0].arrival)  # idle until the next arrival
            while pending and pending[0].arrival <= driver.now:
                req = pending.popleft()
                driver.add(req)
                records[index[req.req_id]].sent = driver.now if closed else req.arrival
            tick = driver.advance()
            steps += 1
            host += tick.host_s * host_scale
            max_running = max(max_running, len(sched.running))
            end = tick.done
            for r in tick.output.num_scheduled_tokens:
                first_scheduled.setdefault(r, tick.start)
            for r, n in tick.delivered.items():
                records[index[r]].events.append((end, n))
            for r in tick.finished:
                rec = records[index[r]]
                rec.completed, rec.finish_reason = True, "length"
                rec.usage_tokens = sum(n for _, n in rec.events)
                if later:  # closed loop: the next request is sent as this one ends
                    pending.append(dataclasses.replace(later.popleft(), arrival=end))
                if on_done is not None:
                    on_done()
            if tick.output.total_num_scheduled_tokens:
                idle = 0
                busy_steps += 1
                busy += tick.duration
            elif not pending:
                idle += 1
                if idle >= STUCK_STEPS:
                    raise SimulationError(
                        f"the scheduler scheduled nothing for {STUCK_STEPS} steps with "
                        f"{len(sched.waiting)} requests waiting, e.g. "
                        f"{_describe(sched.waiting, records, index)}, and "
                        f"{driver.block_pool.get_num_free_blocks()} of "
                        f"{driver.initial_free_blocks} KV blocks free: a prompt may need more "
                        f"KV than the cache holds (--kv-memory, --num-gpu-blocks)")
    sent = [r.sent for r in records]
    last = max((r.events[-1][0] for r in records if r.events), default=0.0)
    delays = [first_scheduled[r.req_id] - records[index[r.req_id]].sent for r in reqs]
    if on_done is not None:
        for _ in refused:
            on_done()
    return SimRun(records, delays, steps, last - min(sent), busy_steps, busy,
                  time.perf_counter() - started, max_running, host)


def _describe(waiting, records, index) -> str:
    req = next(iter(waiting))
    rec = records[index[req.request_id]]
    return f"request {rec.index} ({rec.prompt_tokens} prompt + {rec.max_tokens} output tokens)"

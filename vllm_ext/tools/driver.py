"""vLLM's own scheduler, stepped in this process with made-up model outputs and no model.

Why: a claim about scheduling (budget kept, decodes never stalled, FCFS, every request
finishing) is worth checking on the engine's real loop, KV block pool and prefix cache,
not on a copy of them. The driver builds the scheduler class that the selection picks
(`vllm_ext.engine_kwargs(scheduler=...)`; vLLM's own class without one) from a real
`VllmConfig` on the CPU, as vLLM's engine core does, but hands it a KV cache of a chosen
number of blocks instead of profiling memory. Each step is `schedule()`, then the model
runner's answer made up as vLLM's own scheduler tests do (tests/v1/core): one sampled
token for every request whose prompt is complete after the step, none for a partial
prefill; then `update_from_output()`.

Time is virtual. A step lasts what `step_time` says for its shape on the device (one
unit unless given, e.g. `LatencyModel.predict`), a request joins the waiting queue once
the clock reaches its arrival, and vllm-ext's schedulers time their steps by this clock,
so adaptive chunking's online correction learns the given step times. With `host_scale`
the host's work takes virtual time too: each `schedule()` and `update_from_output()` its
measured wall time here times that factor. The host and the device then follow the
engine core's loop: on the synchronous loop a step costs schedule + device +
update; on the async loop the device runs each step as soon as it is scheduled and the
previous one has ended, so the host's work hides behind the device's but for what
exceeds it (a step's interval is max(device, update + next schedule)).

    config = engine_config(model_dir, scheduler="sarathi", sarathi_token_budget=64)
    with Driver(config, num_blocks=40) as driver:
        steps = driver.run([Req.of("a", 0.0, 100, 8), Req.of("b", 2.0, 30, 4)])
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from unittest import mock

from vllm.config import VllmConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import (get_request_block_hasher, init_none_hash,
                                         resolve_kv_cache_block_sizes)
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import FinishReason
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

import vllm_ext
from vllm_ext import envs
from vllm_ext.engine.scheduling import StockScheduler, req_state, samples_ahead, state_before
from vllm_ext.schedulers.latency import StepShape
from vllm_ext.schedulers.request import ReqState

# Up to vLLM 0.33 a model runner's output carries its own request index; 0.34 dropped it
# (the index is the position in req_ids).
_INDEXED_OUTPUT = "req_id_to_index" in {f.name for f in fields(ModelRunnerOutput)}

__all__ = ["Driver", "Livelock", "Req", "Step", "Tick", "engine_config", "kv_cache_config",
           "loop_as_on_gpu"]

# The token every made-up sample is. Requests end by length (ignore_eos), so its value
# matters only to the prefix cache, which hashes output tokens too.
SAMPLED_TOKEN = 3


def engine_config(model: str | Path, **kwargs: Any) -> VllmConfig:
    """The engine's config for `model` (a directory; its config.json alone is enough,
    see `vllm_ext.tools.models.make_shape`) with `vllm_ext.engine_kwargs`'s components and
    options (`scheduler="sarathi"`, `sarathi_token_budget=64`, any engine argument).
    The driver never tokenizes. It runs vLLM's synchronous loop unless
    `async_scheduling=True` (which the CPU platform would turn off: see
    `loop_as_on_gpu`)."""
    kwargs = {"skip_tokenizer_init": True, **kwargs}
    loop = bool(kwargs.pop("async_scheduling", False))
    with loop_as_on_gpu(loop):
        return EngineArgs(**vllm_ext.engine_kwargs(model=str(model), async_scheduling=loop,
                                                   **kwargs)).create_engine_config()


@contextlib.contextmanager
def loop_as_on_gpu(on: bool = True):
    """Configs built meanwhile keep the loop vLLM's own config resolution chose (on a
    GPU: async unless an option forbids it) where the CPU platform would turn it off:
    the engine core the driver stands in for is a GPU's. `on=False` changes nothing."""
    if not on:
        yield
        return
    from vllm.platforms import current_platform

    platform = type(current_platform)
    own = platform.check_and_update_config

    def keep_loop(cls, vllm_config) -> None:
        chosen = vllm_config.scheduler_config.async_scheduling
        own(vllm_config)
        vllm_config.scheduler_config.async_scheduling = chosen

    with mock.patch.object(platform, "check_and_update_config", classmethod(keep_loop)):
        yield


def kv_cache_config(config: VllmConfig, num_blocks: int) -> KVCacheConfig:
    """A KV cache of `num_blocks` blocks, one full-attention group over every layer of
    the model: what the engine core would size from free memory, chosen instead."""
    model, parallel = config.model_config, config.parallel_config
    spec = FullAttentionSpec(block_size=config.cache_config.block_size,
                             num_kv_heads=model.get_num_kv_heads(parallel),
                             head_size=model.get_head_size(), dtype=model.dtype)
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(model.get_num_layers(parallel))]
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(layers, spec)])


@dataclass(frozen=True, slots=True)
class Req:
    """A request of a workload: it joins the waiting queue at `arrival` (virtual time,
    also its vLLM `arrival_time`) and ends after exactly `max_tokens` output tokens."""

    req_id: str
    arrival: float
    prompt: tuple[int, ...]  # token ids; prompts that share a prefix share its KV blocks
    max_tokens: int
    cache_salt: str | None = None
    # The request's SamplingParams.extra_args, as vLLM's server fills them from its
    # `vllm_xargs` (per-request SLOs: vllm_ext.schedulers.slo).
    extra_args: Mapping[str, Any] | None = None
    priority: int = 0  # vLLM's request priority (lower first; a priority-policy scheduler)

    @classmethod
    def of(cls, req_id: str, arrival: float, prompt: int | Sequence[int],
           max_tokens: int, extra_args: Mapping[str, Any] | None = None,
           priority: int = 0) -> Req:
        """A prompt given by its length shares no prefix with any other request (its
        prefix-cache hashes are salted with its id)."""
        if isinstance(prompt, int):
            return cls(req_id, arrival, (0,) * prompt, max_tokens, cache_salt=req_id,
                       extra_args=extra_args, priority=priority)
        return cls(req_id, arrival, tuple(prompt), max_tokens, extra_args=extra_args,
                   priority=priority)

    def __repr__(self) -> str:
        salt = f", cache_salt={self.cache_salt!r}" if self.cache_salt else ""
        extra = f", extra_args={dict(self.extra_args)!r}" if self.extra_args else ""
        extra += f", priority={self.priority}" if self.priority else ""
        return (f"Req({self.req_id!r}, {self.arrival!r}, {_runs(self.prompt)}, "
                f"{self.max_tokens}{salt}{extra})")

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython's and Hypothesis's printer
        printer.text(repr(self))


def _runs(tokens: Sequence[int]) -> str:
    """Token ids, short enough to read in a failing example: `[100..163, 7*40]`."""
    parts, i = [], 0
    while i < len(tokens):
        j = i + 1
        while j < len(tokens) and tokens[j] == tokens[i]:
            j += 1
        if j == i + 1:
            while j < len(tokens) and tokens[j] == tokens[j - 1] + 1:
                j += 1
        first, last = tokens[i], tokens[j - 1]
        parts.append(str(first) if j == i + 1 else f"{first}*{j - i}" if first == last
                     else f"{first}..{last}")
        i = j
    return f"[{', '.join(parts)}]"


@dataclass(frozen=True, slots=True)
class Step:
    """One engine step as the driver saw it."""

    index: int
    start: float  # virtual time when the step was scheduled
    duration: float  # on the device (on the async loop it starts once the device is free)
    budget: int  # the token budget the scheduler handed out this step
    running: tuple[ReqState, ...]  # running requests before the step, in the scheduler's order
    waiting: tuple[ReqState, ...]  # the waiting queue before the step, in order
    scheduled: dict[str, int]  # tokens per request, in the order the scheduler gave them
    # Each scheduled request as its tokens began: `num_computed` counts the prefix-cache
    # hit that a request admitted in this step found.
    states: dict[str, ReqState]
    admitted: tuple[str, ...]  # taken from the waiting queue this step, in order
    preempted: frozenset[str]
    finished: tuple[str, ...]
    free_blocks: int  # free KV blocks once the step's output was processed

    @property
    def shape(self) -> StepShape:
        return StepShape.of((self.states[r], n) for r, n in self.scheduled.items())

    @property
    def prefill_tokens(self) -> int:
        return sum(n for r, n in self.scheduled.items() if not self.states[r].is_decode)

    def cached(self, req_id: str) -> int:
        """Tokens that a request admitted in this step found in the prefix cache."""
        before = next(s for s in self.waiting if s.req_id == req_id)
        return self.states[req_id].num_computed - before.num_computed


@dataclass(frozen=True, slots=True)
class Tick:
    """One step as a simulation needs it (`Driver.advance`)."""

    start: float  # virtual time the device starts it
    duration: float
    output: SchedulerOutput
    states: dict[str, ReqState]  # each scheduled request as its tokens began
    shape: StepShape
    finished: tuple[str, ...]
    delivered: dict[str, int]  # output tokens each request received at the step's end
    # Wall seconds this process spent in the scheduler's schedule() and
    # update_from_output() (the host's work per step; making up the output is not in it).
    host_s: float = 0.0
    # Virtual time its output was processed: its tokens reach their clients then (the
    # device's end, plus the update's host time where the host takes time).
    done: float = 0.0


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A step scheduled, its output not yet handed back."""

    out: SchedulerOutput
    scheduled_at: float  # virtual time of its schedule()
    start: float  # virtual time the device starts it
    duration: float
    states: dict[str, ReqState]
    shape: StepShape
    sampled: frozenset[str]  # requests that sample a token in it
    host_s: float  # schedule()'s wall seconds
    before: tuple | None  # running, waiting and the budget as it was scheduled (for `step`)


class Livelock(RuntimeError):
    """Requests were still unfinished after the step cap."""


def _one_unit(shape: StepShape) -> float:
    return 1.0


class Driver:
    """One fresh scheduler over a KV cache of `num_blocks` blocks, driven step by step.

    The driver sets `config.cache_config.num_gpu_blocks`, as the engine core does once
    it has sized the KV cache, so drivers may share a config but not run interleaved.
    With `step_log`, vllm-ext's schedulers write their step records where the environment
    says (VLLMEXT_STATS_DIR), as in a served engine: for measuring what they cost.
    """

    # What times the scheduler's own calls (host_s; with `host_scale`, virtual time too).
    timer = staticmethod(time.perf_counter)

    def __init__(self, config: VllmConfig, num_blocks: int,
                 step_time: Callable[[StepShape], float] = _one_unit,
                 step_log: bool = False, host_scale: float = 0.0) -> None:
        config.cache_config.num_gpu_blocks = num_blocks
        kv_config = kv_cache_config(config, num_blocks)
        block_size, hash_block_size = resolve_kv_cache_block_sizes(kv_config, config)
        self.step_time = step_time
        # Virtual seconds per wall second of the scheduler's own work (0: none).
        self.host_scale = host_scale
        self.now = 0.0
        with contextlib.nullcontext() if step_log else _no_step_log():
            self.scheduler: Scheduler = config.scheduler_config.get_scheduler_cls()(
                vllm_config=config, kv_cache_config=kv_config,
                structured_output_manager=StructuredOutputManager(config),
                block_size=block_size, hash_block_size=hash_block_size)
        if isinstance(self.scheduler, StockScheduler):
            self.scheduler.clock = self.scheduler.arrival_clock = lambda: self.now
        self._block_hasher = None
        if config.cache_config.enable_prefix_caching:
            hash_fn = get_hash_fn_by_name(config.cache_config.prefix_caching_hash_algo)
            init_none_hash(hash_fn)
            self._block_hasher = get_request_block_hasher(hash_block_size, hash_fn)
        self.block_pool = self.scheduler.kv_cache_manager.block_pool
        self.initial_free_blocks = self.block_pool.get_num_free_blocks()
        self.outputs: dict[str, list[int]] = {}  # output tokens delivered per request
        self.finish_reasons: dict[str, FinishReason] = {}
        self._num_steps = 0
        # Steps scheduled, not yet finished: up to two on vLLM's async loop.
        self._queue: collections.deque[_InFlight] = collections.deque()
        self._depth = config.max_concurrent_batches if self.async_loop else 1
        self._ahead = samples_ahead(self.scheduler)
        self._device_free = 0.0

    @property
    def async_loop(self) -> bool:
        """Whether this driver runs vLLM's async loop (the config's async_scheduling)."""
        return bool(self.scheduler.vllm_config.scheduler_config.async_scheduling)

    def add(self, req: Req) -> None:
        params = SamplingParams(max_tokens=req.max_tokens, ignore_eos=True,
                                extra_args=dict(req.extra_args) if req.extra_args else None)
        self.scheduler.add_request(Request(
            req.req_id, list(req.prompt), params, None, arrival_time=req.arrival,
            cache_salt=req.cache_salt, priority=req.priority, block_hasher=self._block_hasher))
        self.outputs[req.req_id] = []

    def advance(self) -> Tick:
        """One step finished as vLLM's engine core finishes it: schedule (on the async
        loop, ahead while its queue of two has room), then hand the oldest step in flight
        its made-up output (what a simulation needs, without `step`'s copies of the
        queues)."""
        return self._tick(self._advance(snapshots=False))

    def step(self) -> Step:
        flight = self._advance(snapshots=True)
        tick = self._tick(flight)
        out = tick.output
        running, waiting, budget = flight.before
        waiting_ids = {s.req_id for s in waiting}
        return Step(self._num_steps - 1, flight.scheduled_at, tick.duration, budget, running,
                    waiting,
                    dict(out.num_scheduled_tokens), tick.states,
                    tuple(r for r in out.num_scheduled_tokens if r in waiting_ids),
                    frozenset(out.preempted_req_ids or ()), tick.finished,
                    self.block_pool.get_num_free_blocks())

    @property
    def busy(self) -> bool:
        """Requests unfinished, or a step still in flight."""
        return bool(self._queue) or self.scheduler.has_unfinished_requests()

    def _advance(self, snapshots: bool) -> _InFlight:
        # vLLM's EngineCore.step_with_batch_queue (with a queue of one, EngineCore.step):
        # schedule while the queue has room and there is work, then finish the oldest.
        sched = self.scheduler
        while len(self._queue) < self._depth and sched.has_requests():
            flight = self._schedule(snapshots)
            self._queue.append(flight)
            if not (flight.out.total_num_scheduled_tokens or sched.has_requests()):
                break
        return self._queue.popleft()

    def _schedule(self, snapshots: bool) -> _InFlight:
        sched = self.scheduler
        before = None
        if snapshots:
            before = (tuple(req_state(r) for r in sched.running),
                      tuple(req_state(r) for r in sched.waiting))
        began, scheduled_at = self.timer(), self.now
        out = sched.schedule()
        host_s = self.timer() - began
        self.now += host_s * self.host_scale
        requests = sched.requests
        states = {r: state_before(requests[r], n, self._ahead)
                  for r, n in out.num_scheduled_tokens.items()}
        # Which requests sample a token is settled here, as the model runner is told.
        sampled = frozenset(r for r in out.num_scheduled_tokens
                            if not requests[r].is_prefill_chunk)
        shape = StepShape.of((states[r], n) for r, n in out.num_scheduled_tokens.items())
        # The device runs steps in order: this one starts when it is free.
        start = max(self.now, self._device_free)
        duration = self.step_time(shape) if out.total_num_scheduled_tokens else 0.0
        self._device_free = start + duration
        if before is not None:
            before = (*before, sched.max_num_scheduled_tokens)
        return _InFlight(out, scheduled_at, start, duration, states, shape, sampled, host_s,
                         before)

    def _tick(self, flight: _InFlight) -> Tick:
        self.now = max(self.now, flight.start + flight.duration)
        finished, delivered, update_s = self._finish_step(flight)
        self.now += update_s * self.host_scale
        self._num_steps += 1
        return Tick(flight.start, flight.duration, flight.out, flight.states, flight.shape,
                    finished, delivered, flight.host_s + update_s, self.now)

    def _finish_step(self, flight: _InFlight
                     ) -> tuple[tuple[str, ...], dict[str, int], float]:
        """Hand the scheduler the model runner's made-up answer: the requests it
        finished, the output tokens it delivered to each request, and the seconds
        update_from_output() took."""
        out = flight.out
        ids = list(out.num_scheduled_tokens)
        sampled = [[SAMPLED_TOKEN] if r in flight.sampled else [] for r in ids]
        answer = ModelRunnerOutput(req_ids=ids, sampled_token_ids=sampled, **(
            {"req_id_to_index": {r: i for i, r in enumerate(ids)}} if _INDEXED_OUTPUT else {}))
        finished, delivered = [], {}
        began = self.timer()
        engine_outputs = self.scheduler.update_from_output(out, answer)
        update_s = self.timer() - began
        for outputs in engine_outputs.values():
            for o in outputs.outputs:
                if o.new_token_ids:
                    self.outputs[o.request_id].extend(o.new_token_ids)
                    delivered[o.request_id] = len(o.new_token_ids)
                if o.finish_reason is not None:
                    self.finish_reasons[o.request_id] = o.finish_reason
                    finished.append(o.request_id)
        return tuple(finished), delivered, update_s

    def run(self, workload: Iterable[Req], max_steps: int = 10_000) -> list[Step]:
        """Steps until every request of the workload, each added at its arrival, has
        finished; `Livelock` if that takes more than `max_steps`."""
        pending = collections.deque(sorted(workload, key=lambda r: r.arrival))
        steps: list[Step] = []
        while pending or self.busy:
            if len(steps) == max_steps:
                raise Livelock(self._stuck(max_steps))
            if pending and not self.busy:
                self.now = max(self.now, pending[0].arrival)  # idle until the next arrival
            while pending and pending[0].arrival <= self.now:
                self.add(pending.popleft())
            steps.append(self.step())
        return steps

    def _stuck(self, max_steps: int) -> str:
        sched = self.scheduler
        return (f"not finished after {max_steps} steps: running "
                f"{[req_state(r) for r in sched.running]}, waiting "
                f"{[req_state(r) for r in sched.waiting]}, "
                f"{self.block_pool.get_num_free_blocks()} of {self.initial_free_blocks} "
                f"KV blocks free")

    def close(self) -> None:
        self.scheduler.shutdown()

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _no_step_log():
    """vllm-ext's schedulers write their steps to the directory the environment names,
    for this process's `vllm_ext.step_stats()`; driven steps are no engine's."""
    saved = os.environ.pop(envs.STATS_DIR, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[envs.STATS_DIR] = saved

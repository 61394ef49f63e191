"""vLLM scheduler classes for the policies in `vllm_ext.schedulers` (selected by dotted
name through `scheduler_cls`, vLLM's supported hook).

Each class keeps vLLM's scheduling loop and its bookkeeping (KV blocks, prefix
cache, preemption, outputs) and changes only what the policy decides. vLLM's loop
hands out the token budget to running requests in list order, each taking
min(tokens wanted, budget left), then admits waiting requests FCFS while budget and
KV remain, and preempts from the end of the running list when KV runs out. Every
class also writes one step record per step (see `vllm_ext.frontend.metrics`).

Each class runs on whichever loop the engine chose, as vLLM's own does: where
`async_scheduling` is on (CUDA's default), building one gives its twin on vLLM's
`AsyncScheduler` (`async_variant`), which schedules step N+1 before step N's tokens are
back and counts each token in flight as an output placeholder.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import time

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from vllm_ext import statsdir
from vllm_ext.config import ExtConfig
from vllm_ext.engine.waiting_order import OrderedWaiting
from vllm_ext.schedulers import (MnemosynePolicy, PrefillFirstPolicy, ReqState, SarathiConfig,
                                 SarathiPolicy)
from vllm_ext.schedulers.adaptive import AdaptiveChunking, OnlineCorrection
from vllm_ext.schedulers.decode_deadlines import DecodeDeadlines
from vllm_ext.schedulers.latency import LatencyModel, StepShape
from vllm_ext.schedulers.request import blocks_for, is_decode
from vllm_ext.schedulers.slo import SLO, SLOError
from vllm_ext.schedulers.slo_counts import SLOCounts
from vllm_ext.schedulers.steplog import StepLogWriter, StepRecord

logger = logging.getLogger("vllm_ext")
_WAITING = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


def tokens(req: Request) -> int:
    """The request's tokens, those scheduled but not yet back included (vLLM's async loop
    counts them as output placeholders; the synchronous loop has none)."""
    return req.num_tokens + req.num_output_placeholders


def req_state(req: Request) -> ReqState:
    return ReqState(req.request_id, req.arrival_time, req.num_prompt_tokens, tokens(req),
                    req.num_computed_tokens)


def state_before(req: Request, num_scheduled: int, ahead: int) -> ReqState:
    """A request just scheduled `num_scheduled` tokens, as it was before the step: vLLM
    has already advanced its computed tokens past the step and, on the async loop
    (`ahead` = 1), added a placeholder for the token the step will sample."""
    placeholders = req.num_output_placeholders - (0 if req.is_prefill_chunk else ahead)
    return ReqState(req.request_id, req.arrival_time, req.num_prompt_tokens,
                    req.num_tokens + placeholders, req.num_computed_tokens - num_scheduled)


def samples_ahead(scheduler: Scheduler) -> int:
    """Tokens a step's schedule() adds as placeholders per sampling request: 1 on vLLM's
    async loop, 0 on the synchronous one."""
    return 1 if isinstance(scheduler, AsyncScheduler) else 0


def last_token_in_flight(req: Request) -> bool:
    """On the async loop: every token the request may still produce is scheduled, so
    vLLM's loop passes over it (its own check, before each running request)."""
    return req.num_output_placeholders > 0 and (
        req.num_computed_tokens + 2 - req.num_output_placeholders
        >= req.num_prompt_tokens + req.max_tokens)


def decoding(req: Request) -> bool:
    """`req_state(req).is_decode`, without building the state: per-step passes over the
    whole batch use this."""
    return is_decode(req.num_prompt_tokens, tokens(req), req.num_computed_tokens)


class KeptKeys:
    """Each request's order key, kept between steps while it holds, so that a step does
    not look afresh at the batch's hundreds of decodes and a queue of thousands.

    A decode stays a decode, and so keeps its key, until it is preempted. Any other key
    holds while the request computes nothing more, the policy predicts with the same
    `version` (adaptive chunking's online correction), and until the time `until` the
    policy gives (then it is made afresh, so a boundary is never guessed)."""

    def __init__(self) -> None:
        # req_id -> (decode, preemptions, computed, version, until, key)
        self._kept: dict[str, tuple[bool, int, int, float, float, tuple]] = {}

    def get(self, req: Request, now: float = 0.0, version: float = 1.0) -> tuple | None:
        kept = self._kept.get(req.request_id)
        if kept is None:
            return None
        decode, preemptions, computed, kept_version, until, key = kept
        if (decode and preemptions == req.num_preemptions) or (
                computed == req.num_computed_tokens and kept_version == version and now < until):
            return key
        return None

    def put(self, req: Request, key: tuple, decode: bool, until: float = math.inf,
            version: float = 1.0) -> tuple:
        self._kept[req.request_id] = (decode, req.num_preemptions, req.num_computed_tokens,
                                      version, until, key)
        return key

    def last(self, req: Request) -> tuple:
        """The request's kept key, whether or not it still holds."""
        return self._kept[req.request_id][5]

    def holds_until(self, req: Request) -> float | None:
        """Until when the request's key holds (None: none kept)."""
        kept = self._kept.get(req.request_id)
        return None if kept is None else kept[4]

    def forget_finished(self, live: dict) -> None:
        """Drop the keys of requests the scheduler no longer has, now and then."""
        if len(self._kept) > 2 * len(live) + 64:
            self._kept = {r: k for r, k in self._kept.items() if r in live}


@functools.cache
def async_variant(cls: type[StockScheduler]) -> type:
    """`cls` on vLLM's async loop: the same policy, with `AsyncScheduler`'s placeholders
    and output handling under it."""
    return type(f"Async{cls.__name__}", (cls, AsyncScheduler),
                {"__module__": cls.__module__, "__qualname__": f"Async{cls.__qualname__}",
                 "__doc__": f"{cls.__name__} on vLLM's async loop ({cls.__doc__})"})


class StockScheduler(Scheduler):
    """vLLM's scheduler unchanged, with step records: the baseline of every A/B run.

    Built where the engine runs vLLM's async loop, it is `AsyncScheduler` with step
    records (as is every subclass: see `async_variant`), the class stock vLLM would
    pick there."""

    def __new__(cls, *args, **kwargs):
        # vLLM builds its scheduler as `cls(vllm_config=..., ...)` once it has decided
        # the loop; the hook names one class for both loops.
        config = kwargs.get("vllm_config", args[0] if args else None)
        if config is not None and config.scheduler_config.async_scheduling \
                and not issubclass(cls, AsyncScheduler):
            cls = async_variant(cls)
        return super().__new__(cls)

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        from vllm_ext.patches import patch

        patch("scheduler_internals").reached()  # what the policies touch inside vLLM
        patch("engine_identity").reached()  # what names this engine's statistics folder
        self.ext = ExtConfig.of(vllm_config)
        logger.info("vllm-ext active: %s", self.ext.describe() or "scheduler=vllm")
        # This engine's own folder: /metrics labels each engine's series (statsdir).
        self._stats_dir = statsdir.for_engine(vllm_config)
        self._steplog = StepLogWriter(self._stats_dir) if self._stats_dir else None
        self._in_flight: collections.deque[StepRecord] = collections.deque()
        self._prefills_to_decodes = 0  # in the last step recorded
        # Requests with a prefill chunk in each step scheduled but not yet finished
        # (more than one step only with pipeline parallelism: vLLM's batch queue).
        self._prefills_in_flight: collections.deque[frozenset[str]] = collections.deque()
        self._ahead = samples_ahead(self)
        self._pipeline = self.parallel_config.pipeline_parallel_size > 1
        # When the last step's output was back: on the async loop the next step was
        # scheduled before then, but the device starts it only then.
        self._last_done = -math.inf

    # A policy that predicts step times sets this; each step record then carries the
    # prediction next to the measured time.
    latency_model: LatencyModel | None = None

    # What times a step (and so feeds OnlineCorrection): a driver without a model
    # (vllm_ext.tools.driver) puts its virtual clock here.
    clock = staticmethod(time.monotonic)
    # The clock of requests' arrival times (vLLM stamps them with the wall clock), so of
    # their deadlines; the driver puts its virtual clock here too.
    arrival_clock = staticmethod(time.time)

    def predict(self, shape: StepShape) -> float:
        return self.latency_model.predict(shape)

    # Policies override this; it runs right before vLLM's loop.
    def before_schedule(self) -> None:
        pass

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        t0 = self.clock()
        self.before_schedule()
        out = super().schedule(throttle_prefills)
        self.after_schedule(out)
        if out.total_num_scheduled_tokens:
            rec, prefilling = self._record(out, t0)
            self._prefills_in_flight.append(prefilling)
            self._in_flight.append(rec)
        return out

    def cached_tokens(self, req: Request) -> int:
        """Tokens of a waiting request that vLLM will take from the prefix cache when it
        admits it (a read-only lookup, as vLLM's own admission makes)."""
        if req.num_computed_tokens:
            return req.num_computed_tokens
        return self.kv_cache_manager.get_computed_blocks(req)[1]

    def blocks_to_admit(self, req: Request) -> int:
        """The free KV blocks vLLM's admission takes to admit a waiting request whole:
        a block for each of its tokens past its prefix-cache hit, and the hit's blocks
        that no running request holds (cached but free: using them takes them out of the
        free pool)."""
        whole = blocks_for(req.num_tokens, self.block_size)
        if req.num_computed_tokens:
            return whole - req.num_computed_tokens // self.block_size
        hit, hit_tokens = self.kv_cache_manager.get_computed_blocks(req)[:2]
        unheld = sum(b.ref_cnt == 0 for b in hit.blocks[0]) if hit_tokens else 0
        return whole - hit_tokens // self.block_size + unheld

    def prefills_in_flight(self) -> frozenset[str]:
        """Requests that have a prefill chunk in a step not finished yet."""
        return frozenset().union(*self._prefills_in_flight)

    def after_schedule(self, out: SchedulerOutput) -> None:
        pass

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if scheduler_output.total_num_scheduled_tokens:
            self._prefills_in_flight.popleft()
            rec, done = self._in_flight.popleft(), self.clock()
            # A step's time runs from its schedule() (or, if later, the previous step's
            # output: the device was busy until then) to its output processed: on the
            # async loop, the interval between outputs a client sees.
            rec = dataclasses.replace(rec, wall_s=done - max(rec.t_start, self._last_done),
                                      **self.step_outcome(scheduler_output))
            self._last_done = done
            self.step_done(rec)
            if self._steplog is not None:
                self._steplog.append(rec)
        return outputs

    def step_done(self, rec: StepRecord) -> None:
        """A step's record once it has finished, measured time included."""

    def step_outcome(self, scheduler_output: SchedulerOutput) -> dict:
        """Record fields known only once a step's output has been processed."""
        return {}

    def _record(self, out: SchedulerOutput, t0: float) -> tuple[StepRecord, frozenset[str]]:
        """The step's record (wall time still 0) and the requests it prefills."""
        # One pass, no per-request objects: this runs every step over the whole batch.
        chunks, contexts, prefilling, partial, to_decode = [], [], [], 0, 0
        requests, ahead, scheduled = self.requests, self._ahead, out.num_scheduled_tokens
        # The running decodes the step left out: looked for only when the running list
        # holds requests it did not schedule (none in a step of decodes alone). One whose
        # every token is in flight (the async loop) has nothing to schedule.
        left_out = 0 if len(scheduled) >= len(self.running) else sum(
            1 for req in self.running if req.request_id not in scheduled
            and decoding(req) and not last_token_in_flight(req))
        for r, n in scheduled.items():
            req = requests[r]
            # As in `state_before`, without building the state.
            computed = req.num_computed_tokens - n
            num_tokens = req.num_tokens + req.num_output_placeholders - (
                0 if req.is_prefill_chunk else ahead)
            if computed == num_tokens - 1 and num_tokens > req.num_prompt_tokens:  # is_decode
                contexts.append(computed + n)
            else:
                chunks.append((n, computed))
                prefilling.append(r)
                partial += computed + n < num_tokens
                # A decode from next step on: it samples, or it recomputes (after a
                # preemption) all but its last output token, which is then a decode.
                to_decode += computed + n >= num_tokens - (num_tokens > req.num_prompt_tokens)
        self._prefills_to_decodes = to_decode
        shape = StepShape(tuple(chunks), tuple(contexts))
        _, prefill, attention, _, decode_context = shape.features()
        predicted = self.predict(shape) if self.latency_model else 0.0
        # Chunks of one prompt in the pipeline's stages at once (SPP); on one stage the
        # async loop's next step, scheduled early, still runs after the previous one.
        pipelined = (len(self.prefills_in_flight().intersection(prefilling))
                     if prefilling and self._pipeline else 0)
        return StepRecord(t0, 0.0, len(contexts), int(prefill), len(prefilling),
                          partial, len(contexts) + left_out, len(out.preempted_req_ids or ()),
                          len(self.waiting), attention, int(decode_context), predicted,
                          pipelined), frozenset(prefilling)

    def shutdown(self) -> None:
        if self._steplog is not None:
            self._steplog.close()
            self._steplog = None
        super().shutdown()


class SarathiScheduler(StockScheduler):
    """Sarathi-Serve stall-free batching (see `vllm_ext.schedulers.sarathi`).

    The token budget is vLLM's max_num_batched_tokens (set by the selection),
    KV admission maps onto vLLM's whole-sequence admission gate, and the running
    list is put in the policy's order before vLLM's loop hands out the budget.
    """

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        settings = self.ext.scheduler.settings
        self.policy = SarathiPolicy(self.sarathi_config())
        config = self.policy.config
        if config.token_budget != self.max_num_scheduled_tokens:
            raise ValueError(
                f"sarathi token budget {config.token_budget} differs from the "
                f"engine's max_num_batched_tokens {self.max_num_scheduled_tokens}; select the "
                f"scheduler through vllm_ext (flags or vllm_ext.engine_kwargs)")
        self.scheduler_reserve_full_isl = self.policy.reserve_full_prompt
        self._keys = KeptKeys()
        # Whether the running list is still in the policy's order. vLLM's loop only
        # appends to it (admissions) and removes from it (finishes, preemptions), and
        # removing keeps an order: only an admission or a prompt that became a decode can
        # break it, so most steps (decodes only) need no sort of hundreds of requests.
        self._running_in_order = False
        self._running_before = 0
        self._admitted = 0  # by the step just scheduled
        self.adaptive = None
        if settings.latency_model:
            # Adaptive chunking's model; Mnemosyne's slack predicts prefill times with it.
            with open(settings.latency_model) as f:
                self.latency_model = LatencyModel.from_json(f.read())
        if config.tbt_slo_ms is not None:
            self.adaptive = AdaptiveChunking(self.latency_model, config.tbt_slo_ms / 1000,
                                             config.token_budget)
            self.correction = OnlineCorrection()

    def sarathi_config(self) -> SarathiConfig:
        return self.ext.scheduler.settings

    def predict(self, shape: StepShape) -> float:
        factor = self.correction.factor if self.adaptive is not None else 1.0
        return factor * self.latency_model.predict(shape)

    def order_running(self) -> None:
        """Put the running list in the policy's order (vLLM's loop hands out the budget
        in list order and preempts from its end)."""
        if not self._running_in_order:
            self.running.sort(key=self._running_key)
            self._running_in_order = True

    def _running_key(self, req: Request) -> tuple:
        key = self._keys.get(req)
        if key is None:
            decode = decoding(req)
            key = self._keys.put(req, self.policy.key(decode, req.arrival_time, req.request_id),
                                 decode)
        return key

    def prefills_in_order(self) -> list[ReqState]:
        """The prefills this step may serve, in the order the engine will serve them
        (partial ones in the running list, then the head of the waiting queue); what
        adaptive chunking plans for. A waiting prompt starts after its prefix-cache hit:
        that is where its chunk will run, and what its attention costs. The hit counts
        the blocks of the prompts before it: adaptive chunking plans a prompt only once
        those are planned whole, and vLLM caches a block as soon as it is scheduled."""
        earlier = [r for r in self.running if not decoding(r)]
        states = [req_state(r) for r in earlier]
        for _, req in zip(range(8), self.waiting):
            hit = max(self.cached_tokens(req), self._shared_prefix(req, earlier))
            states.append(dataclasses.replace(req_state(req), num_computed=hit))
            earlier.append(req)
        return states

    def _shared_prefix(self, req: Request, others: list[Request]) -> int:
        """Tokens of `req`'s prompt in whole blocks that one of `others` shares (as the
        prefix cache would find them: never its last token)."""
        common = 0
        for other in others:
            n = 0
            for mine, theirs in zip(req.block_hashes, other.block_hashes):
                if mine != theirs:
                    break
                n += 1
            common = max(common, n)
        size = self.hash_block_size
        return min(common * size, (req.num_tokens - 1) // size * size)

    def after_schedule(self, out: SchedulerOutput) -> None:
        # The running list grew by its admissions (appended at its end) and shrank by its
        # preemptions.
        self._admitted = (len(self.running) - self._running_before
                          + len(out.preempted_req_ids or ()))

    def _record(self, out: SchedulerOutput, t0: float):
        rec, prefilling = super()._record(out, t0)
        if self._admitted or self._prefills_to_decodes:
            self._running_in_order = False
        return rec, prefilling

    def step_done(self, rec: StepRecord) -> None:
        if self.adaptive is not None and rec.predicted_s > 0:
            self.correction.observe(rec.predicted_s / self.correction.factor, rec.wall_s)

    def before_schedule(self) -> None:
        self._keys.forget_finished(self.requests)
        self.order_running()
        self._running_before = len(self.running)
        if not self.policy.config.sequence_pipeline:
            # Plain pipeline parallelism: a prompt's next chunk waits until its previous
            # one has left the last stage (vLLM's loop skips a request for a step whose
            # number is below its next_decode_eligible_step; schedule() is about to
            # advance current_step by one).
            held = self.prefills_in_flight()
            for req in self.running:
                if req.request_id in held and req.num_computed_tokens < req.num_tokens:
                    req.next_decode_eligible_step = max(req.next_decode_eligible_step,
                                                        self.current_step + 2)
        if self.adaptive is not None:
            # vLLM reads this budget afresh every step; it stays within the engine's maximum.
            decodes = [req_state(r) for r in self.running
                       if decoding(r) and not last_token_in_flight(r)]
            plan = self.adaptive.plan(decodes, self.prefills_in_order(), self.correction.factor)
            self.max_num_scheduled_tokens = plan.tokens


class MnemosyneScheduler(SarathiScheduler):
    """Mnemosyne's deadline order on Sarathi's stall-free steps (see
    `vllm_ext.schedulers.mnemosyne`).

    Decodes still come first. The partial prefills in the running list and the waiting
    queue are each put in the policy's order; because vLLM's loop serves the whole
    running list before it admits anyone, a partial prefill that ranks behind the head
    of the waiting queue sits the step out when that head can be admitted (a free
    running slot and the KV blocks for its prompt). The budget it leaves is then the
    head's.
    """

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        remaining = self._predicted_prefill_s if self.latency_model is not None else None
        self.deadlines = MnemosynePolicy(self.ext.scheduler.settings.deadlines, remaining)
        self._held: set[str] = set()
        self._held_head: str | None = None
        self._head_refused = False
        self._first_due: list[ReqState] = []
        self._now = 0.0  # when this step's order was made, on the arrival clock
        # The waiting queue's order, kept from step to step (see OrderedWaiting).
        self._order = OrderedWaiting(self._key, self._keys.last, self._keys.holds_until)
        self._running_until = -math.inf
        # Each request's SLO class and deadlines (its own, its class's, the defaults).
        self._slo: dict[str, tuple[str, SLO]] = {}
        self._default_slo = self.deadlines.request_slo(None)
        self._decode_deadlines = DecodeDeadlines(self.deadlines.config.max_defer_steps)
        self._slo_counts = SLOCounts(self._stats_dir)
        self._recent_steps: collections.deque[float] = collections.deque(maxlen=8)
        self._deferred = 0  # decodes the step being scheduled defers
        self._sampled = None  # the step's ModelRunnerOutput, while decodes are walked
        self._firsts_in_flight: collections.deque[tuple[str, ...]] = collections.deque()

    def sarathi_config(self) -> SarathiConfig:
        # Without a TBT target its step-time model only predicts prefill times.
        return self.ext.scheduler.settings.sarathi

    def _predicted_prefill_s(self, req: ReqState) -> float:
        """The model's time for the prompt tokens still to compute, as one chunk after
        those computed, less the fixed cost a step pays anyway."""
        left = req.num_prompt_tokens - req.num_computed
        shape = StepShape(((left, req.num_computed),), ())
        return max(0.0, self.predict(shape) - self.predict(StepShape()))

    def _key(self, req: Request) -> tuple:
        # Predictions scale with adaptive chunking's online correction.
        factor = self.correction.factor if self.adaptive is not None else 1.0
        key = self._keys.get(req, self._now, factor)
        if key is None:
            state = self._state(req)
            key, until = self.deadlines.order_key_until(state, self._now)
            self._keys.put(req, key, state.is_decode, until, factor)
        return key

    def order_running(self) -> None:
        self._now = self.arrival_clock()
        # Besides Sarathi's reasons, a partial prefill's key expires with time and moves
        # with adaptive chunking's correction.
        if not self._running_in_order or self.adaptive is not None \
                or self._now >= self._running_until:
            self.running.sort(key=self._key)
            self._running_until = min(map(self._keys.holds_until, self.running),
                                      default=math.inf)
            self._running_in_order = True
        # vLLM takes from the waiting queue only while the running list has room: when it
        # is full, the order can wait for a step that reads it (expired keys pile up).
        if isinstance(self.waiting, collections.deque) \
                and len(self.running) < self.max_num_active_reqs:
            self._order_waiting()
        self._held = self._hold_outranked()

    def _order_waiting(self) -> None:
        waiting = self.waiting
        if self.adaptive is not None or not self._order.in_step(waiting):
            # Adaptive chunking's correction moves every key: sorted afresh.
            self._order.sort(waiting)
        else:
            self._order.expire(waiting, self._now, lambda req: req.status in _WAITING)

    def _state(self, req: Request) -> ReqState:
        """`req_state` with the request's own deadlines."""
        entry = self._slo.get(req.request_id)
        return ReqState(req.request_id, req.arrival_time, req.num_prompt_tokens, tokens(req),
                        req.num_computed_tokens, None if entry is None else entry[1])

    def _read_slo(self, request: Request) -> tuple[str, SLO]:
        params = request.sampling_params
        try:
            return self.deadlines.request_slo(params.extra_args if params is not None else None)
        except SLOError as e:
            # The API server refuses these with a 400 (vllm_ext.frontend.slo_middleware);
            # one reaching the engine came another way (the Python API): served on the
            # defaults rather than failed mid-batch.
            logger.warning("request %s: %s; served with the default SLO", request.request_id, e)
            return self._default_slo

    def add_request(self, request: Request) -> None:
        self._slo[request.request_id] = self._read_slo(request)
        super().add_request(request)
        waiting = self.waiting
        # vLLM appended it; placed now, or the next step sorts the queue.
        if isinstance(waiting, collections.deque) and waiting[-1] is request \
                and len(waiting) == len(self._order.keys) + 1:
            waiting.pop()
            self._order.place(waiting, request)

    def _hold_outranked(self) -> set[str]:
        head = self.waiting.peek_request() if self.waiting else None
        if head is None or self._head_refused or len(self.running) >= self.max_num_active_reqs:
            self._head_refused = False
            return set()
        # Every block of the prompt from the free pool, its prefix-cache hits included
        # (free cached blocks are counted free): never more optimistic than vLLM's check.
        if blocks_for(head.num_tokens, self.block_size) > \
                self.kv_cache_manager.block_pool.get_num_free_blocks():
            return set()
        head_key, held = self._key(head), set()
        hold = self.current_step + 2  # schedule() is about to advance current_step by one
        for req in self.running:
            if not decoding(req) and self._key(req) > head_key:
                req.next_decode_eligible_step = max(req.next_decode_eligible_step, hold)
                held.add(req.request_id)
        self._held_head = head.request_id
        return held

    def after_schedule(self, out: SchedulerOutput) -> None:
        # A hold whose head vLLM still did not admit (its own checks are the last word)
        # is not repeated next step: held prefills never wait on a head that cannot come.
        self._head_refused = bool(self._held) and self._held_head not in out.num_scheduled_tokens
        super().after_schedule(out)
        waiting, preempted = self.waiting, out.preempted_req_ids or ()
        if not isinstance(waiting, collections.deque):
            return
        # vLLM put the requests it preempted at the head of the waiting queue (it admits
        # none in such a step).
        if self._admitted > 0:
            self._order.left(waiting, self.running[-self._admitted:])
        back = []
        while preempted and waiting and waiting[0].request_id in preempted:
            back.append(waiting.popleft())
        for req in back:
            self._order.place(waiting, req)

    def prefills_in_order(self) -> list[ReqState]:
        return [s for s in super().prefills_in_order() if s.req_id not in self._held]

    def before_schedule(self) -> None:
        if len(self._slo) > 2 * len(self.requests) + 64:
            self._forget_finished()
        super().before_schedule()  # the order, the holds and the budget
        self._deferred = self._defer_decodes() if len(self._decode_deadlines) else 0

    def _forget_finished(self) -> None:
        live = self.requests
        for req_id in [r for r in self._slo if r not in live]:
            del self._slo[req_id]
            self._decode_deadlines.forget(req_id)

    def _first_prefill(self) -> Request | None:
        """The prefill this step serves first: the first partial prefill in the running
        list that is not held, else the head of the waiting queue when it may be admitted."""
        step = self.current_step + 1  # schedule() is about to advance current_step
        # The running list is in the policy's order, decodes first: its prefills are its
        # tail, read from the end (not a pass over hundreds of decodes every step).
        first = None
        for req in reversed(self.running):
            if decoding(req):
                break
            if req.request_id not in self._held and req.num_computed_tokens < tokens(req) \
                    and req.next_decode_eligible_step <= step:
                first = req
        if first is not None:
            return first
        if self.waiting and len(self.running) < self.max_num_active_reqs \
                and isinstance(self.waiting, collections.deque):
            return self.waiting[0]
        return None

    def _defer_decodes(self) -> int:
        """Give the slots of looser classes' decodes that are ahead of their deadlines to
        the first prefill, when it is of a stricter class, due, and short of budget (see
        `vllm_ext.schedulers.decode_deadlines`). Returns how many sat out."""
        prefill = self._first_prefill()
        if prefill is None or not self._recent_steps:
            return 0
        _, slo = self._slo.get(prefill.request_id, self._default_slo)
        if slo.tbt_s is None:
            return 0
        step, left = self.current_step + 1, tokens(prefill) - prefill.num_computed_tokens
        # Short of budget even if every running request were a decode to serve? If not, no
        # pass over the batch.
        if left <= self.max_num_scheduled_tokens - len(self.running):
            return 0
        decodes = [r for r in self.running if decoding(r) and not last_token_in_flight(r)
                   and r.next_decode_eligible_step <= step]
        want = left - (self.max_num_scheduled_tokens - len(decodes))
        if want <= 0:
            return 0
        # Sitting this step out, a decode's token comes a step later than it would: after
        # this step and the next (and, on the async loop, the step already in flight).
        step_s = max(self._recent_steps)
        chosen = self._decode_deadlines.choose(
            step, ((r.request_id, r.num_output_placeholders) for r in decodes), slo.tbt_s,
            self.deadlines.deadline(self._state(prefill)),
            self._now + (2 + self._ahead) * step_s, want)
        hold = self.current_step + 2
        for req_id in chosen:
            req = self.requests[req_id]
            req.next_decode_eligible_step = max(req.next_decode_eligible_step, hold)
            self._slo_counts.add(self._slo[req_id][0], decodes_deferred=1)
        return len(chosen)

    def step_done(self, rec: StepRecord) -> None:
        super().step_done(rec)
        self._recent_steps.append(rec.wall_s)

    def _record(self, out: SchedulerOutput, t0: float):
        rec, prefilling = super()._record(out, t0)
        now = self.arrival_clock()  # deadlines are on the arrival clock, not the step timer
        slacks = [self.deadlines.slack(dataclasses.replace(
            state_before(self.requests[r], out.num_scheduled_tokens[r], self._ahead),
            slo=self._slo.get(r, self._default_slo)[1]), now) for r in prefilling]
        if slacks:
            rec = dataclasses.replace(rec, min_slack_s=min(slacks))
        if self._deferred:
            rec = dataclasses.replace(rec, decodes_deferred=self._deferred)
        # The requests whose first token this step samples: its chunk ends the prompt
        # (on the async loop, read now: by the step's output the next step has advanced
        # the counts again).
        requests, scheduled = self.requests, out.num_scheduled_tokens
        self._firsts_in_flight.append(tuple(
            r for r in prefilling if (req := requests[r]).num_output_tokens == 0
            and req.num_computed_tokens >= req.num_prompt_tokens
            > req.num_computed_tokens - scheduled[r]))
        return rec, prefilling

    def update_from_output(self, scheduler_output, model_runner_output):
        # The requests whose first token this step samples (a request may finish on it
        # and leave `self.requests` during the update): among the step's prefills only,
        # which the oldest step in flight is (not among the batch's hundreds of decodes).
        firsts = (self._firsts_in_flight.popleft()
                  if scheduler_output.total_num_scheduled_tokens else ())
        self._first_due = [self._state(req) for r in firsts
                           if (req := self.requests.get(r)) is not None
                           and req.num_output_tokens == 0]
        # The tokens the step sampled, per request: what the decode deadlines walk (read
        # only while some request has a TBT deadline).
        self._sampled = model_runner_output if len(self._decode_deadlines) else None
        return super().update_from_output(scheduler_output, model_runner_output)

    def step_outcome(self, scheduler_output: SchedulerOutput) -> dict:
        now, counts, walks = self.arrival_clock(), self._slo_counts, self._decode_deadlines
        if self._sampled is not None:
            # Later tokens first: a first token below starts its request's walk after.
            # Finished requests' walks go with their SLO entries (`_forget_finished`).
            sampled = self._sampled
            for name, (met, late) in walks.delivered(
                    zip(sampled.req_ids, map(len, sampled.sampled_token_ids)), now).items():
                counts.add(name, tokens_met=met, tokens_missed=late)
        missed = 0
        for state in self._first_due:
            deadline = self.deadlines.deadline(state)
            late = now > deadline
            missed += late
            name, slo = self._slo.get(state.req_id, self._default_slo)
            counts.add(name, first_met=not late, first_missed=late)
            walks.first_token(state.req_id, now, slo.tbt_s, deadline, name)
        # At most once a second while busy; at once when the engine goes idle, so that
        # /metrics shows the last requests' counts without waiting for another step.
        counts.flush(force=not self.requests)
        return {"first_tokens": len(self._first_due), "deadline_misses": missed}

    def shutdown(self) -> None:
        self._slo_counts.flush(force=True)
        super().shutdown()


class PrefillFirstScheduler(StockScheduler):
    """Prefill-first (Orca / vLLM-V0) baseline: see `vllm_ext.schedulers.prefill_first`.

    Chunked prefill is off (set by the selection), so prompts run whole. In a
    prefill step every running decode is held back through vLLM's per-request
    decode-eligibility step, which the loop already honours.
    """

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        self.policy = PrefillFirstPolicy()
        self._last_step_empty = False

    def before_schedule(self) -> None:
        head = self.waiting.peek_request() if self.waiting else None
        # Whether vLLM would admit the head now, by vLLM's own count of the blocks it
        # takes. Stricter, a prompt could join a decode step; looser, the step comes out
        # empty and on the async loop the next one, whose decodes run, may admit it.
        fits = head is not None and len(self.running) < self.max_num_active_reqs and (
            self.blocks_to_admit(head) <= self.kv_cache_manager.block_pool.get_num_free_blocks())
        if self.policy.prefill_only(head is not None, fits, self._last_step_empty):
            # schedule() is about to advance current_step by one; skip exactly that step.
            hold = self.current_step + 2
            for req in self.running:
                req.next_decode_eligible_step = max(req.next_decode_eligible_step, hold)

    def after_schedule(self, out: SchedulerOutput) -> None:
        self._last_step_empty = out.total_num_scheduled_tokens == 0

"""Every scheduler on vLLM's async loop, where vLLM chooses it (a GPU's config: async unless
`--no-async-scheduling`): built there, each vllm-ext class is an `AsyncScheduler`, and
`--scheduler vllm` is the class stock vLLM picks, with step records. On that loop step N+1
is scheduled before step N's tokens are back; a scheduler that did not count the tokens in
flight would give each decode a token every other step."""

from __future__ import annotations

import pytest
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_ext.engine import scheduling
from vllm_ext.simulate.arms import Target, arm_config
from vllm_ext.tools.driver import Driver, Req
from vllm_ext.tools.models import make_shape

pytestmark = pytest.mark.release

GPU = Target("cuda", block_size=16)
# flags -> the vllm-ext class chosen (None: vLLM's own)
SELECTIONS = {
    (): None,
    ("--scheduler", "vllm"): scheduling.StockScheduler,
    ("--scheduler", "sarathi"): scheduling.SarathiScheduler,
    ("--scheduler", "mnemosyne"): scheduling.MnemosyneScheduler,
    ("--scheduler", "prefill-first"): scheduling.PrefillFirstScheduler,
}


@pytest.fixture(scope="module")
def shape_dir(tmp_path_factory):
    return str(make_shape(tmp_path_factory.mktemp("shape"), "tiny"))


def _built(config) -> Scheduler:
    with Driver(config, 64) as driver:
        return driver.scheduler


@pytest.mark.parametrize("flags", list(SELECTIONS), ids=lambda f: " ".join(f) or "stock")
def test_a_gpu_config_runs_each_scheduler_on_the_async_loop(shape_dir, flags):
    chosen = SELECTIONS[flags]
    config = arm_config(shape_dir, ["--max-model-len", "1024", *flags], GPU)
    assert config.scheduler_config.async_scheduling is True
    scheduler = _built(config)
    assert isinstance(scheduler, AsyncScheduler)
    if chosen is None:
        assert type(scheduler) is AsyncScheduler
    else:
        assert type(scheduler) is scheduling.async_variant(chosen)
        assert isinstance(scheduler, chosen)

    sync = arm_config(shape_dir, ["--max-model-len", "1024", *flags, "--no-async-scheduling"],
                      GPU)
    scheduler = _built(sync)
    assert not isinstance(scheduler, AsyncScheduler)
    assert type(scheduler) is (Scheduler if chosen is None else chosen)


def test_scheduler_vllm_is_the_class_stock_vllm_picks_with_step_records():
    """On each loop vllm-ext's base arm is vLLM's own class under the step-record wrapper:
    nothing between them in the method resolution order."""
    async_stock = scheduling.async_variant(scheduling.StockScheduler)
    assert async_stock.__mro__[1:4] == (scheduling.StockScheduler, AsyncScheduler, Scheduler)
    assert scheduling.StockScheduler.__mro__[1] is Scheduler


@pytest.mark.parametrize("flags", list(SELECTIONS), ids=lambda f: " ".join(f) or "stock")
def test_on_the_async_loop_every_decode_gets_a_token_every_step(shape_dir, flags):
    """96 requests decoding 50 to 200 tokens, budget 512, every prompt in by the first
    steps: each scheduler takes the steps vLLM's own async class takes, about one per
    output token of the longest request (scheduled as if synchronous, a decode whose
    token is in flight would sit out every other step: about twice as many)."""
    args = ["--max-model-len", "1024", "--max-num-batched-tokens", "512", "--max-num-seqs",
            "128", *flags]
    if "sarathi" in flags or "mnemosyne" in flags:
        args += [f"--{flags[1]}-token-budget", "512"]
    if "prefill-first" in flags:
        args = [a for a in args if a not in ("--max-num-batched-tokens", "512")]
    reqs = [Req.of(f"r{i}", 0.0, 4, 50 + (150 * i) // 95) for i in range(96)]
    with Driver(arm_config(shape_dir, args, GPU), num_blocks=2000) as driver:
        steps = driver.run(reqs)
        assert {r: len(t) for r, t in driver.outputs.items()} == \
            {r.req_id: r.max_tokens for r in reqs}
    assert len(steps) <= 200 + 2, len(steps)


class _Ticks:
    """A host timer that moves `each` seconds per reading: every timed call takes it."""

    def __init__(self, each: float) -> None:
        self.t, self.each = 0.0, each

    def __call__(self) -> float:
        self.t += self.each
        return self.t


@pytest.mark.parametrize("loop, host_ms, interval_ms", [
    ("sync", 2.0, 14.0),  # schedule + device + update: 2 + 10 + 2
    ("async", 2.0, 10.0),  # the host's 2 + 2 hide behind the device's 10
    ("async", 8.0, 16.0),  # update + next schedule, 8 + 8, exceed the device's 10
])
def test_host_time_counts_as_the_loop_spends_it(shape_dir, loop, host_ms, interval_ms):
    """The driver's virtual clock with the scheduler's host time in it: decode steps of
    10 ms on the device, each schedule() and update_from_output() taking `host_ms`."""
    flags = ["--max-model-len", "1024", "--scheduler", "vllm"]
    if loop == "sync":
        flags.append("--no-async-scheduling")
    config = arm_config(shape_dir, flags, GPU)
    with Driver(config, 64, step_time=lambda shape: 0.010, host_scale=1.0) as driver:
        driver.timer = _Ticks(host_ms / 1000)
        driver.add(Req.of("r", 0.0, 4, 12))
        done = []
        while driver.busy:
            tick = driver.advance()
            if tick.delivered:
                done.append(tick.done)
    gaps = [b - a for a, b in zip(done, done[1:])]
    assert len(gaps) == 11
    assert gaps[2:] == pytest.approx([interval_ms / 1000] * 9)

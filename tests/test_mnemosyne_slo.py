"""Per-request SLOs in `--scheduler mnemosyne`, on vLLM's real scheduler (vllm_ext.tools.driver,
one time unit a step): each request's own first-token deadline orders the prefills; a
looser class's decode that is ahead of its reader gives its slot to a stricter class's
prefill, never past its own next-token deadline and never more than the bound of steps in
a row; with uniform SLOs the steps are exactly those of requests that state none."""

from __future__ import annotations

import collections

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from test_scheduler_properties import (BUDGETS, EXAMPLES, LOOPS, check_all_finish,
                                       check_blocks_free, workloads)
from test_scheduler_properties import config  # noqa: F401  (fixture)
from vllm_ext.tools.driver import Driver, Req

pytestmark = pytest.mark.release

# Fewer examples than the other properties: each runs two or three schedulers.
SOME = settings(EXAMPLES, max_examples=max(1, EXAMPLES.max_examples // 4))
CLASSES = ("chat=ttft:3s,tbt:1500ms", "batch=ttft:30s,tbt:8s")
TTFT_S, ALLOWANCE_MS = 3.0, 10.0  # the server's defaults in these tests


def _with(reqs: list[Req], extra_args) -> list[Req]:
    return [Req(r.req_id, r.arrival, r.prompt, r.max_tokens, r.cache_salt,
                extra_args(i) if callable(extra_args) else extra_args)
            for i, r in enumerate(reqs)]


def _mnemosyne(config, loop: str, budget: int, **options):
    return config(loop, scheduler="mnemosyne", mnemosyne_token_budget=budget,
                  mnemosyne_ttft_slo_s=TTFT_S, mnemosyne_prefill_ms_per_token=ALLOWANCE_MS,
                  mnemosyne_slo_class=CLASSES, **options)


@LOOPS
@SOME
@given(workload=workloads(), budget=st.sampled_from(BUDGETS),
       tbt_ms=st.sampled_from((500, 1500, 8000)), named=st.booleans())
def test_uniform_slos_schedule_exactly_as_requests_that_state_none(config, loop, workload,
                                                                   budget, tbt_ms, named):
    """Every request states the same deadlines (its own values, or one class for all):
    the first-token deadlines are the defaults' and no class is stricter than another, so
    no decode sits out and every step is the step of the same requests without SLOs."""
    reqs, blocks = workload
    same = {"slo_class": "chat"} if named else {"ttft_slo_ms": TTFT_S * 1e3,
                                                 "tbt_slo_ms": tbt_ms}
    cfg = _mnemosyne(config, loop, budget)
    with Driver(cfg, blocks) as plain, Driver(cfg, blocks) as stated:
        expected = [list(s.scheduled.items()) for s in plain.run(reqs)]
        assert [list(s.scheduled.items()) for s in stated.run(_with(reqs, same))] == expected
        assert stated.scheduler._slo_counts.by_class.keys() == {"chat" if named else "custom"}


def _run_recording(driver: Driver, reqs: list[Req]):
    """Run `reqs`; each request's delivered token times, each deferral as (step, virtual
    time, request id, output token index), and each request's preemption times."""
    sched, deferrals = driver.scheduler, []
    choose = sched._decode_deadlines.choose

    def recording(step, *args, **kwargs):
        chosen = choose(step, *args, **kwargs)
        # Each with the index of the output token it sits out (vLLM's counts: those
        # delivered and, on the async loop, those in flight come first).
        reqs = sched.requests
        deferrals.extend((step, sched._now, r, reqs[r].num_output_tokens
                          + reqs[r].num_output_placeholders) for r in chosen)
        return chosen

    sched._decode_deadlines.choose = recording
    times: dict[str, list[float]] = collections.defaultdict(list)
    preempted: dict[str, list[float]] = collections.defaultdict(list)
    pending = collections.deque(sorted(reqs, key=lambda r: r.arrival))
    for _ in range(5000):
        if not pending and not driver.busy:
            break
        if pending and not driver.busy:
            driver.now = max(driver.now, pending[0].arrival)
        while pending and pending[0].arrival <= driver.now:
            driver.add(pending.popleft())
        tick = driver.advance()
        for r, n in tick.delivered.items():
            times[r].extend([tick.done] * n)
        for r in tick.output.preempted_req_ids or ():
            preempted[r].append(tick.start)
    else:
        raise AssertionError("not finished in 5000 steps")
    return times, deferrals, preempted


def _deadlines(req: Req, slo: tuple[float, float], times: list[float]) -> list[float]:
    """Each token's deadline by Metron's walk, computed here from the delivered times: the
    first at arrival + TTFT + the allowance per prompt token, each later one a TBT after
    the previous deadline, or after the previous token when that was late."""
    ttft, tbt = slo
    due = [req.arrival + ttft + len(req.prompt) * ALLOWANCE_MS / 1e3]
    for t in times[:-1]:
        due.append(max(t, due[-1]) + tbt)
    return due


@LOOPS
@SOME
@given(workload=workloads(), budget=st.sampled_from(BUDGETS[:2]),
       classes=st.lists(st.sampled_from(("chat", "batch")), min_size=6, max_size=6),
       bound=st.sampled_from((1, 3, 8)))
def test_a_deferred_decode_still_meets_its_deadline_and_sits_out_at_most_the_bound(
        config, loop, workload, budget, classes, bound):
    reqs, blocks = workload
    reqs = _with(reqs, lambda i: {"slo_class": classes[i]})
    slos = {"chat": (3.0, 1.5), "batch": (30.0, 8.0)}
    cfg = _mnemosyne(config, loop, budget, mnemosyne_max_defer_steps=bound)
    with Driver(cfg, blocks) as driver:
        times, deferrals, preempted = _run_recording(driver, reqs)
        check_all_finish(driver, reqs)
        check_blocks_free(driver)
    event(f"deferrals: {'some' if deferrals else 'none'}")
    by_id = {r.req_id: r for r in reqs}
    for _, now, r, k in deferrals:
        assert by_id[r].extra_args["slo_class"] == "batch"  # only the looser class yields
        if any(now <= p for p in preempted[r]):
            continue  # preempted later: a recompute, not the deferral, sets its time
        mine = times[r]
        assert mine[k] <= _deadlines(by_id[r], slos["batch"], mine)[k], (r, now, k, mine)
    # A run of deferrals is of consecutive steps.
    for r in {r for _, _, r, _ in deferrals}:
        steps = [step for step, _, mine, _ in deferrals if mine == r]
        longest = cur = 1
        for a, b in zip(steps, steps[1:]):
            cur = cur + 1 if b == a + 1 else 1
            longest = max(longest, cur)
        assert longest <= bound, (r, steps)


def test_a_batch_decode_gives_its_slot_to_a_chat_prompt_that_is_due(config):
    """Hand-timed: eight batch requests decode (TBT 8 units) when a 48-token chat prompt
    arrives at 6 (first token due at 6 + 3 + 0.48) with a budget of 16. Stall-free, the
    prompt gets 8 tokens a step and its first token comes at the end of its 6th step (12),
    late; with the batch decodes sitting out it gets the whole budget for 3 steps (9) and
    is on time, and no batch token is late."""
    batch = [Req.of(f"b{i}", 0.0, 8, 40, {"slo_class": "batch"}) for i in range(8)]
    chat = Req.of("chat", 6.0, 48, 4, {"slo_class": "chat"})

    def first_token(bound: int) -> tuple[float, list[float], int]:
        cfg = _mnemosyne(config, "sync", 16, mnemosyne_max_defer_steps=bound)
        with Driver(cfg, 64) as driver:
            times, deferrals, _ = _run_recording(driver, [*batch, chat])
            late = sum(t > d for b in batch for t, d in zip(
                times[b.req_id], _deadlines(b, (30.0, 8.0), times[b.req_id])))
        return times["chat"][0], deferrals, late

    stall_free, none, _ = first_token(0)
    deferring, some, late = first_token(8)
    assert not none and some and late == 0
    assert (stall_free, deferring) == (12.0, 9.0) and deferring <= 6.0 + 3.0 + 0.48

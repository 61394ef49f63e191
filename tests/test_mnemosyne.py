"""`--scheduler mnemosyne` on vLLM's real scheduler (vllm_ext.tools.driver): stall-free steps
within the budget, every request finishing, first come first served when deadlines say
nothing else, a short prompt ahead of long ones when its deadline is nearer, and no
starvation under a stream of short requests."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from test_scheduler_properties import (BUDGETS, EXAMPLES, LOOPS, check_all_finish,
                                       check_blocks_free, check_budget, check_stall_free,
                                       workloads)
from test_scheduler_properties import STEP_MODEL
from test_scheduler_properties import config, step_model_path  # noqa: F401  (fixtures)
from vllm_ext.engine.scheduling import req_state
from vllm_ext.tools.driver import Driver, Req
from vllm_ext.schedulers.latency import StepShape
from vllm_ext.schedulers.mnemosyne import MnemosyneConfig, MnemosynePolicy
from vllm_ext.schedulers.request import ReqState
from vllm_ext.schedulers.sarathi import KV_ADMISSION

pytestmark = pytest.mark.release

@LOOPS
@EXAMPLES
@given(workload=workloads(), budget=st.sampled_from(BUDGETS),
       admission=st.sampled_from(KV_ADMISSION), ttft=st.sampled_from((0.5, 2.0, 8.0)),
       allowance_ms=st.sampled_from((0.0, 10.0, 100.0)),
       starvation=st.sampled_from((None, 0.0, 3.0)))
def test_stall_free_within_budget_and_everything_finishes(config, loop, workload, budget,
                                                          admission, ttft, allowance_ms,
                                                          starvation):
    reqs, blocks = workload
    cfg = config(loop, scheduler="mnemosyne", mnemosyne_token_budget=budget,
                 mnemosyne_kv_admission=admission, mnemosyne_ttft_slo_s=ttft,
                 mnemosyne_prefill_ms_per_token=allowance_ms, mnemosyne_starvation_s=starvation)
    with Driver(cfg, blocks) as driver:
        steps = driver.run(reqs, max_steps=5000)
        check_budget(steps, budget)
        check_all_finish(driver, reqs)
        check_blocks_free(driver)
    check_stall_free(steps, reqs)
    check_victims_last(steps, MnemosynePolicy(MnemosyneConfig(ttft, allowance_ms, starvation)))


@LOOPS
@EXAMPLES
@given(workload=workloads(), budget=st.sampled_from(BUDGETS),
       ttft=st.sampled_from((0.5, 2.0, 8.0)), allowance_ms=st.sampled_from((0.0, 10.0, 100.0)),
       starvation=st.sampled_from((None, 0.0, 3.0)), max_seqs=st.sampled_from((2, 8)))
def test_the_kept_order_is_the_policys_order_at_every_step(config, loop, workload, budget, ttft,
                                                            allowance_ms, starvation, max_seqs):
    """The scheduler keeps each request's order key while it holds, and puts in place
    only the waiting requests that joined or whose key expired; at every step the running
    list, and the waiting queue wherever vLLM may admit from it (the running list has
    room), are in exactly the order the policy gives afresh."""
    reqs, blocks = workload
    cfg = config(loop, scheduler="mnemosyne", mnemosyne_token_budget=budget,
                 mnemosyne_ttft_slo_s=ttft, mnemosyne_prefill_ms_per_token=allowance_ms,
                 mnemosyne_starvation_s=starvation, max_num_seqs=max_seqs)
    with Driver(cfg, blocks) as driver:
        sched, order_running, sizes = driver.scheduler, driver.scheduler.order_running, []

        def order_and_check():
            order_running()
            def fresh(queue):
                return sorted(queue, key=lambda r: sched.deadlines.order_key(req_state(r),
                                                                              sched._now))
            assert list(sched.running) == fresh(sched.running)
            if len(sched.running) < sched.max_num_active_reqs:
                assert list(sched.waiting) == fresh(sched.waiting)
            sizes.append(len(sched.waiting))

        sched.order_running = order_and_check
        driver.run(reqs, max_steps=5000)
    assert sizes


def check_victims_last(steps, policy: MnemosynePolicy) -> None:
    """Preemption takes victims from the end of the deadline order: the requests a step
    preempted are the last of its running requests in that order."""
    for s in steps:
        if s.preempted:
            order = [r.req_id for r in policy.order(s.running, s.start)]
            assert set(order[len(order) - len(s.preempted):]) == s.preempted, (order, s)


@LOOPS
@EXAMPLES
@given(workload=workloads(), budget=st.sampled_from(BUDGETS),
       admission=st.sampled_from(KV_ADMISSION))
def test_equal_deadline_offsets_schedule_first_come_first_served(config, loop, workload, budget,
                                                                 admission):
    """With no per-token allowance every deadline is arrival + the same SLO, and with an
    SLO no request misses none is late: the order is arrival order, so the steps are
    Sarathi's."""
    reqs, blocks = workload
    common = dict(token_budget=budget, kv_admission=admission)
    mnemo = config(loop, scheduler="mnemosyne", mnemosyne_prefill_ms_per_token=0.0,
                   mnemosyne_ttft_slo_s=1e6,
                   **{f"mnemosyne_{k}": v for k, v in common.items()})
    sarathi = config(loop, scheduler="sarathi",
                     **{f"sarathi_{k}": v for k, v in common.items()})
    with Driver(mnemo, blocks) as a, Driver(sarathi, blocks) as b:
        assert [list(s.scheduled.items()) for s in a.run(reqs)] == \
            [list(s.scheduled.items()) for s in b.run(reqs)]


def _first_token_step(steps, req_id: str) -> int:
    return next(s.index for s in steps
                if req_id in s.scheduled and s.states[req_id].num_computed + s.scheduled[req_id]
                >= s.states[req_id].num_prompt_tokens)


def test_a_short_prompt_goes_ahead_of_long_documents(config):
    """Two 400-token documents wait; a 16-token question arrives behind them. First
    come first served (Sarathi) gives it its first token no earlier than both
    documents'; by deadline (arrival + 2 s + 1 s per token here: the question's is
    18.5 s, theirs 402 s) it comes before either's, in the first step after it arrives."""
    reqs = [Req.of("doc1", 0.0, 400, 4), Req.of("doc2", 0.0, 400, 4), Req.of("q", 0.5, 16, 4)]
    mnemo = config(scheduler="mnemosyne", mnemosyne_token_budget=128,
                   mnemosyne_prefill_ms_per_token=1000.0, mnemosyne_ttft_slo_s=2.0)
    sarathi = config(scheduler="sarathi", sarathi_token_budget=128)
    with Driver(mnemo, 200) as driver:
        m = driver.run(reqs)
    with Driver(sarathi, 200) as driver:
        s = driver.run(reqs)
    first = {name: {r.req_id: _first_token_step(steps, r.req_id) for r in reqs}
             for name, steps in (("mnemosyne", m), ("sarathi", s))}
    assert first["mnemosyne"]["q"] == 1 < min(first["mnemosyne"]["doc1"], first["mnemosyne"]["doc2"])
    assert first["sarathi"]["q"] >= max(first["sarathi"]["doc1"], first["sarathi"]["doc2"])


def test_a_long_prompt_is_not_starved_by_a_stream_of_short_ones(config):
    """One 480-token prompt, then an 8-token request every step (one time unit) for 300
    steps. The short ones' deadlines are nearer, and once the long prompt cannot make
    its own deadline it yields to every short one that still can; but one TTFT SLO past
    its deadline it is overdue and goes first: its first token comes within its own
    prefill time of that, long before the stream ends. Every request finishes."""
    reqs = [Req.of("long", 0.0, 480, 2)]
    reqs += [Req.of(f"s{i}", 0.5 + i, 8, 2) for i in range(300)]
    cfg = config(scheduler="mnemosyne", mnemosyne_token_budget=32,
                 mnemosyne_ttft_slo_s=4.0, mnemosyne_prefill_ms_per_token=100.0)
    with Driver(cfg, 400) as driver:
        steps = driver.run(reqs, max_steps=5000)
        check_all_finish(driver, reqs)
    policy = MnemosynePolicy(MnemosyneConfig(4.0, 100.0))
    long = ReqState("long", 0.0, 480, 480, 0)
    assert policy.deadline(long) == pytest.approx(52.0)  # 0 + 4 + 480 * 0.1
    overdue_at = next(t for t in range(1000) if policy.overdue(long, t))
    # From then on only decodes (at most 2 running short ones) share its steps.
    first = _first_token_step(steps, "long")
    assert first <= overdue_at + 480 / (32 - 3) + 1 < 300
    # ...and before that it yields to the short ones: they are not made to wait.
    assert first > 480 / 32 + 1


def test_mnemosyne_refusals_name_the_flag(config):
    from vllm_ext.frontend.components import SelectionError

    with pytest.raises(SelectionError, match="--mnemosyne-ttft-slo-s must be > 0"):
        config(scheduler="mnemosyne", mnemosyne_ttft_slo_s=-1.0)
    with pytest.raises(SelectionError, match="--mnemosyne-starvation-s must be >= 0"):
        config(scheduler="mnemosyne", mnemosyne_starvation_s=-1.0)
    with pytest.raises(SelectionError, match="--mnemosyne-prefill-ms-per-token must be >= 0"):
        config(scheduler="mnemosyne", mnemosyne_prefill_ms_per_token=-0.5)
    with pytest.raises(SelectionError, match="--mnemosyne-latency-model: cannot read x.json"):
        config(scheduler="mnemosyne", mnemosyne_latency_model="x.json")
    with pytest.raises(SelectionError, match="applies to --scheduler sarathi"):
        config(scheduler="mnemosyne", sarathi_token_budget=64)


def _drive(config, reqs, budget: int, ttft: float, allowance_ms: float, **options):
    """`reqs` through mnemosyne on the driver (one time unit a step): its steps, their
    records, and the policy the scheduler applied."""
    cfg = config(scheduler="mnemosyne", mnemosyne_token_budget=budget,
                 mnemosyne_ttft_slo_s=ttft, mnemosyne_prefill_ms_per_token=allowance_ms,
                 **options)
    records = []
    with Driver(cfg, 200) as driver:
        done = driver.scheduler.step_done
        driver.scheduler.step_done = lambda rec: (records.append(rec), done(rec))
        steps = driver.run(reqs)
    return steps, records, MnemosynePolicy(MnemosyneConfig(ttft, allowance_ms))


def _state(step, req_id: str) -> ReqState:
    """A request as a step saw it, scheduled or held."""
    return step.states.get(req_id) or next(s for s in step.running if s.req_id == req_id)


def test_step_records_carry_slack_first_tokens_and_misses(config):
    """A hand-timed case (one time unit a step, 1 s TTFT SLO + 1 ms per prompt token):
    the 16-token question's deadline is 1.016, the 300-token document's 1.3. The
    question goes first and its first token, at the end of step 0 (t = 1), is in time;
    the document's, at t = 3, is not. Slack is the deadline less the step's start less
    the allowance for the prompt tokens still to compute."""
    reqs = [Req.of("doc", 0.0, 300, 2), Req.of("q", 0.0, 16, 2)]
    steps, records, _ = _drive(config, reqs, 128, 1.0, 1.0)
    assert [dict(s.scheduled) for s in steps[:3]] == [
        {"q": 16, "doc": 112}, {"q": 1, "doc": 127}, {"doc": 61}]
    assert [r.min_slack_s for r in records[:3]] == pytest.approx(
        [min(1.016 - 0.016, 1.3 - 0.3), 1.3 - 1 - 0.188, 1.3 - 2 - 0.061])
    assert [(r.first_tokens, r.deadline_misses) for r in records[:3]] == [(1, 0), (0, 0), (1, 1)]
    assert sum(r.first_tokens for r in records) == 2
    assert sum(r.deadline_misses for r in records) == 1


def test_a_prompt_too_late_to_be_on_time_yields_to_one_that_can_be(config):
    """A 400-token document (deadline 2 + 400 x 10 ms = 6, predicted to need 4 units
    of its 13 steps) falls behind within three steps. A question arriving at 4.5 has
    a later deadline (6.66), so earliest-deadline-first alone would make it wait for
    the document; but the document can no longer be on time and the question still
    can: the question goes first, in the first step after it arrives."""
    reqs = [Req.of("doc", 0.0, 400, 2), Req.of("q", 4.5, 16, 2)]
    steps, _, policy = _drive(config, reqs, 32, 2.0, 10.0)
    q, doc = _state(steps[5], "q"), _state(steps[5], "doc")
    assert policy.deadline(q) > policy.deadline(doc)
    assert policy.slack(doc, 5.0) < 0 <= policy.slack(q, 5.0)
    assert _first_token_step(steps, "q") == 5 < _first_token_step(steps, "doc")


def test_a_step_time_model_predicts_the_prefill_time_in_each_slack(config, step_model_path):
    """Given a step-time model (without adaptive chunking), a prompt's predicted
    remaining prefill time is the model's for one chunk of what is left, less the fixed
    cost every step pays; step records carry the model's step time too."""
    settings = config(scheduler="mnemosyne", mnemosyne_token_budget=128,
                      mnemosyne_latency_model=step_model_path).additional_config["vllm_ext"]
    assert settings["scheduler"]["latency_model"] == step_model_path
    assert "tbt_slo_ms" not in settings["scheduler"]  # no adaptive chunking
    reqs = [Req.of("doc", 0.0, 300, 2), Req.of("q", 0.0, 16, 2)]
    _, records, _ = _drive(config, reqs, 128, 1.0, 1.0, mnemosyne_latency_model=step_model_path)

    def predicted(left: int, computed: int) -> float:
        return (STEP_MODEL.predict(StepShape(((left, computed),), ()))
                - STEP_MODEL.predict(StepShape()))

    assert records[0].min_slack_s == pytest.approx(
        min(1.016 - predicted(16, 0), 1.3 - predicted(300, 0)))
    assert records[1].min_slack_s == pytest.approx(1.3 - 1 - predicted(188, 112))
    assert all(r.predicted_s > 0 for r in records)


def test_among_late_prompts_the_shortest_goes_first(config):
    """Both late (TTFT SLO 0.5, 1 ms per token): a 400-token document (deadline 0.9) and
    a 16-token question arriving at 1.4 (deadline 1.916). Earliest deadline would keep
    serving the document; the question, with far less left to compute, adds less
    lateness to the other, and goes first, in the first step after it arrives."""
    reqs = [Req.of("doc", 0.0, 400, 2), Req.of("q", 1.4, 16, 2)]
    steps, _, policy = _drive(config, reqs, 32, 0.5, 1.0)
    q, doc = _state(steps[2], "q"), _state(steps[2], "doc")
    assert policy.deadline(q) > policy.deadline(doc)
    assert policy.slack(doc, 2.0) < 0 and policy.slack(q, 2.0) < 0
    assert not policy.overdue(doc, 2.0)
    assert _first_token_step(steps, "q") == 2 < _first_token_step(steps, "doc")

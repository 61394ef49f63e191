"""The scheduling policies without an engine: every step of generated workloads checked."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_sim import Sim, SimReq
from vllm_ext.schedulers import PrefillFirstPolicy, ReqState, SarathiConfig, SarathiPolicy
from vllm_ext.schedulers.request import blocks_for

BLOCK = 16


@st.composite
def workloads(draw):
    n = draw(st.integers(1, 12))
    reqs = []
    for i in range(n):
        step = draw(st.integers(0, 40))
        prompt = draw(st.integers(1, 300))
        output = draw(st.integers(1, 30))
        reqs.append((step, SimReq(f"r{i}", arrival=step + i / 100, prompt=prompt, output=output)))
    return reqs


def _largest(reqs) -> int:
    return max(blocks_for(r.prompt + r.output, BLOCK) for _, r in reqs)


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(reqs=workloads(), budget=st.integers(1, 512), spare_blocks=st.integers(0, 60),
       admission=st.sampled_from(["full", "chunk"]))
def test_sarathi_every_step(reqs, budget, spare_blocks, admission):
    sim = Sim(SarathiPolicy(SarathiConfig(budget, admission)), budget=budget,
              num_blocks=_largest(reqs) + spare_blocks, block_size=BLOCK)
    sim.run(reqs)

    assert sorted(sim.finished) == sorted(r.req_id for _, r in reqs), "a request was lost"
    for step in sim.steps:
        assert sum(step.scheduled.values()) <= budget
        decodes = step.running_decodes
        if budget >= len(decodes) and not step.preempted:
            # Stall-free: no running decode is left out because of a prefill.
            assert all(step.scheduled.get(r) == 1 for r in decodes), step
        _assert_prefills_fcfs(step)
        _assert_admissions_fcfs(step)
        for victim, latest_left in step.victims:  # recompute the latest arrival
            assert victim > latest_left, step


def _assert_prefills_fcfs(step) -> None:
    """A prefill chunk goes to a request only after every earlier prefill got all it wanted."""
    prefills = sorted((s for s in step.before.values() if not s.is_decode), key=lambda s: s.arrival)
    for i, later in enumerate(prefills):
        if step.scheduled.get(later.req_id):
            for earlier in prefills[:i]:
                if earlier.req_id not in step.preempted:
                    assert step.scheduled.get(earlier.req_id) == earlier.tokens_wanted, step


def _assert_admissions_fcfs(step) -> None:
    assert list(step.admitted) == step.waiting_before[:len(step.admitted)], step


@SETTINGS
@given(reqs=workloads(), spare_blocks=st.integers(0, 60))
def test_prefill_first_every_step(reqs, spare_blocks):
    budget = 512  # >= every prompt: prefill-first runs prompts whole
    sim = Sim(PrefillFirstPolicy(), budget=budget, num_blocks=_largest(reqs) + spare_blocks,
              block_size=BLOCK, chunked=False)
    sim.run(reqs)

    assert sorted(sim.finished) == sorted(r.req_id for _, r in reqs), "a request was lost"
    for prev, step in zip([None, *sim.steps], sim.steps):
        _assert_admissions_fcfs(step)
        for req_id, wanted in step.admitted.items():  # whole prompts only
            assert step.scheduled[req_id] == wanted, step
        if step.admitted and (prev is None or prev.scheduled):
            # Decodes wait while prompts run, unless the last step made no progress.
            assert not any(r in step.scheduled for r in step.running_decodes), step


@pytest.mark.parametrize("admission", ["full", "chunk"])
def test_sarathi_under_kv_pressure_preempts_latest_and_loses_nothing(admission):
    reqs = [(i, SimReq(f"r{i}", arrival=float(i), prompt=120 + 10 * i, output=40))
            for i in range(8)]
    sim = Sim(SarathiPolicy(SarathiConfig(64, admission)), budget=64,
              num_blocks=_largest(reqs) + 4, block_size=BLOCK)
    sim.run(reqs)
    victims = [v for s in sim.steps for v in s.victims]
    assert victims, "the workload must run out of KV"
    assert all(victim > latest_left for victim, latest_left in victims)
    assert sorted(sim.finished) == sorted(r.req_id for _, r in reqs)


def test_sarathi_order_puts_decodes_first_then_prefills_by_arrival():
    reqs = [ReqState("late-prefill", 3.0, 100, 100, 20), ReqState("decode-b", 2.0, 10, 12, 11),
            ReqState("early-prefill", 1.0, 100, 100, 50), ReqState("decode-a", 0.5, 10, 15, 14)]
    order = [r.req_id for r in SarathiPolicy(SarathiConfig(64)).order(reqs)]
    assert order == ["decode-a", "decode-b", "early-prefill", "late-prefill"]


@pytest.mark.parametrize("budget,admission,error", [
    (0, "full", "token budget must be >= 1"),
    (64, "lazy", "must be one of full, chunk"),
])
def test_sarathi_config_rejects_bad_settings(budget, admission, error):
    with pytest.raises(ValueError, match=error):
        SarathiConfig(budget, admission)


def test_sarathi_budget_defaults_per_platform():
    assert SarathiConfig.for_platform("cpu").token_budget == 256
    assert SarathiConfig.for_platform("cuda").token_budget == 512
    assert SarathiConfig.for_platform("cuda", 2048).token_budget == 2048

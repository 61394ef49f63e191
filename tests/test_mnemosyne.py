"""`--scheduler mnemosyne` on vLLM's real scheduler (vllm_ext.driver): stall-free steps
within the budget, every request finishing, first come first served when deadlines say
nothing else, a short prompt ahead of long ones when its deadline is nearer, and no
starvation under a stream of short requests."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_scheduler_properties import (BUDGETS, BLOCK, MAX_MODEL_LEN, check_all_finish,
                                       check_blocks_free, check_budget, check_stall_free,
                                       workloads)
from vllm_ext.driver import Driver, Req, engine_config
from vllm_ext.models import make_shape
from vllm_ext.schedulers.mnemosyne import MnemosyneConfig, MnemosynePolicy
from vllm_ext.schedulers.request import ReqState
from vllm_ext.schedulers.sarathi import KV_ADMISSION, SarathiConfig

EXAMPLES = settings(max_examples=int(os.environ.get("VLLMEXT_PROPERTY_EXAMPLES", 300)) // 4,
                    derandomize=True, database=None, deadline=None)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    model = make_shape(tmp_path_factory.mktemp("model"), "tiny")
    cache = {}

    def get(**selection):
        key = tuple(sorted(selection.items()))
        if key not in cache:
            cache[key] = engine_config(model, block_size=BLOCK, max_model_len=MAX_MODEL_LEN,
                                       enable_prefix_caching=True, **selection)
        return cache[key]

    return get


@EXAMPLES
@given(workload=workloads(), budget=st.sampled_from(BUDGETS),
       admission=st.sampled_from(KV_ADMISSION), ttft=st.sampled_from((0.5, 2.0, 8.0)),
       allowance_ms=st.sampled_from((0.0, 10.0, 100.0)))
def test_stall_free_within_budget_and_everything_finishes(config, workload, budget, admission,
                                                          ttft, allowance_ms):
    reqs, blocks = workload
    cfg = config(scheduler="mnemosyne", mnemosyne_token_budget=budget,
                 mnemosyne_kv_admission=admission, mnemosyne_ttft_slo_s=ttft,
                 mnemosyne_prefill_ms_per_token=allowance_ms)
    with Driver(cfg, blocks) as driver:
        steps = driver.run(reqs, max_steps=5000)
        check_budget(steps, budget)
        check_all_finish(driver, reqs)
        check_blocks_free(driver)
    check_stall_free(steps)


@EXAMPLES
@given(workload=workloads(), budget=st.sampled_from(BUDGETS),
       admission=st.sampled_from(KV_ADMISSION))
def test_equal_deadline_offsets_schedule_first_come_first_served(config, workload, budget,
                                                                 admission):
    """With no per-token allowance every deadline is arrival + the same SLO and nothing
    is left to predict: the order is arrival order, so the steps are Sarathi's."""
    reqs, blocks = workload
    common = dict(token_budget=budget, kv_admission=admission)
    mnemo = config(scheduler="mnemosyne", mnemosyne_prefill_ms_per_token=0.0,
                   **{f"mnemosyne_{k}": v for k, v in common.items()})
    sarathi = config(scheduler="sarathi", **{f"sarathi_{k}": v for k, v in common.items()})
    with Driver(mnemo, blocks) as a, Driver(sarathi, blocks) as b:
        assert [list(s.scheduled.items()) for s in a.run(reqs)] == \
            [list(s.scheduled.items()) for s in b.run(reqs)]


def _first_token_step(steps, req_id: str) -> int:
    return next(s.index for s in steps
                if req_id in s.scheduled and s.states[req_id].num_computed + s.scheduled[req_id]
                >= s.states[req_id].num_prompt_tokens)


def test_a_short_prompt_goes_ahead_of_long_documents(config):
    """Two 400-token documents wait; a 16-token question arrives behind them. FCFS
    (Sarathi) serves the documents first; least slack serves the question first, since
    its deadline (arrival + 2 s + 16 ms) is nearer than theirs (+ 400 ms of allowance
    each, of which the model predicts they need only a step or two)."""
    reqs = [Req.of("doc1", 0.0, 400, 4), Req.of("doc2", 0.0, 400, 4), Req.of("q", 0.5, 16, 4)]
    kw = dict(token_budget=128)
    mnemo = config(scheduler="mnemosyne", mnemosyne_prefill_ms_per_token=1000.0,
                   mnemosyne_ttft_slo_s=2.0, **{f"mnemosyne_{k}": v for k, v in kw.items()})
    sarathi = config(scheduler="sarathi", **{f"sarathi_{k}": v for k, v in kw.items()})
    with Driver(mnemo, 200) as driver:
        m = driver.run(reqs)
    with Driver(sarathi, 200) as driver:
        s = driver.run(reqs)
    assert _first_token_step(m, "q") < _first_token_step(m, "doc2")
    assert _first_token_step(s, "q") > _first_token_step(s, "doc2")
    assert _first_token_step(m, "q") < _first_token_step(s, "q")


def test_a_long_prompt_is_not_starved_by_a_stream_of_short_ones(config):
    """One 480-token prompt, then a short request every step for 300 steps. Short
    prompts have nearer deadlines, but slack falls for everyone alike and an overdue
    request is served first: the long prompt gets its first token long before the
    stream ends."""
    reqs = [Req.of("long", 0.0, 480, 2)]
    reqs += [Req.of(f"s{i}", 0.5 + i, 8, 2) for i in range(300)]
    cfg = config(scheduler="mnemosyne", mnemosyne_token_budget=32,
                 mnemosyne_ttft_slo_s=4.0, mnemosyne_prefill_ms_per_token=100.0)
    with Driver(cfg, 400) as driver:
        steps = driver.run(reqs, max_steps=5000)
        check_all_finish(driver, reqs)
    policy = MnemosynePolicy(MnemosyneConfig(SarathiConfig(32), 4.0, 100.0))
    long = ReqState("long", 0.0, 480, 480, 0)
    # Overdue after deadline + 2 SLOs, then 480 tokens at up to 32 a step.
    bound = policy.deadline(long) + policy.config.overdue_s + 480 / 32 + 2
    assert _first_token_step(steps, "long") <= bound < 300


def test_mnemosyne_refusals_name_the_flag(config):
    from vllm_ext.components import SelectionError

    with pytest.raises(SelectionError, match="--mnemosyne-ttft-slo-s must be > 0"):
        config(scheduler="mnemosyne", mnemosyne_ttft_slo_s=-1.0)
    with pytest.raises(SelectionError, match="--mnemosyne-latency-model is used only with "
                                             "--mnemosyne-tbt-slo-ms"):
        config(scheduler="mnemosyne", mnemosyne_latency_model="x.json")
    with pytest.raises(SelectionError, match="applies to --scheduler sarathi"):
        config(scheduler="mnemosyne", sarathi_token_budget=64)

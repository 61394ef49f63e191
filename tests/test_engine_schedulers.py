"""Every scheduler on the real vLLM engine (CPU, float32, greedy), tiny model.

Exactness: each scheduler produces exactly the tokens of stock vLLM. Behaviour:
the step records written by the engine process show each policy doing what it
promises on a workload where long prompts arrive while short ones decode.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

BUDGET = 64  # far below the long prompts (300-520 tokens): they must be chunked


@pytest.fixture(scope="module")
def stock(run_engine):
    return run_engine()


@pytest.mark.parametrize("args", [
    ("--scheduler", "vllm"),
    ("--scheduler", "sarathi", "--budget", str(BUDGET)),
    ("--scheduler", "sarathi", "--budget", str(BUDGET), "--kv-admission", "chunk"),
    ("--scheduler", "prefill-first"),
], ids=["vllm", "sarathi-full", "sarathi-chunk", "prefill-first"])
def test_greedy_tokens_identical_to_stock(run_engine, stock, args):
    result = run_engine(*args)
    assert len(stock["tokens"]) == 7
    assert result["tokens"] == stock["tokens"]
    assert all(len(t) == 40 for t in result["tokens"].values())


@pytest.mark.parametrize("admission", ["full", "chunk"])
def test_sarathi_out_of_kv_preempts_and_loses_nothing(run_engine, stock, admission):
    # 20 blocks of 32 tokens (CPU attention wants multiples of 32) hold 640 tokens;
    # the workload needs about 1,600.
    result = run_engine("--scheduler", "sarathi", "--budget", str(BUDGET),
                        "--kv-admission", admission, "--num-blocks", "20")
    assert sum(s["preempted"] for s in result["steps"]) > 0, "the workload must run out of KV"
    assert result["tokens"] == stock["tokens"], "recomputed requests must match stock vLLM"


def test_mnemosyne_out_of_kv_is_exact_stall_free_and_counts_first_tokens(run_engine, stock):
    """Deadline order on the real engine, short of KV so that it preempts: the tokens are
    stock vLLM's, every step serves every running decode within the budget, and the
    step records count one first token per request (a recomputed one is not counted
    again), the late ones among them as misses."""
    # An SLO no first token can meet (1 ms + 1 us per prompt token): every one is late.
    result = run_engine("--scheduler", "mnemosyne", "--budget", str(BUDGET), "--num-blocks", "20",
                        "--ttft-slo-s", "0.001", "--prefill-ms-per-token", "0.001")
    assert result["config"]["additional_config"]["vllm_ext"]["scheduler"] == {
        "name": "mnemosyne", "token_budget": BUDGET, "kv_admission": "full",
        "ttft_slo_s": 0.001, "prefill_ms_per_token": 0.001}
    assert result["config"]["scheduling_policy"] == "fcfs"
    assert result["tokens"] == stock["tokens"]
    steps = result["steps"]
    assert sum(s["preempted"] for s in steps) > 0, "the workload must run out of KV"
    for s in steps:
        assert s["decode_tokens"] + s["prefill_tokens"] <= BUDGET
        if not s["preempted"]:
            assert s["decode_tokens"] == s["running_decodes"], s
    assert sum(s["first_tokens"] for s in steps) == len(stock["tokens"])
    assert sum(s["deadline_misses"] for s in steps) == len(stock["tokens"])
    assert min(s["min_slack_s"] for s in steps if s["prefill_tokens"]) < 0


def test_mnemosyne_gives_a_later_but_shorter_prompt_its_first_token_first(run_engine, stock):
    """The 520-token prompt arrives at step 6, the 410-token one at step 9. First come
    first served (stock vLLM) gives the earlier one its first token first; with 100 ms
    of deadline allowance per prompt token the later one is due 11 s sooner, and comes
    first. No deadline is near (a TTFT SLO of 1000 s), so this is the order alone."""
    result = run_engine("--scheduler", "mnemosyne", "--budget", str(BUDGET),
                        "--ttft-slo-s", "1000", "--prefill-ms-per-token", "100")
    order = lambda r: r["first_token_order"].index
    assert order(stock)("req-5") < order(stock)("req-6")
    assert order(result)("req-6") < order(result)("req-5")
    assert result["tokens"] == stock["tokens"]
    assert sum(s["deadline_misses"] for s in result["steps"]) == 0


def test_stock_run_without_flags_is_untouched(stock):
    assert stock["config"]["scheduler_cls"] in ("None", "vllm.v1.core.sched.scheduler.Scheduler")
    assert "vllm_ext" not in stock["config"]["additional_config"]
    assert stock["steps_recorded"] == 0


def test_sarathi_steps_are_stall_free_and_within_budget(run_engine):
    result = run_engine("--scheduler", "sarathi", "--budget", str(BUDGET))
    assert result["config"]["max_num_batched_tokens"] == BUDGET
    assert result["config"]["additional_config"]["vllm_ext"]["scheduler"] == {
        "name": "sarathi", "token_budget": BUDGET, "kv_admission": "full"}
    steps = result["steps"]
    assert steps and result["steps_recorded"] == len(steps)
    for s in steps:
        assert s["decode_tokens"] + s["prefill_tokens"] <= BUDGET
        if not s["preempted"]:
            assert s["decode_tokens"] == s["running_decodes"], s
    # The workload exercised the technique: long prompts were chunked while
    # earlier requests kept decoding in the same steps.
    hybrid = [s for s in steps if s["partial_prefills"] and s["decode_tokens"]]
    assert len(hybrid) >= 5


def test_prefill_first_stalls_decodes_for_whole_prompts(run_engine):
    result = run_engine("--scheduler", "prefill-first")
    steps = result["steps"]
    assert steps
    assert all(s["partial_prefills"] == 0 for s in steps), "prompts must run whole"
    assert not [s for s in steps if s["prefill_tokens"] and s["decode_tokens"]], \
        "decodes must wait while prompts run"
    stalled = [s for s in steps if s["prefill_tokens"] and s["running_decodes"]]
    assert stalled, "the long prompts arrived while requests were decoding"


def test_stock_scheduler_is_recorded_unchanged(run_engine):
    result = run_engine("--scheduler", "vllm")
    assert result["config"]["scheduler_cls"] == "vllm_ext.engine.scheduling.StockScheduler"
    assert result["steps"] and sum(s["decode_tokens"] for s in result["steps"]) > 0

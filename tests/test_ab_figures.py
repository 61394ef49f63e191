"""The A/B harness's figures from hand-made records: summary metrics, histogram
quantiles, the paired bootstrap, capacity bisection and output equivalence."""

from __future__ import annotations

import math

import pytest

from vllm_ext.ab import promtext
from vllm_ext.ab.capacity import CapacityTarget, bisect_capacity
from vllm_ext.ab.client import RequestRecord
from vllm_ext.ab.equivalence import Output, Prompt, compare, topk_kl, verdict
from vllm_ext.ab.metron import Timeline
from vllm_ext.ab.stats import paired_bootstrap
from vllm_ext.ab.summary import SLO, summarize


def rec(i, sent, events, prompt=100, completed=True, usage=None):
    n = sum(k for _, k in events)
    return RequestRecord(i, sent, sent, prompt, n, list(events), completed,
                         "length" if completed else None, n if usage is None else usage,
                         None if completed else "aborted")


# Times are exact in binary, so figures compare with ==.
RUN = [
    # 4 tokens: first at 0.5 (TTFT 0.5), then a 2-token event at 1.0, an empty event, 1.25
    rec(0, 0.0, [(0.5, 1), (1.0, 2), (1.125, 0), (1.25, 1)]),
    # 3 tokens, TTFT 1.0, gaps 0.25, 0.25
    rec(1, 0.5, [(1.5, 1), (1.75, 1), (2.0, 1)]),
    # aborted after one token: its TTFT and (no) gaps still count; it is not completed
    rec(2, 1.0, [(3.0, 1)], completed=False),
]


def test_summary_of_hand_computed_run():
    s = summarize([RUN], SLO(ttft_s=0.75, tbt_ms=500))
    assert (s["requests"], s["completed"], s["failed"], s["output_tokens"]) == (3, 2, 1, 8)
    # TTFTs 0.5, 1.0, 2.0 -> median 1.0
    assert s["ttft_p50_s"] == 1.0
    # pooled gaps: 0.5, 0 (coalesced), 0.25 | 0.25, 0.25 -> sorted 0, .25, .25, .25, .5
    assert s["tbt_p50_ms"] == 250.0 and s["tbt_max_ms"] == 500.0
    assert s["tbt_p99_ms"] == pytest.approx(1e3 * (0.25 + 0.96 * 0.25))
    # per-request max gap: 0.5 and 0.25; the aborted one has no gaps
    assert s["req_max_tbt_p50_ms"] == 375.0
    # TPOT: (1.25 - 0.5) / 3 = 0.25 and (2.0 - 1.5) / 2 = 0.25
    assert s["tpot_p50_ms"] == 250.0
    # span from the first send (0) to the last token (3.0)
    assert s["duration_s"] == 3.0 and s["out_tok_per_s"] == 8 / 3 and s["req_per_s"] == 2 / 3
    # goodput: request 0 meets TTFT 0.75 and TPOT 0.5; request 1 (TTFT 1.0) does not
    assert s["goodput_req_s"] == 1 / 3
    # deadlines, D_p = 0.75, D_d = 0.5: request 0 meets 4/4; request 1's first token is
    # 0.25 late (1 miss) then 2 met; request 2's first is 1.25 late: floor(1.25 / 0.5) + 1 = 3
    assert s["deadline_miss_rate"] == 4 / 10
    assert s["fluidity_mean"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert s["fluid_requests"] == 1 / 3
    assert s["token_count_mismatches"] == 0


def test_token_count_mismatch_is_flagged():
    s = summarize([[rec(0, 0.0, [(1.0, 1), (2.0, 1)], usage=3)]], SLO())
    assert s["token_count_mismatches"] == 1


def test_runs_pool_percentiles_and_sum_durations():
    a = [rec(0, 0.0, [(1.0, 1), (2.0, 1)])]
    b = [rec(0, 10.0, [(12.0, 1), (13.0, 1)])]
    s = summarize([a, b], SLO())
    assert s["duration_s"] == 2.0 + 3.0 and s["out_tok_per_s"] == 4 / 5
    assert s["ttft_p50_s"] == 1.5


def test_prefill_time_extends_the_first_token_deadline():
    r = [rec(0, 0.0, [(2.0, 1), (2.25, 1)], prompt=1000)]
    assert summarize([r], SLO(ttft_s=1.0, tbt_ms=500))["deadline_miss_rate"] > 0
    assert summarize([r], SLO(ttft_s=1.0, tbt_ms=500, prefill_ms_per_token=1.0))["deadline_miss_rate"] == 0


# vLLM-style cumulative buckets: 10 observations, 4 <= 0.1 s, 9 <= 1 s, 1 above
TEXT = """# HELP vllm:request_queue_time_seconds x
vllm:request_queue_time_seconds_bucket{engine="0",le="0.1",model_name="m"} 4.0
vllm:request_queue_time_seconds_bucket{engine="0",le="1.0",model_name="m"} 9.0
vllm:request_queue_time_seconds_bucket{engine="0",le="+Inf",model_name="m"} 10.0
vllm:request_queue_time_seconds_count{engine="0",model_name="m"} 10.0
"""


def test_histogram_quantiles():
    h = promtext.histogram(TEXT, "vllm:request_queue_time_seconds")
    assert h == {0.1: 4.0, 1.0: 9.0, math.inf: 10.0}
    assert promtext.quantile(h, 0.4) == pytest.approx(0.1)  # exactly on a bound
    assert promtext.quantile(h, 0.5) == pytest.approx(0.1 + 0.9 * (1 / 5))
    assert promtext.quantile(h, 0.99) == 1.0  # in the +Inf bucket: the largest finite bound
    before = {0.1: 4.0, 1.0: 4.0, math.inf: 4.0}
    assert promtext.quantile(promtext.delta(before, h), 0.5) == pytest.approx(0.1 + 0.9 * 3 / 5)
    assert promtext.histogram("other_metric 1\n", "vllm:request_queue_time_seconds") is None
    assert promtext.quantile(None, 0.5) is None
    assert promtext.add(before, h) == {0.1: 8.0, 1.0: 13.0, math.inf: 14.0}


def test_counters_sum_over_engines():
    text = ('vllm:prefix_cache_hits_total{engine="0"} 10.0\n'
            'vllm:prefix_cache_hits_total{engine="1"} 5.0\n'
            'vllm:prefix_cache_hits_created{engine="0"} 1.7e9\n')
    assert promtext.counter(text, "vllm:prefix_cache_hits") == 15.0
    assert promtext.counter(text, "vllm:prefix_cache_queries") is None


def _tls(shift: float, n: int = 40):
    return [[Timeline.of(0.0, [(0.1 * (i % 7) + 0.05 + shift, 1), (1.0 + shift, 1)])
             for i in range(n)] for _ in range(2)]


def test_bootstrap_of_identical_arms_is_zero():
    ci = paired_bootstrap(_tls(0.0), _tls(0.0), lambda tls: sum(t.ttft for t in tls) / len(tls),
                          iterations=200)
    assert (ci.estimate, ci.low, ci.high) == (0.0, 0.0, 0.0) and not ci.excludes_zero


def test_bootstrap_finds_a_constant_shift_exactly():
    mean_ttft = lambda tls: sum(t.ttft for t in tls) / len(tls)
    ci = paired_bootstrap(_tls(0.0), _tls(0.25), mean_ttft, iterations=200)
    # pairing makes every resample's difference the shift itself
    assert ci.estimate == pytest.approx(0.25) and ci.low == pytest.approx(0.25)
    assert ci.high == pytest.approx(0.25) and ci.excludes_zero


def test_bootstrap_rejects_unpaired_runs():
    with pytest.raises(ValueError, match="same seeds and requests"):
        paired_bootstrap(_tls(0.0, 40), _tls(0.0, 39), lambda tls: 0.0)


def test_capacity_bisection_brackets_the_threshold():
    target = CapacityTarget(tbt_p99_ms=100.0, sched_delay_p50_s=2.0)
    # P99 TBT grows with load; the SLO breaks at 3.7 QPS
    probe = lambda q: target.judge(q, 100.0 * q / 3.7, 0.1, 0)
    cap = bisect_capacity(probe, 0.5, 20.0, iterations=8)
    assert cap.qps <= 3.7 < cap.ceiling and cap.ceiling / cap.qps < 1.1
    assert len(cap.probes) == 8


def test_capacity_also_bounded_by_scheduling_delay_and_failures():
    target = CapacityTarget(tbt_p99_ms=1e9, sched_delay_p50_s=2.0)
    assert not target.judge(1.0, 10.0, 2.5, 0).passed
    assert not target.judge(1.0, 10.0, 0.1, 1).passed
    assert target.judge(1.0, 10.0, None, 0).passed  # no histogram: judged on TBT alone
    always = bisect_capacity(lambda q: target.judge(q, 1.0, 0.0, 0), 1.0, 4.0, 3)
    assert always.ceiling is None and always.describe().startswith(">=")
    never = bisect_capacity(lambda q: target.judge(q, 1.0, 9.0, 0), 1.0, 4.0, 3)
    assert never.qps is None and never.describe().startswith("<")


def test_topk_kl():
    p = {1: math.log(0.5), 2: math.log(0.3), 3: math.log(0.2)}  # the whole distribution
    assert topk_kl(p, dict(p)) == 0.0
    q = {1: math.log(0.25), 2: math.log(0.25), 3: math.log(0.5)}
    exact = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert topk_kl(p, q) == pytest.approx(exact)
    # top-2 only: the rest is one bucket; token 2 missing from q shares q's leftover 0.4
    p2 = {1: math.log(0.5), 2: math.log(0.3)}
    q2 = {1: math.log(0.6)}
    share = 0.4 / 2
    want = 0.5 * math.log(0.5 / 0.6) + 0.3 * math.log(0.3 / share) + 0.2 * math.log(0.2 / share)
    assert topk_kl(p2, q2) == pytest.approx(want)


def _out(ids, text=""):
    return Output(tuple(ids), text, tuple({t: 0.0} for t in ids))


def test_compare_reports_divergence_agreement_and_flips():
    prompts = [Prompt("a"), Prompt("b", answer="yes"), Prompt("c", answer="no")]
    base = [_out([1, 2, 3]), _out([4, 5, 6], "yes it is"), _out([7, 8], "no")]
    arm = [_out([1, 2, 3]), _out([4, 9, 6], "maybe"), _out([7, 8], "no")]
    c = compare(prompts, base, arm)
    assert c["exact_match_rate"] == 2 / 3
    assert c["first_divergence"] == [None, 1, None] and c["earliest_divergence"] == 1
    # compared positions: 3 + 2 (up to and including the divergence) + 2; one disagrees
    assert c["top1_agreement"] == 6 / 7
    assert c["prompts_with_answers"] == 2 and c["flips_pct"] == 50.0
    assert "NOT identical" in verdict("arm", "base", c) and "earliest at output token 1" in verdict(
        "arm", "base", c)
    same = compare(prompts, base, base)
    assert same["exact_match_rate"] == 1.0 and same["kl_max"] == 0.0 and same["flips_pct"] == 0.0
    assert verdict("arm", "base", same) == "arm: greedy outputs identical to base on all 3 prompts."


def test_shorter_output_diverges_where_it_ends():
    c = compare([Prompt("a")], [_out([1, 2, 3])], [_out([1, 2])])
    assert c["first_divergence"] == [2] and c["exact_match_rate"] == 0.0


def test_a_load_generator_that_fell_behind_is_warned_of(tmp_path):
    from pathlib import Path

    from vllm_ext.ab.config import ABConfig, Arm, ArmResult
    from vllm_ext.ab.report import LAG_WARN_S, lagging_arms
    from vllm_ext.ab.traces import Trace

    def arm(name: str, lag_s: float) -> ArmResult:
        # Request 1 is sent lag_s after its arrival; the others on time.
        late = [RequestRecord(i, float(i), float(i) + (lag_s if i == 1 else 0.0), 100, 1,
                              [(float(i) + 2.0, 1)], True, "length", 1) for i in range(3)]
        return ArmResult(Arm(name, ("--scheduler", "vllm")), [late],
                         summarize([late], SLO(5.0, 1000.0)))

    results = [arm("on-time", LAG_WARN_S / 2), arm("behind", 1.5)]
    assert results[1].summary["client_lag_p99_s"] > LAG_WARN_S
    open_loop = ABConfig(model="m", arms=[r.arm for r in results],
                         traces=[Trace((), 0, "open loop")], out=Path(tmp_path), vocab_size=64)
    assert lagging_arms(results, open_loop) == [
        f"behind: {results[1].summary['client_lag_p99_s']:.2f} s"]
    # A closed loop sends each request when another ends: there is no schedule to miss.
    closed = ABConfig(model="m", arms=[r.arm for r in results],
                      traces=[Trace((), 0, "closed loop", concurrency=4)], out=Path(tmp_path),
                      vocab_size=64)
    assert lagging_arms(results, closed) == []

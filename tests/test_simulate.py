"""`vllm-ext simulate`: vLLM's own scheduler on a virtual clock, checked on a case small
enough to time by hand, then the CLI's refusals, its sweep and its report."""

from __future__ import annotations

import json

import pytest

from vllm_ext.ab.summary import SLO, summarize
from vllm_ext.ab.traces import Trace, TraceRequest
from vllm_ext.tools.models import make_shape
from vllm_ext.simulate.arms import ArmError, Target, arm_config
from vllm_ext.simulate.engine import SimulationError, simulate_trace

from step_times import per_token


@pytest.fixture(scope="module")
def shape_dir(tmp_path_factory):
    return str(make_shape(tmp_path_factory.mktemp("shape"), "tiny"))


def _trace(*reqs: tuple[float, int, int], concurrency: int | None = None) -> Trace:
    return Trace(tuple(TraceRequest(*r) for r in reqs), seed=0, description="hand-made",
                 concurrency=concurrency)


@pytest.mark.release
def test_clock_and_metrics_by_hand(shape_dir):
    """Stock vLLM (no vllm-ext flag), a 64-token budget, step time 1 s + 1/64 s a token.

    step 0 at 0:        A's first 64 prompt tokens             2.0 s      -> 2.0
    step 1 at 2.0:      A's last 36 (A's 1st token)            1.5625 s   -> 3.5625
    step 2 at 3.5625:   A decodes, B (arrived at 2.5) all 30   1.484375 s -> 5.046875
    step 3 at 5.046875: A and B decode (both finish)           1.03125 s  -> 6.078125
    """
    config = arm_config(shape_dir, ["--max-num-batched-tokens", "64", "--max-model-len", "512"])
    from vllm.v1.core.sched.scheduler import Scheduler

    assert config.scheduler_config.get_scheduler_cls() is Scheduler  # stock, unchanged
    run = simulate_trace(config, 64, _trace((0.0, 100, 3), (2.5, 30, 2)), per_token)
    a, b = run.records
    assert a.events == [(3.5625, 1), (5.046875, 1), (6.078125, 1)]
    assert b.events == [(5.046875, 1), (6.078125, 1)]
    assert (a.sent, b.sent) == (0.0, 2.5) and a.completed and b.completed
    assert run.sched_delays == [0.0, 1.0625]  # B waited for step 2 to start
    assert run.steps == 4 and run.simulated_s == 6.078125
    s = summarize([run.records], SLO(ttft_s=3.2, tbt_ms=1100))
    assert s["ttft_p50_s"] == (3.5625 + 2.546875) / 2
    assert s["tbt_max_ms"] == 1484.375
    assert s["out_tok_per_s"] == 5 / 6.078125
    # A's first token (0.36 s late) and its 1.48 s gap miss; B's tokens are in time.
    assert s["deadline_miss_rate"] == 2 / 5


def test_idle_engine_waits_for_the_next_arrival(shape_dir):
    config = arm_config(shape_dir, ["--max-num-batched-tokens", "64", "--max-model-len", "512"])
    run = simulate_trace(config, 64, _trace((0.0, 10, 1), (100.0, 10, 1)), per_token)
    # 1 + 10/64 s each, the second starting at its arrival
    assert [r.events for r in run.records] == [[(1.15625, 1)], [(101.15625, 1)]]
    assert run.sched_delays == [0.0, 0.0]


def test_closed_loop_sends_the_next_request_as_one_finishes(shape_dir):
    config = arm_config(shape_dir, ["--max-num-batched-tokens", "64", "--max-model-len", "512"])
    run = simulate_trace(config, 64, _trace((0.0, 10, 1), (0.0, 10, 1), concurrency=1),
                         per_token)
    first, second = run.records
    assert first.events == [(1.15625, 1)]
    assert second.sent == 1.15625 and second.events == [(2.3125, 1)]


def test_a_prompt_larger_than_the_kv_cache_is_reported_not_looped(shape_dir):
    config = arm_config(shape_dir, ["--max-model-len", "4096"])
    block = config.cache_config.block_size
    with pytest.raises(SimulationError, match="more KV than the cache holds"):
        simulate_trace(config, 4, _trace((0.0, 8 * block, 1)), per_token)


def test_a_request_beyond_the_context_fails_as_a_server_refuses_it(shape_dir):
    config = arm_config(shape_dir, ["--max-num-batched-tokens", "64", "--max-model-len", "128"])
    run = simulate_trace(config, 64, _trace((0.0, 120, 9), (0.0, 10, 1)), per_token)
    refused, served = run.records
    assert "exceed max_model_len 128" in refused.error and not refused.events
    assert served.completed and served.events == [(1.15625, 1)]


@pytest.mark.release
def test_gpu_target_resolves_as_vllm_serve_would_there(shape_dir):
    from vllm_ext.frontend.selection import current_platform_name

    gpu = Target("cuda", 2048, 256, 16)
    sarathi = arm_config(shape_dir, ["--scheduler", "sarathi"], gpu)
    assert sarathi.scheduler_config.max_num_batched_tokens == 512  # Sarathi's GPU budget
    assert sarathi.cache_config.block_size == 16
    stock = arm_config(shape_dir, ["--max-model-len", "4096"], gpu).scheduler_config
    assert (stock.max_num_batched_tokens, stock.max_num_seqs) == (2048, 256)
    # Without chunked prefill vLLM's own defaulting raises the budget to the context.
    whole = arm_config(shape_dir, ["--scheduler", "prefill-first", "--max-model-len", "4096"], gpu)
    assert whole.scheduler_config.max_num_batched_tokens == 4096
    assert current_platform_name() == "cpu"  # the simulated platform does not leak


@pytest.mark.release
def test_bad_arm_flags_name_the_problem(shape_dir):
    with pytest.raises(ArmError, match="unrecognized arguments: --bogus"):
        arm_config(shape_dir, ["--bogus"])
    with pytest.raises(ArmError, match="choose from"):
        arm_config(shape_dir, ["--scheduler", "fastest"])
    with pytest.raises(ArmError, match="contradicts --max-num-batched-tokens"):
        arm_config(shape_dir, ["--scheduler", "sarathi", "--sarathi-token-budget", "64",
                               "--max-num-batched-tokens", "128"])


def _cli(*args: str) -> int:
    from vllm_ext.tools.cli import main

    return main(["simulate", "--no-progress", "--bootstrap", "50", *args])


@pytest.mark.parametrize("args, message", [
    ((), "give exactly one step-time source"),
    (("--gpu", "a100", "--step-time", "step_times:per_token"), "got --gpu and --step-time"),
    (("--gpu", "a100"), "--gpu needs --model-shape"),
    (("--gpu", "h100", "--model-shape", "llama-3-8b"), "profiled on h100: llama-2-70b, llama-2-7b"),
    (("--gpu", "a100", "--model-shape", "llama-3-8b", "--attn-flops-fraction", "1.5"),
     "--attn-flops-fraction must be in \\(0, 1\\]"),
    (("--step-time", "step_times"), "expected module:function"),
    (("--step-time", "step_times:nothing"), "has no attribute 'nothing'"),
    (("--latency-model", "/nonexistent.json"), "--latency-model /nonexistent.json"),
    (("--step-time", "step_times:per_token", "--kv-memory", "-1"), "--kv-memory must be > 0"),
    (("--step-time", "step_times:per_token", "--arm", "x=--bogus"), "arm x .*--bogus"),
    (("--step-time", "step_times:per_token", "--arm", "s=--scheduler sarathi",
      "--prompt-len", "5000"), "request 0 of seed 0 needs 5000 prompt"),
    (("--step-time", "step_times:per_token", "--arm", "v=--scheduler vllm",
      "--sweep", "sarathi-token-budget=64,128"), "no arm takes --sarathi-token-budget"),
    (("--step-time", "step_times:per_token", "--arm", "v=", "--sweep", "budget"),
     "expected FLAG=V1,V2"),
])
def test_bad_options_are_refused_before_anything_runs(shape_dir, tmp_path, capsys, args, message):
    out = tmp_path / "report"
    model = () if "--gpu" in args else ("--model", shape_dir)
    arms = () if "--arm" in args else ("--arm", "base=--scheduler vllm")
    assert _cli(*model, *arms, "--serve-args", "--max-model-len 2048", "--out", str(out),
                "--num-requests", "4", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("vllm-ext simulate: error: ")
    import re

    assert re.search(message, err), err
    assert not out.exists()


@pytest.mark.release
def test_sweep_capacity_report(shape_dir, tmp_path, capsys):
    """Two arms, one swept over two budgets, capacity-searched; every figure in the
    report is marked as simulated and the best budget is named."""
    out = tmp_path / "report"
    code = _cli("--model", shape_dir, "--step-time", "step_times:per_token",
                "--serve-args", "--max-model-len 2048",
                "--arm", "vllm=--scheduler vllm --max-num-batched-tokens 256", "--arm", "sarathi=--scheduler sarathi",
                "--sweep", "sarathi-token-budget=64,256", "--num-requests", "12", "--qps",
                "0.05", "--prompt-len", "uniform:50:400", "--output-len", "8",
                "--capacity-qps", "0.01:1", "--capacity-probes", "3", "--capacity-requests",
                "12", "--tbt-slo-ms", "9000", "--num-gpu-blocks", "200", "--out", str(out))
    printed = capsys.readouterr().out
    assert code == 0, printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["simulated"] and rep["simulation"]["source"] == "step_times:per_token"
    assert [a["name"] for a in rep["arms"]] == ["vllm", "sarathi@64", "sarathi@256"]
    assert rep["simulation"]["sweep"]["arms"] == {"sarathi": [["64", "sarathi@64"],
                                                              ["256", "sarathi@256"]]}
    assert "vllm" in rep["simulation"]["sweep"]["skipped"]
    for arm in rep["arms"]:
        assert arm["error"] is None and arm["summary"]["completed"] == 12
        assert len(arm["capacity"]["probes"]) == 3
    budgets = {a["name"]: a["summary"]["max_num_batched_tokens"] for a in rep["arms"]}
    assert budgets == {"vllm": 256, "sarathi@64": 64, "sarathi@256": 256}
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# Simulated A/B: a forecast, not a measurement")
    assert "## Sweep of --sarathi-token-budget" in summary and "| best |" in summary
    assert "SIMULATED" in printed
    raw = json.loads((out / "raw" / "sarathi@64" / "seed0.json").read_text())
    assert raw["simulated"] and len(raw["sched_delays"]) == 12


def test_a_failing_step_time_fails_its_arm_only(shape_dir, tmp_path):
    out = tmp_path / "report"
    assert _cli("--model", shape_dir, "--step-time", "step_times:negative", "--arm",
                "a=--scheduler vllm", "--num-requests", "2", "--out", str(out),
                "--serve-args", "--max-model-len 2048", "--max-prompt-tokens", "100",
                "--output-len", "4") == 1
    rep = json.loads((out / "report.json").read_text())
    assert "a step takes >= 0 seconds" in rep["arms"][0]["error"]


@pytest.mark.release
def test_adaptive_arms_plan_with_a_model_fitted_to_the_source(shape_dir, tmp_path):
    """--sarathi-tbt-slo-ms without a model of its own: the arm plans with the linear
    step-time model fitted to the simulator's source (here exactly linear, so the fit
    recovers it), and every step it takes keeps within the target the model predicts."""
    from vllm_ext.schedulers.latency import LatencyModel

    out = tmp_path / "report"
    # Without the host's time: a step at the target would otherwise end a host-time later.
    assert _cli("--model", shape_dir, "--step-time", "step_times:per_token",
                "--serve-args", "--max-model-len 4096", "--host-time-scale", "0",
                "--arm", "adaptive=--scheduler sarathi --sarathi-token-budget 512 "
                         "--sarathi-tbt-slo-ms 5000",
                "--num-requests", "6", "--qps", "0.5", "--prompt-len", "uniform:300:900",
                "--output-len", "16", "--out", str(out)) == 0
    model = LatencyModel.from_json((out / "adaptive-step-time-model.json").read_text())
    assert model.coef == pytest.approx((1.0, 1 / 64, 0.0, 1 / 64, 0.0), abs=1e-9)
    rep = json.loads((out / "report.json").read_text())
    assert any("fitted to this source" in a for a in rep["simulation"]["assumptions"])
    # 1 s + 1/64 s per token within 5 s: at most 256 tokens a step, so every gap
    # between tokens (a step) is at most 5 s although the budget allows 512.
    assert rep["arms"][0]["summary"]["tbt_max_ms"] <= 5000


@pytest.mark.release
def test_a_profile_of_an_engine_that_serves_otherwise_is_said_aloud(shape_dir, tmp_path, capsys):
    """A step-time model profiled at bfloat16 with steps of up to 256 tokens, used for a
    float32 arm at 512: the simulation says so, aloud and in the report, which also names
    the arm's engine loop (this CPU's: synchronous) and counts the scheduler's host time."""
    from vllm_ext.schedulers.latency import LatencyModel

    served = {"dtype": "bfloat16", "max_num_batched_tokens": 256, "attn": "vllm",
              "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "kvp": 1}
    path = tmp_path / "lat.json"
    path.write_text(LatencyModel((1e-3, 1e-5, 0.0, 1e-4, 0.0),
                                 fit={"served": served, "model": shape_dir}).to_json())
    out = tmp_path / "report"
    assert _cli("--latency-model", str(path), "--host-time-scale", "1", "--serve-args",
                "--max-model-len 2048 --dtype float32", "--arm",
                "base=--scheduler vllm --max-num-batched-tokens 512", "--arm",
                "same=--scheduler vllm --max-num-batched-tokens 256 --dtype bfloat16",
                "--num-requests", "4", "--prompt-len", "uniform:50:100", "--output-len", "4",
                "--out", str(out)) == 0
    differs = ("Arm base serves otherwise than the profiled engine: dtype float32 (profiled "
               "at bfloat16), steps of up to 512 tokens (profiled at 256).")
    printed = capsys.readouterr().out
    assert f"WARNING: {differs}" in printed and "Arm same" not in printed
    rep = json.loads((out / "report.json").read_text())
    said = rep["simulation"]["assumptions"]
    assert any(a.startswith(differs) for a in said)
    assert "Engine loop, as vLLM chooses it for each arm's config: synchronous (base, same)." \
        in said
    assert any("host time" in a and "timed on every step" in a for a in said)
    for arm in rep["arms"]:
        assert arm["summary"]["engine_loop"] == "synchronous" and arm["summary"]["sim_host_s"] > 0


@pytest.mark.release
def test_a_profile_without_its_engines_record_is_compared_by_its_target(shape_dir):
    """A profile from before profiles recorded their engine: what its target says counts
    (not a dtype of "auto"), against the arm's config as vLLM's serve parser makes it."""
    from vllm_ext.schedulers.latency import LatencyModel
    from vllm_ext.tools.profile import mismatches, profiled_traits

    legacy = LatencyModel((1.0, 0, 0, 0, 0), fit={"dtype": "auto", "budget": 256, "attn": "pod"})
    assert profiled_traits(legacy) == {"max_num_batched_tokens": 256, "attn": "pod"}
    config = arm_config(shape_dir, ["--max-model-len", "1024", "--max-num-batched-tokens", "256"])
    assert mismatches(legacy, config) == ["attention vllm (profiled at pod)"]


# Per-request SLOs ------------------------------------------------------------------------

@pytest.mark.release
def test_a_requests_slos_reach_vllms_request(shape_dir):
    """What the API server makes of vllm_xargs and priority, on vLLM's own Request."""
    from vllm_ext.tools.driver import Driver, Req

    config = arm_config(shape_dir, ["--max-model-len", "512", "--scheduling-policy", "priority"])
    with Driver(config, 64) as driver:
        driver.add(Req.of("a", 0.0, 10, 2, {"ttft_slo_ms": 1000, "slo_class": "chat"}, priority=1))
        driver.add(Req.of("b", 0.0, 10, 2))
        a, b = driver.scheduler.requests["a"], driver.scheduler.requests["b"]
        assert a.sampling_params.extra_args == {"ttft_slo_ms": 1000, "slo_class": "chat"}
        assert a.priority == 1 and b.priority == 0 and b.sampling_params.extra_args is None


TWO_CLASSES = ("arrival,prompt_tokens,output_tokens,slo_class,ttft_slo_ms,tbt_slo_ms\n"
               "0,200,4,doc,60000,5000\n0,200,4,doc,60000,5000\n"
               "0,20,2,chat,5000,2000\n0,20,2,chat,5000,2000\n")


def test_two_classes_through_the_real_scheduler_report_per_class(shape_dir, tmp_path, capsys):
    """Two documents then two chats, all waiting at once, one request at a time: first come
    first served runs the documents first; a priority arm given chat=0, doc=1 runs the
    chats first. Each class is judged by its own deadlines, and compared per class."""
    trace = tmp_path / "two.csv"
    trace.write_text(TWO_CLASSES)
    out = tmp_path / "report"
    serve = "--max-model-len 512 --max-num-seqs 1 --max-num-batched-tokens 256"
    assert _cli("--model", shape_dir, "--step-time", "step_times:per_token", "--serve-args", serve,
                "--host-time-scale", "0", "--trace-csv", str(trace), "--arm", "fcfs=",
                "--arm", "prio=--scheduling-policy priority", "--slo-priority", "chat=0,doc=1",
                "--num-gpu-blocks", "200", "--out", str(out)) == 0
    rep = json.loads((out / "report.json").read_text())
    fcfs, prio = (a["summary"]["per_class"] for a in rep["arms"])
    assert list(fcfs) == ["doc", "chat"] and fcfs["chat"]["requests"] == 2
    # fcfs: each request alone, a 200-token prompt 1 + 200/64 s, each decode 1 + 1/64 s:
    # the chats wait for both documents (over 14 s) and miss their 5 s first token.
    assert fcfs["chat"]["ttft_p50_s"] > 10 and fcfs["chat"]["slo_attainment"] == 0
    assert prio["chat"]["ttft_p99_s"] < 5 and prio["chat"]["slo_attainment"] == 1
    assert fcfs["doc"]["deadline_miss_rate"] == prio["doc"]["deadline_miss_rate"] == 0
    assert (prio["doc"]["ttft_deadline_s"], prio["doc"]["tbt_deadline_ms"]) == (60.0, 5000.0)
    cis = rep["comparisons"]["prio"]["per_class"]["chat"]
    assert cis["goodput_req_s"]["estimate"] > 0 and cis["ttft_p99_s"]["estimate"] < -8
    summary = (out / "summary.md").read_text()
    assert "## Per SLO class" in summary and "Arm prio was also sent vLLM's request priority" \
        in summary
    assert "Per SLO class" in capsys.readouterr().out

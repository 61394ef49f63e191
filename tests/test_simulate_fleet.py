"""`vllm-ext simulate --replicas N --router POLICY` and `--target-qps`: fleets of vLLM's
own schedulers behind a router, and the fewest replicas that carry a rate. Every case is
small enough to time by hand (the tiny shape, 1 s a step plus 1/64 s a token)."""

from __future__ import annotations

import collections
import json
import random
import re
from types import SimpleNamespace

import pytest

from vllm_ext.ab.summary import SLO, summarize
from vllm_ext.ab.traces import Trace, TraceRequest
from vllm_ext.simulate.engine import Fleet, simulate_trace
from vllm_ext.simulate.planner import CountProbe, fewest_replicas
from vllm_ext.simulate.routers import ROUTERS, LeastKv, VllmDp, _ApiServer
from vllm_ext.tools.models import make_shape

from step_times import per_token

SERVE = ["--max-num-batched-tokens", "64", "--max-model-len", "512"]


@pytest.fixture(scope="module")
def shape_dir(tmp_path_factory):
    return str(make_shape(tmp_path_factory.mktemp("shape"), "tiny"))


@pytest.fixture(scope="module")
def config(shape_dir):
    from vllm_ext.simulate.arms import arm_config

    return arm_config(shape_dir, SERVE)


def _trace(reqs, seed: int = 0) -> Trace:
    return Trace(tuple(TraceRequest(*r) for r in reqs), seed=seed, description="hand-made")


def _events(run) -> list:
    return [(r.sent, r.events, r.completed) for r in run.records]


# Routers ---------------------------------------------------------------------------------

@pytest.mark.release
def test_vllm_dp_chooses_as_vllms_own_front_end(monkeypatch):
    """Random engine counts, KV usage, unfinished requests, scan starts and numbers of API
    servers: each burst of requests goes where vLLM's DPLBAsyncMPClient sends it, its own
    bookkeeping (the chosen engine's waiting count raised, the scan start moved on)
    carried from one request to the next on both sides."""
    from vllm.v1.engine.core_client import DPLBAsyncMPClient

    rng = random.Random(7)
    for case in range(300):
        engines = rng.randint(2, 6)
        api_servers = rng.randint(1, 3)
        counts = [[rng.choice((0, 0, 1, 3, 8)), rng.randint(0, 9),
                   rng.choice((0.0, 0.3, 0.5, 0.62, 0.9, 1.0))] for _ in range(engines)]
        unfinished = [rng.randint(0, 4) for _ in range(engines)]
        start = rng.randrange(engines)

        ours = _ApiServer(engines, 0, api_servers)
        ours.view, ours.unfinished, ours.start = ([list(c) for c in counts], list(unfinished),
                                                  start)
        theirs = object.__new__(DPLBAsyncMPClient)  # its routing state only: no engines
        identities = [i.to_bytes(2, "little") for i in range(engines)]
        vars(theirs).update(
            client_count=api_servers, reqs_in_flight={}, streaming_reqs=set(),
            core_engines=identities, lb_engines=[list(c) for c in counts],
            engine_inflight=collections.Counter(dict(zip(identities, unfinished))),
            eng_start_index=start)
        for k in range(4):
            request = SimpleNamespace(request_id=f"{case}-{k}", data_parallel_rank=None,
                                      pooling_params=None, resumable=False)
            chosen = identities.index(theirs.get_core_engine_for_request(request))
            assert ours.choose() == chosen, (case, k, counts, unfinished, start, api_servers)
        assert ours.view == theirs.lb_engines


def test_vllm_dp_spreads_a_burst_before_any_count_is_published(config):
    """Eight requests at once reach two engines before either has stepped: each API
    server's own count of unfinished requests spreads them, four and four."""
    run = simulate_trace(config, 200, _trace([(0.0, 50, 4)] * 8), per_token,
                         fleet=Fleet(2, "vllm-dp"))
    assert [f.requests for f in run.replicas] == [4, 4]


def test_vllm_dp_sees_counts_as_the_coordinator_publishes_them():
    """Counts reach the API servers at most every 100 ms: a request 60 ms after a change
    is routed on the counts before it, one at 100 ms on the new ones."""
    router = VllmDp(2, api_servers=1)
    router.counts(0.0, 0, 0, 0, 0.0)  # the first change is published at once
    assert router.route(0.0, 0) == 0  # all idle: the scan starts at engine 0
    router.counts(0.05, 1, 0, 5, 0.2)  # engine 1 runs 5, published at 0.1
    # At 0.06 the view is engine 0 waiting 1 (this server's own count) and engine 1 idle.
    assert router.route(0.06, 1) == 1
    assert router.servers[0].view == [[1, 0, 0.0], [1, 0, 0.0]]
    assert router.route(0.1, 2) == 0  # now engine 1 shows its 5 running
    assert router.servers[0].view[1] == [0, 5, 0.2] and router.publishes == 2
    router.finished(0.2, 0, 0)
    assert router.servers[0].unfinished == [1, 1]


def test_least_kv_takes_the_emptiest_replica_ties_in_turn():
    router = LeastKv(3)
    assert [router.route(0.0, i) for i in range(4)] == [0, 1, 2, 0]  # all empty: in turn
    router.kv(1.0, 0, 0.4)
    router.kv(1.0, 1, 0.1)
    router.kv(1.0, 2, 0.3)
    assert router.route(1.0, 4) == 1


# Fleets of vLLM's scheduler --------------------------------------------------------------

def test_round_robin_spreads_evenly_and_each_replica_is_one_engine(config):
    """Round-robin gives 3 replicas exactly 10 requests each, and each replica serves its
    share exactly as one engine serves that share alone: replicas share no state."""
    rng = random.Random(3)
    reqs = [(round(0.7 * i, 3), rng.randint(10, 300), rng.randint(1, 12)) for i in range(30)]
    run = simulate_trace(config, 200, _trace(reqs), per_token, fleet=Fleet(3, "round-robin"))
    assert [f.requests for f in run.replicas] == [10, 10, 10]
    assert sum(f.output_tokens for f in run.replicas) == sum(r[2] for r in reqs)
    for k in range(3):
        alone = simulate_trace(config, 200, _trace(reqs[k::3]), per_token)
        assert [r.events for r in alone.records] == [r.events for r in run.records[k::3]]


@pytest.mark.parametrize("router", ROUTERS)
def test_one_replica_is_the_single_engine_whatever_the_router(config, router):
    """test_simulate's case timed by hand: A (100-token prompt, 3 out) at 0, B (30, 2) at
    2.5; steps end at 2.0, 3.5625, 5.046875 and 6.078125."""
    run = simulate_trace(config, 64, _trace([(0.0, 100, 3), (2.5, 30, 2)]), per_token,
                         fleet=Fleet(1, router))
    a, b = run.records
    assert a.events == [(3.5625, 1), (5.046875, 1), (6.078125, 1)]
    assert b.events == [(5.046875, 1), (6.078125, 1)]
    assert run.sched_delays == [0.0, 1.0625] and run.steps == 4
    assert [f.requests for f in run.replicas] == [2]


def test_least_outstanding_beats_round_robin_on_a_skewed_trace(config):
    """Long requests (200-token prompts, 40 tokens out) alternate with one-token replies
    every 2 s. Round-robin sends every long one to replica 0; counting requests in
    flight sends them wherever the short ones have left, so both replicas share them,
    and the fleet finishes sooner with a shorter TTFT tail."""
    reqs = [(2.0 * i, 200, 40) if i % 2 == 0 else (2.0 * i, 10, 1) for i in range(16)]
    runs = {router: simulate_trace(config, 200, _trace(reqs), per_token, fleet=Fleet(2, router))
            for router in ("round-robin", "least-outstanding")}
    rr, lo = (summarize([runs[r].records], SLO()) for r in runs)
    assert [f.output_tokens for f in runs["round-robin"].replicas] == [320, 8]
    assert [f.output_tokens for f in runs["least-outstanding"].replicas] == [164, 164]
    assert lo["ttft_p99_s"] < 0.5 * rr["ttft_p99_s"]
    assert lo["duration_s"] < 0.85 * rr["duration_s"]


# Capacity planning ------------------------------------------------------------------------

def _fleet_of(per_replica: float, passing: set[int] | None = None):
    """A probe where one replica carries `per_replica` QPS and n replicas carry n times
    that, or, at the target rate, exactly the counts in `passing`."""
    calls = []

    def probe(n: int, qps: float) -> CountProbe:
        if n > 1 or passing is None:
            calls.append(n)
        ok = qps <= n * per_replica if passing is None or n == 1 and qps < 30 else n in passing
        return CountProbe(n, qps, ok, "" if ok else "too slow", 10, 0, 0, 0, 0, 0, 0)

    return probe, calls


@pytest.mark.parametrize("per_replica", [40.0, 12.0, 4.0, 1.5, 0.7, 0.4])
def test_the_search_ends_on_a_pass_with_one_fewer_failed(per_replica):
    import math

    needed = math.ceil(30.0 / per_replica)
    probe, calls = _fleet_of(per_replica)
    found = fewest_replicas(probe, 30.0, 64)
    assert found.needed == (needed if needed <= 64 else None)
    assert found.contradictions() == []
    if found.needed:
        assert needed == 1 or needed - 1 in calls
        assert needed == 64 or any(n > needed for n in calls)  # more replicas still pass
        assert found.one_replica_qps <= per_replica
    # Seven probes of one replica's rate, then a handful of counts.
    assert len(found.rates) == 7 and len(found.probes) <= 4


def test_the_search_says_when_more_replicas_did_worse():
    probe, calls = _fleet_of(12.0, passing={3, *range(6, 65)})
    found = fewest_replicas(probe, 30.0, 64)  # one replica carries 12: 3 pass, 2 fail
    assert found.needed == 3 and calls[-3:] == [3, 2, 4]
    assert found.contradictions() == [(3, 4)]


def _cli(*args: str) -> int:
    from vllm_ext.tools.cli import main

    return main(["simulate", "--no-progress", "--bootstrap", "50", *args])


def _base(shape_dir: str, out) -> tuple[str, ...]:
    return ("--model", shape_dir, "--step-time", "step_times:per_token", "--host-time-scale",
            "0", "--serve-args", " ".join(SERVE), "--num-gpu-blocks", "200",
            "--prompt-len", "uniform:10:300", "--output-len", "uniform:1:8", "--out", str(out))


def test_target_qps_finds_the_fewest_replicas_and_says_so(shape_dir, tmp_path, capsys):
    """The search's answer N carries the rate and N - 1 does not, each checked by
    running its probe again here against the SLOs; the table names N."""
    from vllm_ext.simulate.cli import add_parser, build
    from vllm_ext.simulate.run import fleet_probe_trace, run_simulation

    args = (*_base(shape_dir, tmp_path / "report"), "--arm", "stock=", "--num-requests", "4",
            "--target-qps", "0.5", "--ttft-slo-s", "15", "--tbt-slo-ms", "2500",
            "--requests-per-replica", "8", "--router", "least-outstanding")
    import argparse

    parser = argparse.ArgumentParser(prog="vllm-ext")
    add_parser(parser.add_subparsers(dest="command"))
    cfg, sim = build(parser.parse_args(["simulate", "--no-progress", *args]))
    results, _ = run_simulation(cfg, sim, say=lambda line: None)
    plan = results[0].summary["replicas_for_target"]
    needed = plan["needed"]
    assert needed is not None and needed > 1
    config = sim.configs["stock"]
    for n, carries in ((needed, True), (needed - 1, False)):
        run = simulate_trace(config, 200, fleet_probe_trace(cfg, sim.plan, n), per_token,
                             fleet=Fleet(n, "least-outstanding"))
        s = summarize([run.records], cfg.slo)
        ok = (s["failed"] == 0 and s["ttft_p99_s"] <= 15 and s["tbt_p99_ms"] <= 2500
              and sorted(run.sched_delays)[len(run.sched_delays) // 2] <= 2.0)
        assert ok == carries, (n, s["ttft_p99_s"], s["tbt_p99_ms"])
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "## Replicas for 0.5 QPS" in summary
    assert re.search(rf"\| stock \| {needed} \| {0.5 / needed:.2f} \|", summary), summary


def test_replicas_in_the_report(shape_dir, tmp_path, capsys):
    """Two vllm-dp replicas: the headline's figures (those `bench ab` reports for a real
    2-rank deployment) pool both; each replica's requests and tokens/s add up to them."""
    out = tmp_path / "report"
    assert _cli(*_base(shape_dir, out), "--arm", "stock=", "--num-requests", "12", "--qps",
                "0.3", "--replicas", "2", "--router", "vllm-dp") == 0
    arm = json.loads((out / "report.json").read_text())["arms"][0]["summary"]
    rows = arm["replicas"]
    assert arm["router"] == "vllm-dp" and len(rows) == 2
    assert sum(r["requests"] for r in rows) == arm["requests"] == 12
    assert sum(r["out_tok_per_s"] for r in rows) == pytest.approx(arm["out_tok_per_s"])
    assert all(arm[k] > 0 for k in ("ttft_p50_s", "tbt_p50_ms", "out_tok_per_s"))
    summary = (out / "summary.md").read_text()
    assert "## Replicas" in summary and "vllm-dp: vLLM's internal data-parallel" in summary
    assert "| stock | 1 |" in capsys.readouterr().out


def test_no_fleet_flags_no_fleet_figures(shape_dir, tmp_path):
    """--replicas 1 with a router is the plain run: the same report, no fleet sections."""
    reps = []
    for name, extra in (("plain", ()), ("one", ("--replicas", "1", "--router", "least-kv"))):
        out = tmp_path / name
        assert _cli(*_base(shape_dir, out), "--arm", "stock=", "--num-requests", "6",
                    "--qps", "0.3", *extra) == 0
        reps.append(json.loads((out / "report.json").read_text())["arms"][0]["summary"])
        assert "Replicas" not in (out / "summary.md").read_text()
    drop = ("sim_wall_s", "sim_steps_per_s")  # how long simulating took
    assert {k: v for k, v in reps[0].items() if k not in drop} == \
        {k: v for k, v in reps[1].items() if k not in drop}


@pytest.mark.parametrize("args, message", [
    (("--replicas", "0"), "--replicas must be >= 1, got 0"),
    (("--router", "random"), "--router 'random': choose from vllm-dp, round-robin, "
                             "least-outstanding, least-kv"),
    (("--replicas", "2", "--router", "least-kv", "--api-server-count", "2"),
     "--api-server-count sets vLLM's own front end \\(--router vllm-dp\\)"),
    (("--replicas", "2", "--api-server-count", "0"), "--api-server-count must be >= 1"),
    (("--target-qps", "0"), "--target-qps must be > 0"),
    (("--target-qps", "5", "--capacity"), "--target-qps searches replica counts at one rate; "
                                          "--capacity searches rates"),
    (("--target-qps", "5", "--capacity-qps", "1:4"), "--capacity-qps searches rates"),
    (("--target-qps", "5", "--max-replicas", "0"), "--max-replicas must be >= 1"),
    (("--serve-args", "--max-model-len 512 --data-parallel-size 2"),
     "--data-parallel-size 2 serves 2 engines; leave it out of the arm and give --replicas 2 "
     "--router vllm-dp"),
    (("--max-replicas", "8",), "--max-replicas shapes a --target-qps search"),
    (("--requests-per-replica", "8",), "--requests-per-replica shapes a --target-qps search"),
    (("--target-qps", "5", "--requests-per-replica", "0"), "--requests-per-replica must be >= 1"),
])
def test_bad_fleet_options_are_refused_before_anything_runs(shape_dir, tmp_path, capsys, args,
                                                            message):
    out = tmp_path / "report"
    assert _cli(*_base(shape_dir, out), "--arm", "stock=", "--num-requests", "4", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("vllm-ext simulate: error: ") and re.search(message, err), err
    assert not out.exists()

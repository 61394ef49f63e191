"""Per-request SLOs in `bench ab`: what a request sends (vllm_xargs, headers, priority),
checked through the real OpenAI client against vLLM's own request parser, and the
figures per SLO class on hand-made timelines, each request judged by its own deadlines."""

from __future__ import annotations

import json

import pytest

from vllm_ext.ab.client import RequestRecord, SLOSending
from vllm_ext.ab.config import ABConfig, Arm, ArmResult
from vllm_ext.ab.traces import Trace, TraceRequest

CHAT = TraceRequest(0.0, 10, 3, "chat", 1000.0, 500.0)
OWN = TraceRequest(0.0, 10, 3, None, 1500.5, None)  # its own TTFT, no class
PLAIN = TraceRequest(0.0, 10, 3)


def test_values_go_in_vllm_xargs_and_the_class_only_when_asked():
    assert SLOSending().request(CHAT) == ({"vllm_xargs": {"ttft_slo_ms": 1000,
                                                          "tbt_slo_ms": 500}}, {})
    assert SLOSending(send_class=True).request(CHAT) == (
        {"vllm_xargs": {"ttft_slo_ms": 1000, "tbt_slo_ms": 500, "slo_class": "chat"}}, {})
    assert SLOSending().request(OWN) == ({"vllm_xargs": {"ttft_slo_ms": 1500.5}}, {})
    assert SLOSending(send_class=True).request(PLAIN) == ({}, {})  # states nothing: sends nothing


def test_headers_carry_the_same_values():
    assert SLOSending("headers", send_class=True).request(CHAT) == (
        {}, {"x-slo-ttft-ms": "1000", "x-slo-tpot-ms": "500", "x-slo-class": "chat"})
    assert SLOSending("headers").request(OWN) == ({}, {"x-slo-ttft-ms": "1500.5"})


def test_priority_by_class_for_a_priority_arm():
    send = SLOSending(priorities={"chat": 0, "custom": 1, "default": 2})
    assert send.request(CHAT)[0] == {"vllm_xargs": {"ttft_slo_ms": 1000, "tbt_slo_ms": 500},
                                     "priority": 0}
    assert send.request(OWN)[0]["priority"] == 1 and send.request(PLAIN)[0] == {"priority": 2}
    # a class given none (a capacity probe of a CSV trace's arm) is sent none: vLLM's 0
    assert SLOSending(priorities={"chat": 0}).request(PLAIN) == ({}, {})


def test_only_priority_arms_are_sent_priorities():
    trace = Trace((CHAT, PLAIN), 0, "hand-made")
    cfg = ABConfig("m", [Arm("stock", ("--scheduler", "vllm")),
                         Arm("prio", ("--scheduling-policy", "priority")),
                         Arm("prio2", ("--scheduling-policy=fcfs", "--scheduling-policy=priority")),
                         Arm("ep", endpoint="http://h:1")], [trace], None, 64,
                   slo_priority={"chat": 0, "default": 1})
    cfg.check()
    assert [a.name for a in cfg.arms if cfg.gets_priority(a)] == ["prio", "prio2"]
    assert cfg.sending(cfg.arms[0]).priorities is None
    assert cfg.sending(cfg.arms[1]).priorities == {"chat": 0, "default": 1}
    cfg.slo_priority_arms = ("ep",)  # an endpoint's policy cannot be seen: named instead
    assert [a.name for a in cfg.arms if cfg.gets_priority(a)] == ["ep"]
    assert cfg.gets_priority(Arm("ep@512"))  # a swept arm as its base


def _sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + \
        b"data: [DONE]\n\n"


@pytest.mark.parametrize("sending", [SLOSending(), SLOSending("headers", send_class=True),
                                     SLOSending(priorities={"chat": 3})], ids=str)
def test_what_the_client_sends_is_what_vllm_reads(monkeypatch, sending):
    """The real OpenAI client, its HTTP answered here: the body parses as vLLM's own
    CompletionRequest, whose SamplingParams.extra_args hold the SLO fields."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("openai")
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from vllm_ext.ab.client import replay

    sent = []

    def answer(request):
        sent.append((json.loads(request.content), request.headers))
        lp = {"tokens": ["a"], "token_logprobs": [0.0], "top_logprobs": None, "text_offset": [0]}
        body = _sse(*({"id": "c", "object": "text_completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "text": "a", "logprobs": lp,
                                    "finish_reason": "length" if i == 2 else None}]}
                      for i in range(3)),
                    {"id": "c", "object": "text_completion", "created": 0, "model": "m",
                     "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 3,
                                              "total_tokens": 13}})
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    class Answered(httpx.AsyncClient):
        def __init__(self, **kwargs):
            kwargs.pop("limits", None)
            super().__init__(transport=httpx.MockTransport(answer), **kwargs)

    monkeypatch.setattr(httpx, "AsyncClient", Answered)
    [record] = replay("http://server", "m", Trace((CHAT,), 0, "one"), 64, sending=sending)
    assert record.completed and record.error is None and len(record.timeline().token_times) == 3
    assert (record.slo_class, record.ttft_slo_ms, record.tbt_slo_ms) == ("chat", 1000.0, 500.0)
    [(body, headers)] = sent
    extra = CompletionRequest(**body).to_sampling_params(3).extra_args or {}
    slo_headers = {k: v for k, v in headers.items() if k.startswith("x-slo-")}
    if sending.via == "headers":
        assert "vllm_xargs" not in body and not extra
        assert slo_headers == {"x-slo-ttft-ms": "1000", "x-slo-tpot-ms": "500",
                               "x-slo-class": "chat"}
    else:
        assert extra == {"ttft_slo_ms": 1000, "tbt_slo_ms": 500} and not slo_headers
    assert body.get("priority") == (3 if sending.priorities else None)
    assert CompletionRequest(**body).priority == (3 if sending.priorities else 0)


# Per-class figures -------------------------------------------------------------------------

def rec(i, sent, events, trace_req):
    n = sum(k for _, k in events)
    return RequestRecord(i, sent, sent, trace_req.prompt_tokens, n, list(events), True, "length",
                         n, slo_class=trace_req.slo_class, ttft_slo_ms=trace_req.ttft_slo_ms,
                         tbt_slo_ms=trace_req.tbt_slo_ms)


DOC = TraceRequest(0.0, 10, 3, "doc", 4000.0, 2000.0)
TRACE = Trace((CHAT, CHAT, DOC, PLAIN), 0, "hand-made")


def _run(r1_events):
    """Times exact in binary. Deadlines (s): chat 1 / 0.5, doc 4 / 2, the plain request
    the run's SLO(0.75 s, 500 ms)."""
    return [
        rec(0, 0.0, [(0.5, 1), (1.0, 1), (1.25, 1)], CHAT),  # all in time
        rec(1, 1.0, r1_events, CHAT),
        # TTFT 3 (1 s banked), a 3 s gap (within 2 + 1), then 0.5: all in time
        rec(2, 0.5, [(3.5, 1), (6.5, 1), (7.0, 1)], DOC),
        # TTFT 0.5 (0.25 banked), then a 1.5 s gap: floor((1.5 - 0.25) / 0.5) = 2 misses
        rec(3, 2.0, [(2.5, 1), (4.0, 1)], PLAIN),
    ]


LATE = [(2.5, 1), (3.0, 1)]  # TTFT 1.5 against 1: floor(0.5 / 0.5) + 1 = 2 misses; then in time
ON_TIME = [(1.5, 1), (2.0, 1)]


def test_each_class_is_judged_by_its_own_deadlines():
    from vllm_ext.ab.summary import SLO, summarize

    s = summarize([_run(LATE)], SLO(ttft_s=0.75, tbt_ms=500))
    # One run from 0 to the last token at 7.0 s.
    assert s["duration_s"] == 7.0
    # Every request by its own deadlines: misses 0 + 2 + 0 + 2 of 3 + 3 + 3 + 3.
    assert s["deadline_miss_rate"] == 4 / 12
    # Goodput (TTFT and TPOT within the request's SLOs): requests 0 and 2 (the document's
    # TTFT of 3 s is within its own 4 s, not the run's 0.75 s).
    assert s["goodput_req_s"] == 2 / 7
    chat, doc, default = (s["per_class"][c] for c in ("chat", "doc", "default"))
    assert list(s["per_class"]) == ["chat", "doc", "default"]
    assert (chat["requests"], chat["ttft_deadline_s"], chat["tbt_deadline_ms"]) == (2, 1.0, 500.0)
    assert chat["ttft_p50_s"] == 1.0 and chat["tbt_p50_ms"] == 500.0
    assert chat["deadline_miss_rate"] == 2 / 6 and chat["slo_attainment"] == 0.5
    assert chat["goodput_req_s"] == pytest.approx(1 / 7) and chat["out_tok_per_s"] == pytest.approx(5 / 7)
    assert doc["deadline_miss_rate"] == 0 and doc["slo_attainment"] == 1.0
    assert doc["goodput_req_s"] == pytest.approx(1 / 7) and doc["ttft_deadline_s"] == 4.0
    assert default["deadline_miss_rate"] == 2 / 3 and default["goodput_req_s"] == 0
    assert (default["ttft_deadline_s"], default["tbt_deadline_ms"]) == (0.75, 500.0)


def test_without_slos_the_summary_has_no_classes():
    from vllm_ext.ab.summary import SLO, summarize

    plain = [rec(0, 0.0, [(0.5, 1), (1.0, 1)], PLAIN)]
    assert "per_class" not in summarize([plain], SLO())


def _results(cfg):
    from vllm_ext.ab.summary import summarize

    out = []
    for name, r1 in (("base", LATE), ("better", ON_TIME)):
        res = ArmResult(Arm(name), runs=[_run(r1)])
        res.summary = summarize(res.runs, cfg.slo)
        out.append(res)
    return out


def test_classes_are_compared_and_reported(tmp_path):
    from vllm_ext.ab import report
    from vllm_ext.ab.runner import compare_arms
    from vllm_ext.ab.summary import SLO

    cfg = ABConfig("m", [Arm("base"), Arm("better")], [TRACE], tmp_path, 64,
                   slo=SLO(ttft_s=0.75, tbt_ms=500), prompts=None, bootstrap_iterations=50)
    results = _results(cfg)
    comparisons = compare_arms(results, cfg)
    chat = comparisons["better"]["per_class"]["chat"]
    # Only request 1 changed: its two misses are gone, and it is now good.
    assert chat["deadline_miss_rate"]["estimate"] == pytest.approx(-2 / 6)
    assert chat["goodput_req_s"]["estimate"] == pytest.approx(1 / 7)
    assert comparisons["better"]["per_class"]["doc"]["deadline_miss_rate"] == {
        "estimate": 0.0, "low": 0.0, "high": 0.0, "level": 0.95}
    report.write(cfg, results, comparisons)
    md = (tmp_path / "summary.md").read_text()
    assert "## Per SLO class" in md and "judged by their own" in md
    assert "| chat | base | 1 s / 500 ms | 2 | 1.00 | 1.49 | 500 |" in md  # TTFTs 0.5 and 1.5
    *_, row = (line for line in md.splitlines() if line.startswith("| chat | better |"))
    assert row.split(" | ")[4].startswith("-0.333 [")  # the differences: Δ deadline miss rate
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["arms"][1]["summary"]["per_class"]["chat"]["slo_attainment"] == 1.0
    assert "Per SLO class" in (tmp_path / "report.html").read_text()


def test_a_report_without_slos_has_no_class_section(tmp_path):
    from vllm_ext.ab import report
    from vllm_ext.ab.summary import SLO, summarize

    cfg = ABConfig("m", [Arm("a")], [Trace((PLAIN,), 0, "plain")], tmp_path, 64, prompts=None)
    res = ArmResult(Arm("a"), runs=[[rec(0, 0.0, [(0.5, 1), (1.0, 1)], PLAIN)]])
    res.summary = summarize(res.runs, SLO())
    report.write(cfg, [res], {})
    md = (tmp_path / "summary.md").read_text()
    assert "Per SLO class" not in md and "judged by their own" not in md

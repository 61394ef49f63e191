"""Traces: seeded and identical across arms, the arrival processes and length
distributions they claim, and clear errors for bad specs and files."""

from __future__ import annotations

import re
import statistics

import pytest

from vllm_ext.ab.traces import (
    LengthDist,
    TraceError,
    load_csv,
    parse_slo_mix,
    synthesize,
)

FIXED = LengthDist.parse("64")


def _gaps(trace):
    t = [r.arrival for r in trace.requests]
    return [b - a for a, b in zip(t, t[1:])]


def test_same_seed_same_trace_and_prompts():
    a = synthesize(50, "gamma", LengthDist.parse("lognormal:300"), LengthDist.parse("uniform:8:64"),
                   seed=3, qps=2.0, burstiness=2.0)
    b = synthesize(50, "gamma", LengthDist.parse("lognormal:300"), LengthDist.parse("uniform:8:64"),
                   seed=3, qps=2.0, burstiness=2.0)
    assert a == b
    assert [a.prompt_ids(i, 4096) for i in range(50)] == [b.prompt_ids(i, 4096) for i in range(50)]
    c = synthesize(50, "gamma", LengthDist.parse("lognormal:300"), LengthDist.parse("uniform:8:64"),
                   seed=4, qps=2.0, burstiness=2.0)
    assert c.requests != a.requests and c.prompt_ids(0, 4096) != a.prompt_ids(0, 4096)


def test_prompt_ids_have_the_requested_length_and_avoid_special_ids():
    t = synthesize(20, "poisson", LengthDist.parse("uniform:1:500"), FIXED, seed=0, qps=1.0)
    for i, r in enumerate(t.requests):
        ids = t.prompt_ids(i, 2048)
        assert len(ids) == r.prompt_tokens and min(ids) >= 16 and max(ids) < 2048
    # distinct requests do not share a prefix the server could cache
    assert t.prompt_ids(0, 2048)[:4] != t.prompt_ids(1, 2048)[:4]


def test_changing_lengths_leaves_arrivals_alone():
    a = synthesize(30, "poisson", FIXED, FIXED, seed=1, qps=3.0)
    b = synthesize(30, "poisson", LengthDist.parse("lognormal:900"), FIXED, seed=1, qps=3.0)
    assert [r.arrival for r in a.requests] == [r.arrival for r in b.requests]


def test_poisson_rate_and_gamma_burstiness():
    poisson = _gaps(synthesize(4000, "poisson", FIXED, FIXED, seed=0, qps=5.0))
    assert statistics.mean(poisson) == pytest.approx(0.2, rel=0.05)
    assert statistics.stdev(poisson) / statistics.mean(poisson) == pytest.approx(1.0, rel=0.07)
    bursty = _gaps(synthesize(4000, "gamma", FIXED, FIXED, seed=0, qps=5.0, burstiness=3.0))
    assert statistics.mean(bursty) == pytest.approx(0.2, rel=0.1)
    assert statistics.stdev(bursty) / statistics.mean(bursty) == pytest.approx(3.0, rel=0.15)


def test_closed_loop_sends_everything_at_once_through_the_concurrency_limit():
    t = synthesize(10, "concurrency", FIXED, FIXED, seed=0, concurrency=4)
    assert t.concurrency == 4 and all(r.arrival == 0 for r in t.requests)


def test_length_distributions():
    import random

    rng = random.Random(0)
    assert {LengthDist.parse("fixed:7").sample(rng, 1000) for _ in range(20)} == {7}
    u = [LengthDist.parse("uniform:10:20").sample(rng, 1000) for _ in range(500)]
    assert min(u) == 10 and max(u) == 20
    ln = [LengthDist.parse("lognormal:200:0.5").sample(rng, 10**6) for _ in range(4000)]
    assert statistics.median(ln) == pytest.approx(200, rel=0.05)
    assert max(LengthDist.parse("lognormal:200:2").sample(rng, 300) for _ in range(500)) == 300


@pytest.mark.parametrize("spec, says", [
    ("abc", "numbers expected"), ("gauss:3", "use N | fixed:N"), ("uniform:9:3", "LO must not"),
    ("fixed:0", ">= 1"), ("fixed:2.5", "whole numbers"), ("lognormal:100:0", "SIGMA > 0"),
    ("uniform:1", "use N | fixed:N"),
])
def test_bad_length_specs_say_what_is_allowed(spec, says):
    with pytest.raises(TraceError, match=says):
        LengthDist.parse(spec, "--prompt-len")


@pytest.mark.parametrize("kwargs, says", [
    ({"arrival": "uniform", "qps": 1.0}, "choose from poisson, gamma, concurrency"),
    ({"arrival": "poisson", "qps": 0.0}, "QPS > 0"),
    ({"arrival": "concurrency"}, "concurrency >= 1"),
    ({"arrival": "gamma", "qps": 1.0, "burstiness": 0.0}, "burstiness must be > 0"),
])
def test_bad_arrivals(kwargs, says):
    with pytest.raises(TraceError, match=says):
        synthesize(5, prompt=FIXED, output=FIXED, seed=0, **kwargs)


def test_csv_trace(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("arrival,prompt_tokens,output_tokens\n0,100,10\n0.5,200,20\n\n2.25,5,1\n")
    t = load_csv(f, seed=2)
    assert [(r.arrival, r.prompt_tokens, r.output_tokens) for r in t.requests] == [
        (0.0, 100, 10), (0.5, 200, 20), (2.25, 5, 1)]
    assert t.seed == 2 and t.concurrency is None


@pytest.mark.parametrize("text, says", [
    ("time,prompt,output\n0,1,1\n", "line 1 must be the header arrival,prompt_tokens,output_tokens"),
    ("arrival,prompt_tokens,output_tokens\n0,1\n", "line 2: 3 values expected, got 2"),
    ("arrival,prompt_tokens,output_tokens\n0,1,1\n1,x,3\n", "line 3: '1,x,3' is not"),
    ("arrival,prompt_tokens,output_tokens\n0,0,1\n", "line 2: arrival must be >= 0 and token"),
    ("arrival,prompt_tokens,output_tokens\n2,1,1\n1,1,1\n", "line 3: arrival 1.0 is before"),
    ("arrival,prompt_tokens,output_tokens\n", "no requests after the header"),
    ("", "got nothing"),
])
def test_malformed_csv_names_the_line_and_the_problem(tmp_path, text, says):
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(TraceError, match=says.replace("(", r"\(")):
        load_csv(f)


def test_missing_csv(tmp_path):
    with pytest.raises(TraceError, match="No such file"):
        load_csv(tmp_path / "nope.csv")


# SLO classes -------------------------------------------------------------------------------

ISSUE_MIX = "interactive=0.8:ttft=1s:tbt=200ms,batch=0.2:ttft=30s:tbt=2s"


def test_slo_mix_parses_the_issues_form_and_per_class_lengths():
    from vllm_ext.ab.traces import SLOClass

    assert parse_slo_mix(ISSUE_MIX) == (SLOClass("interactive", 0.8, 1000.0, 200.0),
                                        SLOClass("batch", 0.2, 30000.0, 2000.0))
    docs = parse_slo_mix("chat=0.8:ttft=1s:tbt=200ms:prompt=lognormal/300/0.5:output=uniform/8/64,"
                         "doc=0.2:ttft=30s:prompt=4000:output=fixed/16")
    assert docs[0].prompt == LengthDist("lognormal", 300, 0.5)
    assert docs[0].output == LengthDist("uniform", 8, 64)
    assert (docs[1].prompt, docs[1].output) == (LengthDist("fixed", 4000), LengthDist("fixed", 16))
    assert docs[1].tbt_slo_ms is None  # not stated: the server's default applies
    # Shares within 0.01 of 1 are scaled to exactly 1.
    assert sum(c.share for c in parse_slo_mix("a=0.33,b=0.33,c=0.33")) == pytest.approx(1.0)


@pytest.mark.parametrize("spec, says", [
    ("a=0.5,b=0.4", "shares sum to 0.9, not 1"),
    ("a", "expected NAME=SHARE"),
    ("a=x", "share 'x' must be a number > 0"),
    ("a=1,a=0", "class 'a' given twice"),
    ("a=1:ttft=5", "a ttft: expected a duration like 1.5s or 200ms, got '5'"),
    ("a=1:tbt=0ms", "must be > 0"),
    ("a=1:ttft=1s:ttft=2s", "ttft given twice"),
    ("a=1:deadline=1s", "expected ttft=, tbt=, prompt= or output="),
    # ':' separates a class's options: a length in a mix is written with '/'
    ("a=1:prompt=lognormal:300", "a prompt 'lognormal': numbers expected; use N | fixed/N"),
    ("a=1:prompt=gauss/3", "a prompt 'gauss/3': use N | fixed/N"),
    ("default=1", "'default' is reserved"),
    ("9lives=1", "must start with a letter"),
])
def test_bad_slo_mix_says_what_is_allowed(spec, says):
    with pytest.raises(TraceError, match=re.escape(says)):
        parse_slo_mix(spec)


def test_mixed_trace_is_seeded_and_leaves_arrivals_alone():
    mix = parse_slo_mix("chat=0.8:ttft=1s:tbt=200ms:prompt=uniform/10/20,"
                        "doc=0.2:ttft=30s:tbt=2s:prompt=uniform/3000/4000:output=7")
    plain = synthesize(2000, "poisson", FIXED, FIXED, seed=5, qps=4.0)
    a = synthesize(2000, "poisson", FIXED, FIXED, seed=5, qps=4.0, classes=mix)
    assert a == synthesize(2000, "poisson", FIXED, FIXED, seed=5, qps=4.0, classes=mix)
    assert [r.arrival for r in a.requests] == [r.arrival for r in plain.requests]
    chat = [r for r in a.requests if r.slo_class == "chat"]
    doc = [r for r in a.requests if r.slo_class == "doc"]
    assert len(chat) + len(doc) == 2000 and len(doc) / 2000 == pytest.approx(0.2, abs=0.03)
    assert all(10 <= r.prompt_tokens <= 20 and r.output_tokens == 64 for r in chat)
    assert all(3000 <= r.prompt_tokens <= 4000 and r.output_tokens == 7 for r in doc)
    assert {(r.ttft_slo_ms, r.tbt_slo_ms) for r in chat} == {(1000.0, 200.0)}
    assert {(r.ttft_slo_ms, r.tbt_slo_ms) for r in doc} == {(30000.0, 2000.0)}
    assert "SLO classes chat 80% (TTFT 1 s, TBT 200 ms, prompt uniform 10..20)" in a.description
    # the class drawn for request i does not depend on the arrival process
    closed = synthesize(2000, "concurrency", FIXED, FIXED, seed=5, concurrency=3, classes=mix)
    assert [r.slo_class for r in closed.requests] == [r.slo_class for r in a.requests]


def test_a_trace_without_slos_writes_the_same_json_as_before():
    import json

    plain = synthesize(3, "poisson", FIXED, FIXED, seed=0, qps=1.0)
    assert all(len(row) == 3 for row in plain.to_dict()["requests"])
    assert not plain.states_slos
    mixed = synthesize(3, "poisson", FIXED, FIXED, seed=0, qps=1.0,
                       classes=parse_slo_mix(ISSUE_MIX))
    assert mixed.states_slos
    rows = json.loads(json.dumps(mixed.to_dict()))["requests"]
    assert all(len(row) == 6 and row[3] in ("interactive", "batch") for row in rows)


def test_csv_trace_with_slo_columns(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("arrival,prompt_tokens,output_tokens,tbt_slo_ms,slo_class\n"
                 "0,100,10,200,chat\n0.5,200,20,,\n1,5,1,1500.5,\n2,5,1,,batch\n")
    t = load_csv(f)
    assert [(r.slo_class, r.ttft_slo_ms, r.tbt_slo_ms) for r in t.requests] == [
        ("chat", None, 200.0), (None, None, None), (None, None, 1500.5), ("batch", None, None)]
    assert t.states_slos


@pytest.mark.parametrize("text, says", [
    ("arrival,prompt_tokens,output_tokens,deadline\n0,1,1,5\n", "optionally followed by any of"),
    ("arrival,prompt_tokens,output_tokens,slo_class,slo_class\n0,1,1,a,b\n", "optionally"),
    ("arrival,prompt_tokens,output_tokens,ttft_slo_ms\n0,1,1\n", "line 2: 4 values expected, got 3"),
    ("arrival,prompt_tokens,output_tokens,ttft_slo_ms\n0,1,1,5\n1,1,1,fast\n",
     "line 3, column ttft_slo_ms: expected a number of milliseconds, got 'fast'"),
    ("arrival,prompt_tokens,output_tokens,tbt_slo_ms\n0,1,1,-3\n", "line 2, column tbt_slo_ms: must be > 0"),
    ("arrival,prompt_tokens,output_tokens,slo_class\n0,1,1,two words\n",
     "line 2, column slo_class: class name 'two words' must start with a letter"),
    ("arrival,prompt_tokens,output_tokens,slo_class\n0,1,1,custom\n", "'custom' is reserved"),
])
def test_bad_csv_slo_values_name_the_line_and_the_column(tmp_path, text, says):
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(TraceError, match=re.escape(says)):
        load_csv(f)

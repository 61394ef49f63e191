"""Per-request SLOs before the engine: the parsing every process shares
(vllm_ext.schedulers.slo), the mnemosyne flags that define classes, and the API server's
middleware (vllm_ext.frontend.slo_middleware) on a small Starlette app standing in for
vLLM's: bad values refused with a 400 naming the field, headers merged into vllm_xargs,
streams left streaming. No engine; `tests/test_serve_slo.py` runs it on `vllm serve`."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from vllm_ext.config import CONFIG_KEY, ExtConfig
from vllm_ext.frontend.components import SelectionError
from vllm_ext.frontend.selection import api_middleware, resolve
from vllm_ext.frontend.slo_middleware import PATHS, SLOIntake, merge
from vllm_ext.schedulers.slo import (CUSTOM_CLASS, DEFAULT_CLASS, SLO, SLOError, duration,
                                     milliseconds, parse_class, parse_classes, request_slo)

CLASSES = {"interactive": SLO(0.5, 0.1), "batch": SLO(30.0, None)}

# --- schedulers/slo.py: the parsing -----------------------------------------------------


@pytest.mark.parametrize("value, seconds", [(200, 0.2), (1.5, 0.0015), ("250", 0.25),
                                            (" 80.5 ", 0.0805), ("1e3", 1.0)])
def test_milliseconds_takes_numbers_and_numeric_strings(value, seconds):
    assert milliseconds("ttft_slo_ms", value) == pytest.approx(seconds)


@pytest.mark.parametrize("value, why", [
    ("abc", "expected a number of milliseconds, got 'abc'"),
    (-5, "must be > 0 and at most 86400000 ms (a day), got -5"),
    (0, "must be > 0"), ("nan", "must be > 0"), (float("inf"), "must be > 0"),
    (86_400_001, "at most 86400000 ms"), (True, "expected a number of milliseconds, got True"),
    ([200], "expected a number of milliseconds, got [200]"), (None, "got None"),
])
def test_milliseconds_refuses_naming_the_field(value, why):
    with pytest.raises(SLOError) as e:
        milliseconds("tbt_slo_ms", value)
    assert e.value.field == "tbt_slo_ms"
    assert str(e.value).startswith("tbt_slo_ms: ") and why in str(e.value)


@pytest.mark.parametrize("text, seconds", [("1.5s", 1.5), ("200ms", 0.2), (" 30 s", 30.0),
                                           (".5s", 0.5)])
def test_durations(text, seconds):
    assert duration("x", text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["30", "1.5 min", "ms", "-2s", "0ms", "2h"])
def test_a_duration_needs_a_positive_number_and_a_unit(text):
    with pytest.raises(SLOError, match=r"^x: "):
        duration("x", text)


def test_a_class_spec_names_its_deadlines():
    assert parse_class("batch=ttft:30s,tbt:2000ms") == ("batch", SLO(30.0, 2.0))
    assert parse_class("chat = tbt:150ms") == ("chat", SLO(None, 0.15))
    assert parse_classes(["a=ttft:1s", "b=tbt:20ms"]) == {"a": SLO(1.0), "b": SLO(None, 0.02)}
    assert parse_classes(None) == {}


@pytest.mark.parametrize("specs, message", [
    (["batch"], "--mnemosyne-slo-class: 'batch' is not NAME=ttft:DURATION"),
    (["9lives=ttft:1s"], "a name starts with a letter"),
    (["default=ttft:1s"], "'default' is reserved"),
    (["custom=ttft:1s"], "'custom' is reserved"),
    (["batch=ttft:30s,latency:2s"],
     "'latency:2s' in 'batch=ttft:30s,latency:2s': expected ttft:DURATION or tbt:DURATION"),
    (["batch=ttft:30s,ttft:2s"], "ttft given twice"),
    (["batch=ttft:soon"],
     "--mnemosyne-slo-class batch ttft: expected a duration like 1.5s or 200ms, got 'soon'"),
    (["a=ttft:1s", "a=tbt:1s"], "class 'a' defined twice"),
])
def test_a_bad_class_spec_names_the_flag_and_the_form(specs, message):
    with pytest.raises(SLOError, match=r"^--mnemosyne-slo-class") as e:
        parse_classes(specs)
    assert message in str(e.value)


def test_a_request_slo_is_its_own_values_over_its_class():
    assert request_slo(None, CLASSES) == (DEFAULT_CLASS, SLO())
    assert request_slo({"ttft_slo_ms": 300}, CLASSES) == (CUSTOM_CLASS, SLO(0.3))
    assert request_slo({"slo_class": "interactive"}, CLASSES) == ("interactive", SLO(0.5, 0.1))
    assert request_slo({"slo_class": "batch", "tbt_slo_ms": "400"}, CLASSES) == \
        ("batch", SLO(30.0, 0.4))
    assert request_slo({"other": "kept"}, CLASSES) == (DEFAULT_CLASS, SLO())


@pytest.mark.parametrize("xargs, classes, message", [
    ({"slo_class": "gold"}, CLASSES,
     "slo_class: unknown class 'gold'; allowed: batch, interactive"),
    ({"slo_class": "gold"}, {}, "allowed: none are defined (--mnemosyne-slo-class)"),
    ({"slo_class": 3}, CLASSES, "slo_class: unknown class 3"),
    ({"ttft_slo_ms": "soon"}, CLASSES, "ttft_slo_ms: expected a number of milliseconds"),
])
def test_a_bad_request_slo_names_the_field(xargs, classes, message):
    with pytest.raises(SLOError) as e:
        request_slo(xargs, classes)
    assert message in str(e.value)


# --- the flags: record and Python selection -------------------------------------------

@pytest.fixture
def stats_dir(monkeypatch, tmp_path):
    # Resolving a selection prepares this process as a front end (stats directory).
    monkeypatch.setenv("VLLMEXT_STATS_DIR", str(tmp_path))


def _record(options: dict) -> dict:
    return resolve({"scheduler": "mnemosyne"}, options, {}, "cpu")["additional_config"][CONFIG_KEY]


def test_classes_and_defer_steps_are_recorded_and_read_back(stats_dir):
    record = _record({"mnemosyne_slo_class": ["interactive=ttft:500ms,tbt:100ms",
                                              "batch=ttft:30s"],
                      "mnemosyne_max_defer_steps": 3})
    assert record["scheduler"]["slo_classes"] == {
        "interactive": {"ttft_ms": 500.0, "tbt_ms": 100.0}, "batch": {"ttft_ms": 30000.0}}
    assert record["scheduler"]["max_defer_steps"] == 3
    deadlines = ExtConfig.from_record(record).scheduler.settings.deadlines
    assert deadlines.classes == (("interactive", SLO(0.5, 0.1)), ("batch", SLO(30.0)))
    assert deadlines.max_defer_steps == 3


def test_one_class_from_python_needs_no_list_and_defaults_are_not_recorded(stats_dir):
    record = _record({"mnemosyne_slo_class": "batch=ttft:30s"})["scheduler"]
    assert record["slo_classes"] == {"batch": {"ttft_ms": 30000.0}}
    assert "max_defer_steps" not in record
    plain = _record({})["scheduler"]
    assert "slo_classes" not in plain and "max_defer_steps" not in plain
    assert ExtConfig.from_record({"scheduler": plain}).scheduler.settings.deadlines \
        .max_defer_steps == 8


@pytest.mark.parametrize("options, message", [
    ({"mnemosyne_slo_class": ["batch"]}, "--mnemosyne-slo-class: 'batch' is not NAME=ttft:"),
    ({"mnemosyne_max_defer_steps": -1}, "--mnemosyne-max-defer-steps must be >= 0, got -1"),
])
def test_bad_class_or_defer_steps_is_a_selection_error(stats_dir, options, message):
    with pytest.raises(SelectionError, match=message):
        _record(options)


def test_only_mnemosyne_brings_the_middleware():
    assert api_middleware({"scheduler": "mnemosyne"}, {}) == [
        "vllm_ext.frontend.slo_middleware.SLOIntake"]
    assert api_middleware({"scheduler": "sarathi", "attn": None}, {"kvp": 2}) == []


# --- the middleware ---------------------------------------------------------------------

def _app(classes: dict[str, SLO] | None = CLASSES, vllm: bool = True):
    """A Starlette app shaped like vLLM's: its engine record on app.state.vllm_config, the
    endpoints echoing the body and headers they received."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def echo(request):
        return JSONResponse({"body": json.loads(await request.body()),
                             "length": request.headers.get("content-length")})

    app = Starlette(routes=[Route(path, echo, methods=["POST"])
                            for path in (*PATHS, "/v1/embeddings")])
    if vllm:
        record = {"scheduler": {"name": "mnemosyne", "token_budget": 64}}
        if classes:
            record["scheduler"]["slo_classes"] = {n: s.to_record() for n, s in classes.items()}
        app.state.vllm_config = SimpleNamespace(additional_config={CONFIG_KEY: record})
    app.add_middleware(SLOIntake)
    return app


@pytest.fixture(scope="module")
def client():
    from starlette.testclient import TestClient

    return TestClient(_app())


def _post(client, path="/v1/completions", body=None, headers=None):
    return client.post(path, content=json.dumps(body if body is not None else {"prompt": "hi"}),
                       headers={"content-type": "application/json", **(headers or {})})


@pytest.mark.parametrize("path", sorted(PATHS))
def test_headers_join_vllm_xargs_as_numbers_and_a_class_name(client, path):
    r = _post(client, path, {"prompt": "hi", "vllm_xargs": {"keep": 1}},
              {"x-slo-ttft-ms": "250", "X-SLO-TPOT-MS": "12.5", "x-slo-class": "interactive"})
    assert r.status_code == 200, r.text
    body = r.json()["body"]
    assert body == {"prompt": "hi", "vllm_xargs": {"keep": 1, "ttft_slo_ms": 250,
                                                   "tbt_slo_ms": 12.5, "slo_class": "interactive"}}
    assert int(r.json()["length"]) == len(json.dumps(body))


def test_a_request_without_slos_passes_unchanged(client):
    raw = b'{"prompt":  "spaced  as sent", "vllm_xargs": {"other": "x"}}'
    r = client.post("/v1/completions", content=raw)
    assert r.json()["body"] == json.loads(raw) and r.json()["length"] == str(len(raw))


def test_valid_body_fields_pass_unchanged(client):
    xargs = {"ttft_slo_ms": "300", "tbt_slo_ms": 50, "slo_class": "batch"}
    assert _post(client, body={"vllm_xargs": xargs}).json()["body"] == {"vllm_xargs": xargs}


def test_a_header_that_agrees_with_the_body_is_fine(client):
    r = _post(client, body={"vllm_xargs": {"ttft_slo_ms": "250.0", "slo_class": "batch"}},
              headers={"x-slo-ttft-ms": "250", "x-slo-class": "batch"})
    assert r.status_code == 200, r.text
    assert r.json()["body"]["vllm_xargs"] == {"ttft_slo_ms": "250.0", "slo_class": "batch"}


def _refused(r, param: str, message: str) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400
    assert error["param"] == param
    assert message in error["message"], error["message"]
    assert error["message"].startswith(param)


@pytest.mark.parametrize("headers, body, param, message", [
    ({"x-slo-ttft-ms": "abc"}, {}, "x-slo-ttft-ms",
     "x-slo-ttft-ms: expected a number of milliseconds, got 'abc'"),
    ({"x-slo-tpot-ms": "0"}, {}, "x-slo-tpot-ms", "must be > 0"),
    ({"x-slo-class": "gold"}, {}, "x-slo-class",
     "x-slo-class: unknown class 'gold'; allowed: batch, interactive"),
    ({}, {"vllm_xargs": {"tbt_slo_ms": -5}}, "vllm_xargs.tbt_slo_ms",
     "vllm_xargs.tbt_slo_ms: must be > 0 and at most 86400000 ms (a day), got -5"),
    ({}, {"vllm_xargs": {"slo_class": "gold"}}, "vllm_xargs.slo_class",
     "unknown class 'gold'; allowed: batch, interactive"),
    ({}, {"vllm_xargs": {"ttft_slo_ms": "soon"}}, "vllm_xargs.ttft_slo_ms",
     "expected a number of milliseconds, got 'soon'"),
    ({"x-slo-ttft-ms": "200"}, {"vllm_xargs": {"ttft_slo_ms": 500}}, "x-slo-ttft-ms",
     "x-slo-ttft-ms: '200' disagrees with vllm_xargs.ttft_slo_ms=500; give one of them"),
    ({"x-slo-class": "batch"}, {"vllm_xargs": {"slo_class": "interactive"}}, "x-slo-class",
     "'batch' disagrees with vllm_xargs.slo_class='interactive'"),
], ids=["header-not-a-number", "header-zero", "header-unknown-class", "body-negative",
        "body-unknown-class", "body-not-a-number", "header-body-conflict", "class-conflict"])
def test_a_bad_slo_is_a_400_naming_the_field(client, headers, body, param, message):
    _refused(_post(client, body={"prompt": "hi", **body}, headers=headers), param, message)


def test_a_header_given_twice_with_different_values_is_refused(client):
    r = client.post("/v1/completions", content=b"{}",
                    headers=[("x-slo-ttft-ms", "100"), ("x-slo-ttft-ms", "200")])
    _refused(r, "x-slo-ttft-ms", "given 2 times with different values ['100', '200']")


def test_an_escaped_key_is_still_checked(client):
    raw = b'{"vllm_\\u0078args": {"tbt_slo_ms": -5}}'  # vllm_xargs, spelled with an escape
    _refused(client.post("/v1/completions", content=raw), "vllm_xargs.tbt_slo_ms", "must be > 0")


def test_other_paths_and_methods_are_untouched(client):
    bad = {"x-slo-ttft-ms": "abc"}
    assert _post(client, "/v1/embeddings", {"vllm_xargs": {"tbt_slo_ms": -5}}, bad) \
        .status_code == 200
    assert client.get("/v1/completions", headers=bad).status_code == 405  # the app's answer


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"vllm_xargs": "x"}'])
def test_bodies_vllm_refuses_itself_are_handed_on_as_sent(raw):
    seen = []

    async def inner(scope, receive, send):
        seen.append((await receive())["body"])

    sent = _asgi_run(SLOIntake(inner), [{"type": "http.request", "body": raw}],
                     headers=[("x-slo-ttft-ms", "abc")])
    assert (seen, sent) == ([raw], [])  # vLLM's validation answers these, not the intake


def test_a_server_without_classes_refuses_any_class():
    from starlette.testclient import TestClient

    r = _post(TestClient(_app(classes=None)), headers={"x-slo-class": "batch"})
    _refused(r, "x-slo-class", "unknown class 'batch'; allowed: none are defined "
                               "(--mnemosyne-slo-class)")


def test_classes_come_from_the_apps_engine_record():
    intake = SLOIntake(None)
    assert intake.classes({"app": _app(vllm=False)}) == {}
    assert intake.classes({"app": _app()}) == CLASSES
    assert intake.classes({"app": _app(classes=None)}) == CLASSES  # read once


def test_merge_is_none_without_headers():
    assert merge({}, {"slo_class": "batch"}, CLASSES) is None
    assert merge({"x-slo-tpot-ms": ["40"]}, None, CLASSES) == {"tbt_slo_ms": 40}


def _asgi_run(app, messages: list[dict], path="/v1/completions", headers=()):
    """Run one request through raw ASGI: what the app sent, and each `receive` result the
    app saw after the body."""
    sent: list[dict] = []
    incoming = list(messages)

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "",
             "headers": [(k.encode(), v.encode()) for k, v in headers]}
    asyncio.run(app(scope, receive, send))
    return sent


def test_a_body_in_pieces_is_read_whole_and_replayed_once_then_the_clients_messages():
    seen = []

    async def inner(scope, receive, send):
        seen.extend([await receive(), await receive()])

    _asgi_run(SLOIntake(inner), [
        {"type": "http.request", "body": b'{"vllm_xargs": ', "more_body": True},
        {"type": "http.request", "body": b'{"slo_class": "x"}}', "more_body": False}])
    assert seen == []  # unknown class: answered here, the app never ran
    sent = _asgi_run(SLOIntake(inner), [
        {"type": "http.request", "body": b'{"vllm_xargs": ', "more_body": True},
        {"type": "http.request", "body": b'{"tbt_slo_ms": 5}}', "more_body": False}],
        headers=[("x-slo-ttft-ms", "9")])
    assert sent == []
    assert json.loads(seen[0]["body"]) == {"vllm_xargs": {"tbt_slo_ms": 5, "ttft_slo_ms": 9}}
    assert seen[0]["more_body"] is False and seen[1] == {"type": "http.disconnect"}


def test_a_stream_is_not_buffered():
    """The app sends its second piece only after the client has the first: a middleware
    that held the response would wait forever (here: time out)."""
    first_seen = asyncio.Event()

    async def inner(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await asyncio.wait_for(first_seen.wait(), 5)
        await send({"type": "http.response.body", "body": b"second", "more_body": False})

    got = []

    async def run():
        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            got.append(message.get("body"))
            if message.get("body") == b"first":
                first_seen.set()

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                 "headers": [(b"x-slo-class", b"batch")]}
        intake = SLOIntake(inner)
        intake._classes = CLASSES
        await intake(scope, receive, send)

    asyncio.run(run())
    assert got == [None, b"first", b"second"]


def test_a_client_that_leaves_before_its_body_is_not_answered():
    sent = _asgi_run(SLOIntake(None), [{"type": "http.disconnect"}])
    assert sent == []


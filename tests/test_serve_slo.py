"""Per-request SLOs on a real `vllm serve --scheduler mnemosyne` (the session's shared
server, with classes `chat=ttft:60s,tbt:10s` and `batch=ttft:120s`) through the real
openai client: SLOs in `vllm_xargs` and in `x-slo-*` headers are served with the same
greedy tokens as none, a stream with headers streams, bad values are 400s naming the
field that never reach the engine, and /metrics counts each class's tokens."""

from __future__ import annotations

import re
import urllib.request

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

TOKENS = 6
PROMPT = "the quick brown fox jumps over"
MESSAGES = [{"role": "user", "content": "hello there, how are you"}]


@pytest.fixture(scope="module")
def client(shared_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{shared_server[0]}/v1", api_key="unused", max_retries=0)


def _metrics(base: str) -> str:
    return urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()


def _slo_counts(text: str) -> dict[tuple[str, str, str], float]:
    """(metric, slo_class, outcome) -> value, for the per-class SLO counters."""
    out = {}
    for metric, labels, value in re.findall(
            r"^vllm_ext_(slo_first_tokens|slo_tokens)_total\{([^}]*)\} ([0-9.e+]+)$", text,
            re.MULTILINE):
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        assert label["engine"] == "0"  # one engine, labelled as vLLM labels its own series
        out[metric, label["slo_class"], label["outcome"]] = float(value)
    return out


def _prompt_tokens(text: str) -> float:
    """The prompt tokens vLLM's engine has taken in (a request it never saw adds none)."""
    found = re.findall(r"^vllm:prompt_tokens_total\{[^}]*\} ([0-9.e+]+)$", text, re.MULTILINE)
    assert found, "vllm:prompt_tokens_total is not on /metrics"
    return sum(map(float, found))


def _complete(client, model, **extra) -> str:
    body = {"ignore_eos": True, **extra.pop("extra_body", {})}
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS,
                                     temperature=0, extra_body=body, **extra).choices[0].text


def _chat(client, model, **extra) -> str:
    body = {"ignore_eos": True, **extra.pop("extra_body", {})}
    return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=TOKENS,
                                          temperature=0, extra_body=body,
                                          **extra).choices[0].message.content


def test_slos_from_body_and_headers_are_served_and_counted_by_class(shared_server, client,
                                                                    tiny_model):
    base, model = shared_server[0], str(tiny_model)
    before = _slo_counts(_metrics(base))
    plain, plain_chat = _complete(client, model), _chat(client, model)

    # (the class each is counted under, its greedy text)
    sent = [("chat", _complete(client, model, extra_body={"vllm_xargs": {"slo_class": "chat"}})),
            ("custom", _complete(client, model, extra_headers={"x-slo-ttft-ms": "60000",
                                                               "x-slo-tpot-ms": "10000"})),
            ("batch", _chat(client, model, extra_body={"vllm_xargs": {"slo_class": "batch"}})),
            ("chat", _chat(client, model, extra_headers={"x-slo-class": "chat"}))]
    assert [text for _, text in sent] == [plain, plain, plain_chat, plain_chat]

    # A stream with headers still streams: its tokens come in several events.
    events, tokens, text = 0, 0, []
    for chunk in client.completions.create(
            model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True,
            logprobs=0, extra_body={"ignore_eos": True},
            extra_headers={"x-slo-class": "batch", "x-slo-tpot-ms": "10000"}):
        choice = chunk.choices[0]
        events += 1
        tokens += len(choice.logprobs.tokens) if choice.logprobs else 0
        text.append(choice.text)
    assert tokens == TOKENS and events > 2 and "".join(text) == plain

    # The engine writes its counts once a second while busy and at once when it goes
    # idle, before the last token is sent: they are all there now.
    after = _slo_counts(_metrics(base))
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    later = TOKENS - 1  # the first token is the prefill's
    expected = {
        ("slo_first_tokens", "chat", "met"): 2, ("slo_first_tokens", "chat", "missed"): 0,
        ("slo_tokens", "chat", "met"): 2 * later, ("slo_tokens", "chat", "missed"): 0,
        ("slo_first_tokens", "custom", "met"): 1, ("slo_first_tokens", "custom", "missed"): 0,
        ("slo_tokens", "custom", "met"): later, ("slo_tokens", "custom", "missed"): 0,
        ("slo_first_tokens", "batch", "met"): 2, ("slo_first_tokens", "batch", "missed"): 0,
        # batch has no TBT: only the stream, which set its own, counts its later tokens
        ("slo_tokens", "batch", "met"): later, ("slo_tokens", "batch", "missed"): 0,
    }
    assert {k: delta.get(k) for k in expected} == expected
    assert re.search(r'^vllm_ext_decodes_deferred_total\{engine="0",model_name="[^"]+"\} [0-9.e+]+$',
                     _metrics(base), re.MULTILINE)


@pytest.mark.parametrize("extra, param", [
    ({"extra_headers": {"x-slo-ttft-ms": "abc"}}, "x-slo-ttft-ms"),
    ({"extra_body": {"vllm_xargs": {"tbt_slo_ms": -5}}}, "vllm_xargs.tbt_slo_ms"),
    ({"extra_body": {"vllm_xargs": {"slo_class": "gold"}}}, "vllm_xargs.slo_class"),
    ({"extra_headers": {"x-slo-class": "gold"}}, "x-slo-class"),
    ({"extra_headers": {"x-slo-ttft-ms": "200"},
      "extra_body": {"vllm_xargs": {"ttft_slo_ms": 500}}}, "x-slo-ttft-ms"),
], ids=["header-not-a-number", "xargs-negative", "xargs-unknown-class", "header-unknown-class",
        "header-disagrees-with-xargs"])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_a_bad_slo_is_a_400_naming_the_field_and_never_reaches_the_engine(
        shared_server, client, tiny_model, extra, param, endpoint):
    from openai import BadRequestError

    base = shared_server[0]
    before = _prompt_tokens(_metrics(base))
    with pytest.raises(BadRequestError) as e:
        (_complete if endpoint == "completions" else _chat)(client, str(tiny_model), **extra)
    error = e.value.body
    assert e.value.status_code == 400 and error["param"] == param
    assert error["message"].startswith(f"{param}: ")
    if "gold" in str(extra):
        assert "unknown class 'gold'; allowed: batch, chat" in error["message"]
    assert _prompt_tokens(_metrics(base)) == before

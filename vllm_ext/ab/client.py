"""Replay a trace against an OpenAI-compatible endpoint, timing every streamed token.

Each request asks for `logprobs=0`, so every streamed event lists the tokens it
carries: an event of k tokens is recorded as (arrival time, k), which is how
Metron counts a coalesced chunk (one gap, then k-1 zero gaps). Counting text
pieces instead undercounts when the server coalesces tokens (see REFERENCES).

A request whose trace gives it SLOs states them as a client would (`SLOSending`): its
deadlines in `vllm_xargs` or in llm-d's `x-slo-*` headers, its class name only when
asked (a server that does not define the class refuses it), and, for an arm served with
`--scheduling-policy priority`, vLLM's own `priority` field mapped from its class.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

from vllm_ext.ab.metron import Timeline
from vllm_ext.ab.traces import Trace, TraceRequest, counted_class
from vllm_ext.schedulers import slo

SLO_SEND = ("xargs", "headers")
_HEADER_OF = {field: header for header, field in slo.HEADERS.items()}

TOKEN_COUNTING = ("tokens counted per streamed event from its logprobs entries (logprobs=0); "
                  "an event of k tokens is one gap followed by k-1 zero gaps; events without "
                  "tokens are ignored; checked against the server's usage.completion_tokens")


class EndpointError(RuntimeError):
    """An endpoint that cannot be reached or does not serve the model."""


@dataclass(slots=True)
class RequestRecord:
    index: int
    scheduled: float  # when the trace says it arrives, seconds after the run's start
    sent: float  # when it was sent, seconds after the run's start
    prompt_tokens: int
    max_tokens: int
    events: list[tuple[float, int]] = field(default_factory=list)
    completed: bool = False
    finish_reason: str | None = None
    usage_tokens: int | None = None  # the server's own count of output tokens
    error: str | None = None
    # The SLOs its trace gave it (None: none; the figures then use the run's --*-slo-*).
    slo_class: str | None = None
    ttft_slo_ms: float | None = None
    tbt_slo_ms: float | None = None

    @classmethod
    def planned(cls, index: int, req: TraceRequest, sent: float) -> RequestRecord:
        return cls(index, req.arrival, sent, req.prompt_tokens, req.output_tokens,
                   slo_class=req.slo_class, ttft_slo_ms=req.ttft_slo_ms,
                   tbt_slo_ms=req.tbt_slo_ms)

    def timeline(self) -> Timeline:
        return Timeline.of(self.sent, self.events, self.completed)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("slo_class", "ttft_slo_ms", "tbt_slo_ms"):  # raw files as before SLOs
            if d[key] is None:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RequestRecord":
        return cls(**{**d, "events": [tuple(e) for e in d["events"]]})


@dataclass(frozen=True, slots=True)
class SLOSending:
    """How each request states the SLOs its trace gives it."""

    via: str = "xargs"  # "xargs": in the body's vllm_xargs; "headers": x-slo-* headers
    # Also the class name (slo_class / x-slo-class). Off by default: a server that does not
    # define the class refuses the request (HTTP 400), while deadlines alone are understood
    # by an SLO-aware server and ignored by any other.
    send_class: bool = False
    # Class (as reports count it: a name, "custom" or "default") -> vLLM's request
    # `priority` (lower is served first), for an arm served with --scheduling-policy
    # priority; None sends no priority, nor does a class it leaves out (vLLM's default, 0:
    # a capacity probe of a CSV trace's arm, say; the trace's own classes are checked).
    priorities: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        if self.via not in SLO_SEND:
            raise ValueError(f"--slo-send {self.via!r}: choose from {', '.join(SLO_SEND)}")

    def fields(self, req: TraceRequest) -> dict[str, int | float | str]:
        """The SLO fields the request states, as vllm_xargs names them (what the server's
        SamplingParams.extra_args holds once it accepted them)."""
        out: dict[str, int | float | str] = {}
        for key, ms in ((slo.XARG_TTFT, req.ttft_slo_ms), (slo.XARG_TBT, req.tbt_slo_ms)):
            if ms is not None:
                out[key] = int(ms) if ms == int(ms) else ms
        if self.send_class and req.slo_class is not None:
            out[slo.XARG_CLASS] = req.slo_class
        return out

    def request(self, req: TraceRequest) -> tuple[dict, dict[str, str]]:
        """(fields added to the request's JSON body, HTTP headers) for one request."""
        fields = self.fields(req)
        body: dict = {}
        headers: dict[str, str] = {}
        if fields and self.via == "xargs":
            body["vllm_xargs"] = fields
        elif fields:
            headers = {_HEADER_OF[k]: str(v) for k, v in fields.items()}
        priority = (self.priorities or {}).get(counted_class(req))
        if priority is not None:
            body["priority"] = priority
        return body, headers


SEND_VALUES = SLOSending()  # the default: deadlines in vllm_xargs, no class, no priority


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def served_models(base_url: str) -> list[str]:
    """Model names an endpoint serves (GET /v1/models), or EndpointError saying why not."""
    try:
        return [m["id"] for m in get_json(f"{base_url}/v1/models")["data"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = getattr(e, "reason", None) or e
        raise EndpointError(f"{base_url} is not a reachable OpenAI-compatible endpoint "
                            f"(GET /v1/models: {reason})") from None


def get_text(url: str, timeout: float = 5.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode()
    except (OSError, urllib.error.HTTPError):
        return None


async def _one(client, model: str, trace: Trace, i: int, vocab_size: int, t0: float,
               record: RequestRecord, on_tokens: Callable[[int], None] | None,
               sending: SLOSending) -> None:
    req = trace.requests[i]
    prompt = trace.prompt_ids(i, vocab_size)
    body, headers = sending.request(req)
    record.sent = time.perf_counter() - t0
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=req.output_tokens, temperature=0.0,
            stream=True, logprobs=0, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, **body}, extra_headers=headers or None)
        async for chunk in stream:
            now = time.perf_counter() - t0
            if chunk.choices:
                choice = chunk.choices[0]
                lp = choice.logprobs
                k = len(lp.tokens) if lp and lp.tokens else 0
                record.events.append((now, k))
                if k and on_tokens is not None:
                    on_tokens(k)
                record.finish_reason = choice.finish_reason or record.finish_reason
            if getattr(chunk, "usage", None) is not None:
                record.usage_tokens = chunk.usage.completion_tokens
        record.completed = record.finish_reason is not None
        if not record.completed:
            record.error = "stream ended without a finish reason"
    except Exception as e:  # one failed request must not stop the run: it is recorded
        cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
        record.error = f"{type(e).__name__}: {e}{cause}"


async def _replay(base_url: str, model: str, trace: Trace, vocab_size: int,
                  on_done: Callable[[RequestRecord], None] | None,
                  on_tokens: Callable[[int], None] | None,
                  sending: SLOSending) -> list[RequestRecord]:
    import httpx
    from openai import AsyncOpenAI

    # No retries (a retry would hide a failure and distort timings); no read timeout,
    # since a long prefill under load may legitimately keep a stream silent. Idle
    # connections are dropped before a server's keep-alive ends (uvicorn's: 5 s): a
    # request sent on one the server is closing fails with "Connection error" (seen
    # once in 600 requests).
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                         timeout=httpx.Timeout(None, connect=30.0),
                         http_client=httpx.AsyncClient(limits=httpx.Limits(
                             max_connections=None, keepalive_expiry=2.0)))
    records = [RequestRecord.planned(i, r, float("nan")) for i, r in enumerate(trace.requests)]
    t0 = time.perf_counter()

    async def run(i: int) -> None:
        await _one(client, model, trace, i, vocab_size, t0, records[i], on_tokens, sending)
        if on_done is not None:
            on_done(records[i])

    async def timed(i: int) -> None:
        await asyncio.sleep(max(0.0, trace.requests[i].arrival - (time.perf_counter() - t0)))
        await run(i)

    async def worker(queue: asyncio.Queue) -> None:
        while not queue.empty():
            await run(queue.get_nowait())

    try:
        if trace.concurrency is None:
            await asyncio.gather(*(timed(i) for i in range(len(records))))
        else:
            queue: asyncio.Queue = asyncio.Queue()
            for i in range(len(records)):
                queue.put_nowait(i)
            await asyncio.gather(*(worker(queue) for _ in range(trace.concurrency)))
    finally:
        await client.close()
    return records


def replay(base_url: str, model: str, trace: Trace, vocab_size: int,
           on_done: Callable[[RequestRecord], None] | None = None,
           on_tokens: Callable[[int], None] | None = None,
           sending: SLOSending = SEND_VALUES) -> list[RequestRecord]:
    """Send every request of `trace` at its arrival time (or through a closed loop) as a
    greedy streamed completion of exactly its output length, stating its SLOs as
    `sending` says; one record per request, failed ones included, with times in seconds
    from the start of the replay. `on_tokens(k)` hears of each streamed event's k tokens,
    `on_done` of each finished request."""
    return asyncio.run(_replay(base_url, model, trace, vocab_size, on_done, on_tokens,
                               sending))

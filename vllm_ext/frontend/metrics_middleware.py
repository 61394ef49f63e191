"""vllm-ext's series on /metrics when vLLM runs several API server processes.

With one API server, /metrics serves prometheus_client's global registry, where the
front end registers vllm-ext's collector (`vllm_ext.frontend.metrics`). With several
(`--api-server-count N`, which `--data-parallel-size N` raises to N by default), vLLM
sets PROMETHEUS_MULTIPROC_DIR and the handler behind /metrics serves a registry it makes
per scrape from prometheus_client's multiprocess files alone: no registry we could add
a collector to is read, and every `vllm_ext_*` series vanished exactly when an operator
scaled out.

Every vllm-ext selection puts `MetricsAppend` on vLLM's own `--middleware` list. On a
GET of /metrics whose answer lacks vllm-ext's series it appends them, read from the
engines' files (so any API server process answers for every engine); an answer that has
them (one API server) passes through untouched. The request reaches vLLM without
`Accept-Encoding`, so the text can be extended (vLLM's handler does not compress it
anyway).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PATH = "vllm_ext.frontend.metrics_middleware.MetricsAppend"
# Present in both exposition formats whenever the collector ran (HELP precedes samples).
_MARKER = b"# HELP vllm_ext_steps"
_OPENMETRICS = b"application/openmetrics-text"
_EOF = b"# EOF\n"


class MetricsAppend:
    """Pure ASGI middleware (`vllm serve --middleware
    vllm_ext.frontend.metrics_middleware.MetricsAppend`, added by any vllm-ext flag)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._registry = None

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "http" or scope["method"] != "GET" \
                or scope["path"].rstrip("/") != "/metrics":
            return self.app(scope, receive, send)
        return self._scrape(scope, receive, send)

    async def _scrape(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"]
                                      if k != b"accept-encoding"]}
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = self._complete(start, b"".join(chunks))
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length",
                                                        str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)

    def _complete(self, start: Message, body: bytes) -> bytes:
        if start.get("status") != 200 or _MARKER in body:
            return body
        content_type = dict(start.get("headers", [])).get(b"content-type", b"")
        if content_type.startswith(_OPENMETRICS):
            from prometheus_client.openmetrics.exposition import generate_latest

            ours = generate_latest(self._ours())
            head = body[:-len(_EOF)] if body.endswith(_EOF) else body
            return head + ours  # ours ends with the one # EOF
        from prometheus_client import generate_latest

        return body + generate_latest(self._ours())

    def _ours(self):
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            from vllm_ext.frontend import metrics

            self._registry = CollectorRegistry(auto_describe=False)
            metrics.register(self._registry)
        return self._registry

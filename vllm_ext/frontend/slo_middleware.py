"""`vllm serve`'s intake of per-request SLOs: a bad one is refused with a 400 before the
engine sees it, and the `x-slo-*` headers join the request's `vllm_xargs`.

`--scheduler mnemosyne` puts `SLOIntake` on vLLM's own `--middleware` list (vLLM adds it
to its FastAPI app; nothing of the server is patched). For a POST to an endpoint whose
body carries `vllm_xargs` it reads the body once, then:

- checks every SLO field, in the headers (`x-slo-ttft-ms`, `x-slo-tpot-ms`,
  `x-slo-class`) and in `vllm_xargs` (`ttft_slo_ms`, `tbt_slo_ms`, `slo_class`), against
  this server's classes; the first bad one is a 400 in vLLM's error shape, naming it;
- a header and a `vllm_xargs` field that ask for different values: a 400 naming both
  (a proxy and a client disagreeing is a bug to show, not to settle by precedence);
- copies the header values into `vllm_xargs`, so the scheduler reads one place;
- hands the body on, rewritten only if a header was merged. The response is not
  touched: a stream streams as before.

Other requests pass straight through. The classes are this server's own engine record,
read from `app.state.vllm_config` (which every API server process, `--api-server-count`
> 1 included, builds from the same folded arguments), through `vllm_ext.config`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from vllm_ext.config import ExtConfig
from vllm_ext.schedulers.slo import HEADERS, SLO, XARG_CLASS, SLOError, milliseconds, request_slo

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# vLLM 0.32's endpoints whose request body has `vllm_xargs` and reaches the scheduler
# (/v1/messages: Anthropic's API, turned into a chat request).
PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages"})
_HEADERS = {name.encode(): name for name in HEADERS}  # ASGI headers are lower-case bytes


class SLOIntake:
    """Pure ASGI middleware (`vllm serve --middleware vllm_ext.frontend.slo_middleware.SLOIntake`,
    added by `--scheduler mnemosyne`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._classes: dict[str, SLO] | None = None

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine itself: any other request costs these comparisons and one call.
        if scope["type"] != "http" or scope["method"] != "POST" or _route(scope) not in PATHS:
            return self.app(scope, receive, send)
        return self._intake(scope, receive, send)

    async def _intake(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: dict[str, list[str]] = {}
        for key, value in scope["headers"]:
            if (name := _HEADERS.get(key)) is not None:
                headers.setdefault(name, []).append(value.decode("latin-1").strip())
        body, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: no one to answer
                return
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(body)
        # Parsed whatever it holds: searching for the key first would save little (a
        # 100 KB body here: 54 us to search, 78 to parse) and miss a key spelled with
        # \u escapes. vLLM parses the body again itself.
        try:
            rewritten = self._checked(scope, headers, raw)
        except SLOError as e:
            await _bad_request(send, e)
            return
        if rewritten is None:
            await self.app(scope, _replay(raw, receive), send)
        else:
            await self.app(_with_length(scope, rewritten), _replay(rewritten, receive), send)

    def _checked(self, scope: Scope, headers: Mapping[str, list[str]], raw: bytes) -> bytes | None:
        """The body to hand on: None for unchanged, or with the headers merged."""
        try:
            request = json.loads(raw)
        except ValueError:
            return None  # not JSON: vLLM answers that itself
        if not isinstance(request, dict):
            return None  # not a request object: the same
        xargs = request.get("vllm_xargs")
        if xargs is not None and not isinstance(xargs, dict):
            return None  # a shape vLLM's own validation refuses
        merged = merge(headers, xargs, self.classes(scope))
        if merged is None:
            return None
        request["vllm_xargs"] = merged
        return json.dumps(request).encode()

    def classes(self, scope: Scope) -> dict[str, SLO]:
        """This server's SLO classes (none unless it runs `--scheduler mnemosyne` with
        `--mnemosyne-slo-class`), read once: the record does not change while it serves."""
        if self._classes is None:
            vllm_config = getattr(getattr(scope.get("app"), "state", None), "vllm_config", None)
            if vllm_config is None:
                return {}  # not a vLLM server's app (yet): asked again next time
            settings = ExtConfig.of(vllm_config).settings("scheduler", "mnemosyne")
            self._classes = dict(settings.deadlines.classes) if settings is not None else {}
        return self._classes


def merge(headers: Mapping[str, list[str]], xargs: Mapping[str, Any] | None,
          classes: Mapping[str, SLO]) -> dict[str, Any] | None:
    """`xargs` with the SLO headers' values added (None: no header, nothing to add).
    Raises SLOError naming the header or `vllm_xargs` field that is wrong."""
    xargs = dict(xargs or {})
    try:
        request_slo(xargs, classes)
    except SLOError as e:
        raise _renamed(e, f"vllm_xargs.{e.field}") from None
    added: dict[str, Any] = {}
    for name, values in headers.items():
        if len(set(values)) > 1:
            raise SLOError(name, f"given {len(values)} times with different values "
                                 f"{values}; give it once")
        field, value = HEADERS[name], _header_value(name, values[0], classes)
        if field not in xargs:
            added[field] = value
        elif not _same(field, value, xargs[field]):
            raise SLOError(name, f"{values[0]!r} disagrees with vllm_xargs.{field}="
                                 f"{xargs[field]!r}; give one of them, or the same value in both")
    return {**xargs, **added} if added else None


def _header_value(name: str, text: str, classes: Mapping[str, SLO]) -> Any:
    """A header's value as `vllm_xargs` holds it: a class name, or a number of ms."""
    field = HEADERS[name]
    if field == XARG_CLASS:
        try:
            request_slo({XARG_CLASS: text}, classes)
        except SLOError as e:
            raise _renamed(e, name) from None
        return text
    milliseconds(name, text)  # refuses what is not a deadline
    ms = float(text)
    return int(ms) if ms.is_integer() else ms


def _same(field: str, ours: Any, theirs: Any) -> bool:
    if field == XARG_CLASS:
        return ours == theirs
    return milliseconds(field, theirs) == milliseconds(field, ours)


def _renamed(error: SLOError, field: str) -> SLOError:
    """The same complaint about `field`, the name the client used for it."""
    return SLOError(field, str(error).removeprefix(f"{error.field}: "))


def _route(scope: Scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _with_length(scope: Scope, body: bytes) -> Scope:
    """`scope` with the rewritten body's Content-Length."""
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read here, once, then the client's own messages (a disconnect, which a
    streaming response listens for)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _bad_request(send: Send, error: SLOError) -> None:
    """A 400 in the shape of vLLM's own (`ErrorResponse`), naming the field."""
    body = json.dumps({"error": {"message": str(error), "type": "BadRequestError",
                                 "param": error.field, "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

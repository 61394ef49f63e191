"""Per-request service-level objectives: what a request may ask for, and how it is written.

A request's SLO is two deadlines: its first token within `ttft_s` of arrival (Mnemosyne
adds its allowance per prompt token), and each later token within `tbt_s` of the previous
one, Metron's walk (time a token saves is banked for the next; a late token empties the
bank). A request states them, most specific first:

- its own values: `vllm_xargs` `ttft_slo_ms` / `tbt_slo_ms` (vLLM's OpenAI server hands a
  request's `vllm_xargs` to `SamplingParams.extra_args`), or the headers `x-slo-ttft-ms` /
  `x-slo-tpot-ms` that llm-d and the Gateway API Inference Extension already carry;
- a class the operator named once (`--mnemosyne-slo-class batch=ttft:30s,tbt:2000ms`),
  chosen by `slo_class` / `x-slo-class`;
- the server's defaults (`--mnemosyne-ttft-slo-s`, `--mnemosyne-tbt-slo-ms`).

Everything here is plain parsing, shared by the API server (which refuses a bad value
with a 400 before the engine sees it) and the scheduler (which reads the same fields).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

XARG_TTFT, XARG_TBT, XARG_CLASS = "ttft_slo_ms", "tbt_slo_ms", "slo_class"
XARGS = (XARG_TTFT, XARG_TBT, XARG_CLASS)
# Header -> the vllm_xargs field it stands for (llm-d's names; TPOT is its word for TBT).
HEADERS = {"x-slo-ttft-ms": XARG_TTFT, "x-slo-tpot-ms": XARG_TBT, "x-slo-class": XARG_CLASS}
# A deadline longer than a day is a typo (seconds written as ms the other way round).
MAX_MS = 86_400_000.0
DEFAULT_CLASS = "default"  # requests that name no class and set no value
CUSTOM_CLASS = "custom"  # requests that set their own values and name no class
CLASS_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,31}")
_DURATION = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s)\s*")
CLASS_FORM = "NAME=ttft:DURATION[,tbt:DURATION] (DURATION: 1.5s or 200ms)"


class SLOError(ValueError):
    """A request's or the operator's SLO value that cannot be used; names the field and
    what is allowed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class SLO:
    """Deadlines in seconds; None leaves that one to the next source down (a class, then
    the server's default; a TBT with no source at all: the request has no TBT deadline)."""

    ttft_s: float | None = None
    tbt_s: float | None = None

    def over(self, fallback: SLO) -> SLO:
        """These values where set, `fallback`'s elsewhere."""
        return SLO(fallback.ttft_s if self.ttft_s is None else self.ttft_s,
                   fallback.tbt_s if self.tbt_s is None else self.tbt_s)

    def to_record(self) -> dict[str, float]:
        """As the engine's config records it (milliseconds, unset ones left out)."""
        return {k: round(v * 1e3, 6) for k, v in
                (("ttft_ms", self.ttft_s), ("tbt_ms", self.tbt_s)) if v is not None}

    @classmethod
    def from_record(cls, record: Mapping[str, float]) -> SLO:
        return cls(*(None if record.get(k) is None else record[k] / 1e3
                     for k in ("ttft_ms", "tbt_ms")))


def milliseconds(field: str, value: Any) -> float:
    """A deadline in ms, as a client may send it (a number, or a number in a string, since
    `vllm_xargs` values and headers are often strings), in seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SLOError(field, f"expected a number of milliseconds, got {value!r}")
    try:
        ms = float(value)
    except ValueError:
        raise SLOError(field, f"expected a number of milliseconds, got {value!r}") from None
    if not (math.isfinite(ms) and 0 < ms <= MAX_MS):
        raise SLOError(field, f"must be > 0 and at most {MAX_MS:.0f} ms (a day), got {value!r}")
    return ms / 1e3


def duration(field: str, text: str) -> float:
    """`1.5s` or `200ms`, in seconds."""
    m = _DURATION.fullmatch(text)
    if m is None:
        raise SLOError(field, f"expected a duration like 1.5s or 200ms, got {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    return milliseconds(field, value * (1e3 if unit == "s" else 1.0))


def parse_class(spec: str) -> tuple[str, SLO]:
    """`batch=ttft:30s,tbt:2000ms` -> ("batch", SLO(30.0, 2.0))."""
    flag = "--mnemosyne-slo-class"
    name, eq, body = spec.partition("=")
    name = name.strip()
    if not eq or not CLASS_NAME.fullmatch(name):
        raise SLOError(flag, f"{spec!r} is not {CLASS_FORM}; a name starts with a letter "
                             f"and has at most 32 letters, digits, '_', '-', '.'")
    if name in (DEFAULT_CLASS, CUSTOM_CLASS):
        raise SLOError(flag, f"{name!r} is reserved (requests without a class are counted "
                             f"under it); choose another name")
    values: dict[str, float] = {}
    for part in body.split(","):
        key, colon, text = part.partition(":")
        key = key.strip()
        if not colon or key not in ("ttft", "tbt"):
            raise SLOError(flag, f"{part!r} in {spec!r}: expected ttft:DURATION or "
                                 f"tbt:DURATION ({CLASS_FORM})")
        if key in values:
            raise SLOError(flag, f"{key} given twice in {spec!r}")
        values[key] = duration(f"{flag} {name} {key}", text)
    return name, SLO(values.get("ttft"), values.get("tbt"))


def parse_classes(specs: list[str] | tuple[str, ...] | None) -> dict[str, SLO]:
    classes: dict[str, SLO] = {}
    for spec in specs or ():
        name, slo = parse_class(spec)
        if name in classes:
            raise SLOError("--mnemosyne-slo-class", f"class {name!r} defined twice")
        classes[name] = slo
    return classes


def counted_as(slo_class: str | None, states_deadlines: bool) -> str:
    """The class a request is counted under, by the server and by reports alike: its
    class's name; `custom` when it states deadlines of its own and no class; `default`
    when it states nothing."""
    if slo_class is not None:
        return slo_class
    return CUSTOM_CLASS if states_deadlines else DEFAULT_CLASS


def request_slo(extra_args: Mapping[str, Any] | None,
                classes: Mapping[str, SLO]) -> tuple[str, SLO]:
    """The class a request is counted under and the SLO it asked for (its own values over
    its class's; the server's defaults are the caller's to apply), from its `vllm_xargs`.
    Raises SLOError naming the field."""
    args = extra_args or {}
    name = args.get(XARG_CLASS)
    own = SLO(*(None if args.get(f) is None else milliseconds(f, args[f])
                for f in (XARG_TTFT, XARG_TBT)))
    if name is None:
        return counted_as(None, own != SLO()), own
    if not isinstance(name, str) or name not in classes:
        allowed = ", ".join(sorted(classes)) or "none are defined (--mnemosyne-slo-class)"
        raise SLOError(XARG_CLASS, f"unknown class {name!r}; allowed: {allowed}")
    return name, own.over(classes[name])

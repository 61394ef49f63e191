"""Seeded request traces: when each request arrives, how many tokens it reads and writes,
and, optionally, the SLOs it states (a class name and/or its own deadlines).

Every arm of an A/B run replays the same trace, so differences come from the arm,
not the traffic. A trace is built from an arrival process and two length
distributions, optionally split into SLO classes that each have a share of the
requests, their deadlines and their own lengths (`--slo-mix`), or read from a CSV of
(arrival, prompt_tokens, output_tokens[, slo_class, ttft_slo_ms, tbt_slo_ms]).
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vllm_ext.schedulers import slo

ARRIVALS = ("poisson", "gamma", "concurrency")
LENGTH_FORMS = "N | fixed:N | uniform:LO:HI | lognormal:MEDIAN[:SIGMA]"
CSV_COLUMNS = ("arrival", "prompt_tokens", "output_tokens")
# Optional CSV columns after those, in any order: a request's class and own deadlines.
CSV_SLO_COLUMNS = (slo.XARG_CLASS, slo.XARG_TTFT, slo.XARG_TBT)
MIX_FORM = ("NAME=SHARE[:ttft=DURATION][:tbt=DURATION][:prompt=LENGTH][:output=LENGTH],... "
            "(DURATION: 1s or 200ms; LENGTH: a length form with '/' for ':', e.g. "
            "lognormal/2000/0.3 or uniform/8/64)")
# The server's rule for a class name (--mnemosyne-slo-class, schedulers/slo.py).
# Shares within this of summing to 1 are scaled to exactly 1 (0.33,0.33,0.34 is fine).
SHARE_TOLERANCE = 0.01


class TraceError(ValueError):
    """A trace specification or trace file that cannot be used; says what is allowed."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival: float  # seconds after the trace starts; 0 for every request of a closed loop
    prompt_tokens: int
    output_tokens: int
    # The SLOs the request states (None: it states none; the server's defaults apply).
    slo_class: str | None = None
    ttft_slo_ms: float | None = None
    tbt_slo_ms: float | None = None

    @property
    def states_slo(self) -> bool:
        return not (self.slo_class is None and self.ttft_slo_ms is None
                    and self.tbt_slo_ms is None)


def counted_class(r) -> str:
    """The class a request (a TraceRequest or a RequestRecord) is counted under, as the
    server counts it (`vllm_ext.schedulers.slo.counted_as`)."""
    return slo.counted_as(r.slo_class, r.ttft_slo_ms is not None or r.tbt_slo_ms is not None)


@dataclass(frozen=True, slots=True)
class Trace:
    requests: tuple[TraceRequest, ...]
    seed: int
    description: str
    # Closed loop: at most this many requests in flight, the next sent when one ends.
    concurrency: int | None = None

    def prompt_ids(self, index: int, vocab_size: int, first_id: int = 16) -> list[int]:
        """Token ids of request `index`'s prompt: random over the ordinary vocabulary
        (ids below `first_id` are left to special tokens), fixed by seed and index, so
        arms see identical prompts and no two requests share a cacheable prefix."""
        if vocab_size <= first_id:
            raise TraceError(f"vocabulary of {vocab_size} tokens leaves none above id {first_id}")
        rng = random.Random(f"{self.seed}/{index}")
        n = self.requests[index].prompt_tokens
        return [rng.randrange(first_id, vocab_size) for _ in range(n)]

    @property
    def states_slos(self) -> bool:
        """Whether any request states an SLO (then reports add a section per class)."""
        return any(r.states_slo for r in self.requests)

    def to_dict(self) -> dict:
        """Each request as [arrival, prompt, output], with [slo_class, ttft_slo_ms,
        tbt_slo_ms] after them in a trace where any request states an SLO."""
        rows = ([r.arrival, r.prompt_tokens, r.output_tokens, r.slo_class, r.ttft_slo_ms,
                 r.tbt_slo_ms] if self.states_slos else [r.arrival, r.prompt_tokens,
                                                         r.output_tokens]
                for r in self.requests)
        return {"seed": self.seed, "description": self.description,
                "concurrency": self.concurrency, "requests": list(rows)}


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A distribution of token counts: fixed, uniform, or lognormal around a median."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str, what: str = "length") -> "LengthDist":
        parts = str(spec).strip().lower().split(":")
        try:
            if len(parts) == 1:
                parts = ["fixed", parts[0]]
            kind, nums = parts[0], [float(p) for p in parts[1:]]
        except ValueError:
            raise TraceError(f"{what} {spec!r}: numbers expected; use {LENGTH_FORMS}") from None
        shapes = {"fixed": (1,), "uniform": (2,), "lognormal": (1, 2)}
        if kind not in shapes or len(nums) not in shapes[kind]:
            raise TraceError(f"{what} {spec!r}: use {LENGTH_FORMS}")
        if kind in ("fixed", "uniform") and (min(nums) < 1 or any(n != int(n) for n in nums)):
            raise TraceError(f"{what} {spec!r}: token counts are whole numbers >= 1")
        if kind == "uniform" and nums[0] > nums[1]:
            raise TraceError(f"{what} {spec!r}: LO must not exceed HI")
        if kind == "lognormal" and (nums[0] < 1 or (len(nums) == 2 and nums[1] <= 0)):
            raise TraceError(f"{what} {spec!r}: MEDIAN >= 1 and SIGMA > 0")
        default_b = 0.5 if kind == "lognormal" else 0.0
        return cls(kind, nums[0], nums[1] if len(nums) == 2 else default_b)

    def sample(self, rng: random.Random, cap: int) -> int:
        if self.kind == "fixed":
            n = self.a
        elif self.kind == "uniform":
            n = rng.randint(int(self.a), int(self.b))
        else:
            n = round(self.a * math.exp(rng.gauss(0.0, self.b)))
        return max(1, min(int(n), cap))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.a))
        if self.kind == "uniform":
            return f"uniform {int(self.a)}..{int(self.b)}"
        return f"lognormal median {self.a:g} sigma {self.b:g}"


@dataclass(frozen=True, slots=True)
class SLOClass:
    """One class of a generated trace: its share of the requests, the deadlines its
    requests state, and its own lengths (None: the trace's)."""

    name: str
    share: float
    ttft_slo_ms: float | None = None
    tbt_slo_ms: float | None = None
    prompt: LengthDist | None = None
    output: LengthDist | None = None

    def __str__(self) -> str:
        parts = [f"TTFT {ms_text(self.ttft_slo_ms)}" if self.ttft_slo_ms is not None else "",
                 f"TBT {ms_text(self.tbt_slo_ms)}" if self.tbt_slo_ms is not None else "",
                 f"prompt {self.prompt}" if self.prompt else "",
                 f"output {self.output}" if self.output else ""]
        said = ", ".join(p for p in parts if p)
        return f"{self.name} {self.share:.0%}" + (f" ({said})" if said else "")


def ms_text(ms: float) -> str:
    """200 ms, 1.5 s: a deadline as a reader says it."""
    return f"{ms / 1e3:g} s" if ms >= 1000 else f"{ms:g} ms"


def class_name(name: str, where: str) -> str:
    """A class name as the server accepts it (--mnemosyne-slo-class), or TraceError."""
    if not slo.CLASS_NAME.fullmatch(name):
        raise TraceError(f"{where}: class name {name!r} must start with a letter and have at "
                         f"most 32 letters, digits, '_', '-', '.'")
    if name in (slo.DEFAULT_CLASS, slo.CUSTOM_CLASS):
        raise TraceError(f"{where}: class name {name!r} is reserved (reports count requests "
                         f"without a class under it)")
    return name


def parse_slo_mix(spec: str) -> tuple[SLOClass, ...]:
    """`interactive=0.8:ttft=1s:tbt=200ms,batch=0.2:ttft=30s:tbt=2s:prompt=lognormal/4000/0.3`.

    Shares must sum to 1 within SHARE_TOLERANCE; they are then scaled to sum to exactly 1.
    """
    flag = "--slo-mix"
    classes: list[SLOClass] = []
    for item in str(spec).split(","):
        head, *options = item.strip().split(":")
        name, eq, share_text = head.partition("=")
        name = name.strip()
        if not eq:
            raise TraceError(f"{flag} {item.strip()!r}: expected {MIX_FORM}")
        class_name(name, f"{flag} {item.strip()!r}")
        if name in (c.name for c in classes):
            raise TraceError(f"{flag}: class {name!r} given twice")
        try:
            share = float(share_text)
        except ValueError:
            share = math.nan
        if not (math.isfinite(share) and share > 0):
            raise TraceError(f"{flag} {name}: share {share_text!r} must be a number > 0")
        values: dict = {}
        for option in options:
            key, eq, text = option.partition("=")
            key = key.strip()
            where = f"{flag} {name} {key}"
            if not eq or key not in ("ttft", "tbt", "prompt", "output"):
                raise TraceError(f"{flag} {name}: {option!r}: expected ttft=, tbt=, prompt= or "
                                 f"output= ({MIX_FORM})")
            if key in values:
                raise TraceError(f"{flag} {name}: {key} given twice")
            if key in ("ttft", "tbt"):
                try:
                    values[key] = round(slo.duration(where, text) * 1e3, 6)
                except slo.SLOError as e:
                    raise TraceError(str(e)) from None
            else:
                values[key] = _mix_length(text, where)
        classes.append(SLOClass(name, share, values.get("ttft"), values.get("tbt"),
                                values.get("prompt"), values.get("output")))
    total = sum(c.share for c in classes)
    if abs(total - 1.0) > SHARE_TOLERANCE + 1e-9:
        raise TraceError(f"{flag}: shares sum to {total:g}, not 1 "
                         f"({', '.join(f'{c.name} {c.share:g}' for c in classes)})")
    return tuple(SLOClass(c.name, c.share / total, c.ttft_slo_ms, c.tbt_slo_ms, c.prompt,
                          c.output) for c in classes)


def _mix_length(text: str, where: str) -> LengthDist:
    """A length form written with '/' for ':' (the mix's own separator)."""
    colon = text.replace("/", ":")
    try:
        return LengthDist.parse(colon, where)
    except TraceError as e:
        raise TraceError(str(e).replace(repr(colon), repr(text)).replace(
            LENGTH_FORMS, LENGTH_FORMS.replace(":", "/"))) from None


def synthesize(num_requests: int, arrival: str, prompt: LengthDist, output: LengthDist,
               seed: int, qps: float | None = None, burstiness: float = 1.0,
               concurrency: int | None = None, max_prompt: int = 1 << 30,
               max_output: int = 1 << 30, classes: Sequence[SLOClass] = ()) -> Trace:
    """`num_requests` requests with Poisson or gamma (bursty) arrivals at `qps`, or all
    at time 0 for a closed loop of `concurrency`.

    Gamma inter-arrival times have mean 1/qps and coefficient of variation
    `burstiness` (1 is Poisson; above 1, bursts and lulls). With `classes`, each
    request is drawn into one by share, on a stream of its own (so arrivals do not
    depend on the mix), states that class's SLOs and has that class's lengths.
    """
    if num_requests < 1:
        raise TraceError(f"number of requests must be >= 1, got {num_requests}")
    if arrival not in ARRIVALS:
        raise TraceError(f"arrival {arrival!r}: choose from {', '.join(ARRIVALS)}")
    if arrival == "concurrency":
        if not concurrency or concurrency < 1:
            raise TraceError("arrival 'concurrency' needs a concurrency >= 1")
    elif qps is None or not qps > 0:
        raise TraceError(f"arrival {arrival!r} needs a QPS > 0, got {qps}")
    if arrival == "gamma" and not burstiness > 0:
        raise TraceError(f"burstiness must be > 0, got {burstiness}")

    # Separate streams so that changing a length distribution or the class mix leaves
    # arrivals alone (and no mix leaves lengths as they were before mixes existed).
    arrivals_rng, lengths_rng = random.Random(f"{seed}/arrivals"), random.Random(f"{seed}/lengths")
    classes_rng = random.Random(f"{seed}/classes")
    times, now = [], 0.0
    for _ in range(num_requests):
        times.append(now)
        if arrival == "poisson":
            now += arrivals_rng.expovariate(qps)
        elif arrival == "gamma":
            shape = 1.0 / burstiness**2
            now += arrivals_rng.gammavariate(shape, 1.0 / (qps * shape))
    reqs = []
    for t in times:
        if not classes:
            reqs.append(TraceRequest(round(t, 6), prompt.sample(lengths_rng, max_prompt),
                                     output.sample(lengths_rng, max_output)))
            continue
        c = _draw(classes, classes_rng)
        reqs.append(TraceRequest(round(t, 6), (c.prompt or prompt).sample(lengths_rng, max_prompt),
                                 (c.output or output).sample(lengths_rng, max_output),
                                 c.name, c.ttft_slo_ms, c.tbt_slo_ms))
    load = (f"closed loop of {concurrency}" if arrival == "concurrency" else
            f"{arrival} at {qps:g} QPS" + (f", burstiness {burstiness:g}" if arrival == "gamma" else ""))
    # The trace's own lengths where some class draws them.
    lengths = [f"{what} {dist} tokens" for what, dist, own in (
        ("prompt", prompt, [c.prompt for c in classes]),
        ("output", output, [c.output for c in classes])) if not (own and all(own))]
    desc = f"{num_requests} requests, {load}" + (f"; {', '.join(lengths)}" if lengths else "")
    if classes:
        desc += "; SLO classes " + ", ".join(map(str, classes))
    return Trace(tuple(reqs), seed, desc, concurrency if arrival == "concurrency" else None)


def _draw(classes: Sequence[SLOClass], rng: random.Random) -> SLOClass:
    u, acc = rng.random(), 0.0
    for c in classes:
        acc += c.share
        if u < acc:
            return c
    return classes[-1]  # u within rounding of 1


def load_csv(path: str | Path, seed: int = 0) -> Trace:
    """A trace from a CSV with the header `arrival,prompt_tokens,output_tokens`
    (seconds from the start, then whole token counts >= 1), in arrival order, optionally
    followed by any of the columns `slo_class,ttft_slo_ms,tbt_slo_ms` (an empty cell:
    the request states none)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise TraceError(f"trace file {path}: {e.strerror or e}") from None
    rows = csv.reader(text.splitlines())
    header = [h.strip().lower() for h in next(rows, [])]
    extra = header[3:]
    if header[:3] != list(CSV_COLUMNS) or not set(extra) <= set(CSV_SLO_COLUMNS) or len(
            set(extra)) != len(extra):
        raise TraceError(f"trace file {path}: line 1 must be the header "
                         f"{','.join(CSV_COLUMNS)}, optionally followed by any of "
                         f"{','.join(CSV_SLO_COLUMNS)}, got {','.join(header) or 'nothing'}")
    reqs, last = [], 0.0
    for line, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise TraceError(f"trace file {path}, line {line}: {len(header)} values expected, "
                             f"got {len(row)}")
        try:
            arrival, p, o = float(row[0]), int(row[1]), int(row[2])
        except ValueError:
            raise TraceError(f"trace file {path}, line {line}: {','.join(row)!r} is not "
                             f"(seconds, whole tokens, whole tokens)") from None
        if not (math.isfinite(arrival) and arrival >= 0) or p < 1 or o < 1:
            raise TraceError(f"trace file {path}, line {line}: arrival must be >= 0 and token "
                             f"counts >= 1, got {','.join(row)}")
        if arrival < last:
            raise TraceError(f"trace file {path}, line {line}: arrival {arrival} is before the "
                             f"previous row's {last}; rows must be in arrival order")
        last = arrival
        slos = _csv_slos(dict(zip(extra, row[3:])), f"trace file {path}, line {line}")
        reqs.append(TraceRequest(arrival, p, o, *slos))
    if not reqs:
        raise TraceError(f"trace file {path}: no requests after the header")
    return Trace(tuple(reqs), seed, f"{len(reqs)} requests from {path.name}")


def _csv_slos(cells: dict[str, str], where: str) -> tuple:
    """(slo_class, ttft_slo_ms, tbt_slo_ms) of one CSV row; None for an empty or absent cell."""
    name = cells.get(slo.XARG_CLASS, "").strip() or None
    if name is not None:
        class_name(name, f"{where}, column {slo.XARG_CLASS}")
    values = []
    for column in (slo.XARG_TTFT, slo.XARG_TBT):
        text = cells.get(column, "").strip()
        try:
            values.append(round(slo.milliseconds(column, text) * 1e3, 6) if text else None)
        except slo.SLOError as e:
            raise TraceError(f"{where}, column {e}") from None
    return (name, *values)

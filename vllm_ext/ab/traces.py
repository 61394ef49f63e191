"""Seeded request traces: when each request arrives and how many tokens it reads and writes.

Every arm of an A/B run replays the same trace, so differences come from the arm,
not the traffic. A trace is built from an arrival process and two length
distributions, or read from a CSV of (arrival, prompt_tokens, output_tokens).
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

ARRIVALS = ("poisson", "gamma", "concurrency")
LENGTH_FORMS = "N | fixed:N | uniform:LO:HI | lognormal:MEDIAN[:SIGMA]"
CSV_COLUMNS = ("arrival", "prompt_tokens", "output_tokens")


class TraceError(ValueError):
    """A trace specification or trace file that cannot be used; says what is allowed."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival: float  # seconds after the trace starts; 0 for every request of a closed loop
    prompt_tokens: int
    output_tokens: int


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

    def to_dict(self) -> dict:
        return {"seed": self.seed, "description": self.description,
                "concurrency": self.concurrency,
                "requests": [[r.arrival, r.prompt_tokens, r.output_tokens] for r in self.requests]}


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


def synthesize(num_requests: int, arrival: str, prompt: LengthDist, output: LengthDist,
               seed: int, qps: float | None = None, burstiness: float = 1.0,
               concurrency: int | None = None, max_prompt: int = 1 << 30,
               max_output: int = 1 << 30) -> Trace:
    """`num_requests` requests with Poisson or gamma (bursty) arrivals at `qps`, or all
    at time 0 for a closed loop of `concurrency`.

    Gamma inter-arrival times have mean 1/qps and coefficient of variation
    `burstiness` (1 is Poisson; above 1, bursts and lulls).
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

    # Separate streams so that changing a length distribution leaves arrivals alone.
    arrivals_rng, lengths_rng = random.Random(f"{seed}/arrivals"), random.Random(f"{seed}/lengths")
    times, now = [], 0.0
    for _ in range(num_requests):
        times.append(now)
        if arrival == "poisson":
            now += arrivals_rng.expovariate(qps)
        elif arrival == "gamma":
            shape = 1.0 / burstiness**2
            now += arrivals_rng.gammavariate(shape, 1.0 / (qps * shape))
    reqs = tuple(TraceRequest(round(t, 6), prompt.sample(lengths_rng, max_prompt),
                              output.sample(lengths_rng, max_output)) for t in times)
    load = (f"closed loop of {concurrency}" if arrival == "concurrency" else
            f"{arrival} at {qps:g} QPS" + (f", burstiness {burstiness:g}" if arrival == "gamma" else ""))
    desc = f"{num_requests} requests, {load}; prompt {prompt} tokens, output {output} tokens"
    return Trace(reqs, seed, desc, concurrency if arrival == "concurrency" else None)


def load_csv(path: str | Path, seed: int = 0) -> Trace:
    """A trace from a CSV with the header `arrival,prompt_tokens,output_tokens`
    (seconds from the start, then whole token counts >= 1), in arrival order."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise TraceError(f"trace file {path}: {e.strerror or e}") from None
    rows = csv.reader(text.splitlines())
    header = [h.strip().lower() for h in next(rows, [])]
    if header != list(CSV_COLUMNS):
        raise TraceError(f"trace file {path}: line 1 must be the header "
                         f"{','.join(CSV_COLUMNS)}, got {','.join(header) or 'nothing'}")
    reqs, last = [], 0.0
    for line, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 3:
            raise TraceError(f"trace file {path}, line {line}: 3 values expected, got {len(row)}")
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
        reqs.append(TraceRequest(arrival, p, o))
    if not reqs:
        raise TraceError(f"trace file {path}: no requests after the header")
    return Trace(tuple(reqs), seed, f"{len(reqs)} requests from {path.name}")

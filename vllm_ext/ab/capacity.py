"""Capacity: the highest request rate an arm sustains within its latency targets,
found by bisection over Poisson QPS (Sarathi-Serve's method: P99 TBT within the SLO
and P50 scheduling delay within a bound)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class Probe:
    qps: float
    tbt_p99_ms: float
    sched_delay_p50_s: float | None  # None when the server does not export it
    failed_requests: int
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self, arm: str) -> str:
        """The probe's progress line, as both capacity searches print it."""
        delay = "n/a" if self.sched_delay_p50_s is None else f"{self.sched_delay_p50_s:.2f} s"
        return (f"[{arm}] capacity probe {self.qps:.3g} QPS: TBT P99 {self.tbt_p99_ms:.0f} ms, "
                f"scheduling delay P50 {delay} -> {'pass' if self.passed else 'fail'}")


@dataclass(frozen=True, slots=True)
class CapacityTarget:
    tbt_p99_ms: float
    sched_delay_p50_s: float = 2.0

    def judge(self, qps: float, tbt_p99_ms: float, sched_delay_p50_s: float | None,
              failed_requests: int) -> Probe:
        ok = (failed_requests == 0 and tbt_p99_ms <= self.tbt_p99_ms
              and (sched_delay_p50_s is None or sched_delay_p50_s <= self.sched_delay_p50_s))
        return Probe(qps, tbt_p99_ms, sched_delay_p50_s, failed_requests, ok)


@dataclass(frozen=True, slots=True)
class Capacity:
    """The bracket the bisection ended with: `qps` passed (None: nothing probed passed,
    the capacity is below `low`), `ceiling` failed (None: nothing failed, the capacity
    is at least `qps`)."""

    qps: float | None
    ceiling: float | None
    probes: tuple[Probe, ...]

    def describe(self) -> str:
        if self.qps is None:
            return f"< {min(p.qps for p in self.probes):.3g} QPS (no probe passed)"
        if self.ceiling is None:
            return f">= {self.qps:.3g} QPS (no probe failed)"
        return f"{self.qps:.3g} QPS (fails at {self.ceiling:.3g})"

    def to_dict(self) -> dict:
        return {"qps": self.qps, "ceiling": self.ceiling, "describe": self.describe(),
                "probes": [p.to_dict() for p in self.probes]}


def bisect_capacity(probe: Callable[[float], Probe], low: float, high: float,
                    iterations: int, on_probe: Callable[[Probe], None] | None = None) -> Capacity:
    """Probe `iterations` rates, each the geometric midpoint of the current bracket
    [low, high] (rates span orders of magnitude, so halve the ratio, not the
    difference); a pass raises the floor, a failure lowers the ceiling."""
    if not (0 < low < high) or iterations < 1:
        raise ValueError(f"capacity search needs 0 < low < high and iterations >= 1, "
                         f"got low={low}, high={high}, iterations={iterations}")
    probes, best, ceiling = [], None, None
    lo, hi = low, high
    for _ in range(iterations):
        qps = math.sqrt(lo * hi)
        result = probe(qps)
        probes.append(result)
        if on_probe is not None:
            on_probe(result)
        if result.passed:
            best, lo = qps, qps
        else:
            ceiling, hi = qps, qps
    return Capacity(best, ceiling, tuple(probes))

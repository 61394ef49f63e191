"""Confidence intervals on the difference between two arms run on paired traces.

Arms replay the same seeded traces, so request i of seed s is the same request in
both. The bootstrap resamples request indices within each seed and applies the
same indices to both arms: the interval then reflects which requests happened to
be drawn, not a mismatch of traffic between arms.
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vllm_ext.ab.metron import Timeline


@dataclass(frozen=True, slots=True)
class Interval:
    estimate: float  # compare(metric(arm), metric(base)) on the data as run: the difference
    low: float
    high: float
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level}


def paired_bootstrap(base: Sequence[Sequence[Timeline]], arm: Sequence[Sequence[Timeline]],
                     metric: Callable[[Sequence[Timeline]], float], iterations: int = 1000,
                     level: float = 0.95, seed: int = 0,
                     compare: Callable[[float, float], float] = operator.sub) -> Interval:
    """Percentile-bootstrap interval of compare(metric(arm), metric(base)), by default
    their difference (a ratio must say what a zero base gives); `base[s][i]` and `arm[s][i]` are
    request i of seed s in each arm (timelines, or any per-request records `metric`
    takes)."""
    if len(base) != len(arm) or any(len(b) != len(a) for b, a in zip(base, arm)):
        raise ValueError("paired bootstrap needs the same seeds and requests in both arms")

    def diff(picks: Sequence[Sequence[int]]) -> float:
        pick = lambda runs: [runs[s][i] for s, idx in enumerate(picks) for i in idx]
        return compare(metric(pick(arm)), metric(pick(base)))

    rng = random.Random(seed)
    estimate = diff([range(len(run)) for run in base])
    draws = sorted(d for d in (diff([[rng.randrange(len(run)) for _ in run] for run in base])
                               for _ in range(iterations)) if not math.isnan(d))
    if not draws:
        return Interval(estimate, math.nan, math.nan, level)
    tail = (1 - level) / 2
    at = lambda q: draws[min(len(draws) - 1, max(0, round(q * (len(draws) - 1))))]
    return Interval(estimate, at(tail), at(1 - tail), level)

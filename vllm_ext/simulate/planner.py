"""The capacity planner's question: the fewest replicas of an arm that carry a given
request rate within the SLOs.

A count is probed on a Poisson trace at the target rate with a fixed number of
requests per replica, so that each replica sees about as long a run as a capacity probe
gives one engine, whatever the count; the traces for different counts share one seed,
so a larger count's trace extends a smaller one's. Short probes flatter: an overloaded
replica needs time to build its queue, and a P99 over few requests misses the
long-prompt tail. A count carries the rate when every request completes, P99
TTFT is within the TTFT SLO, and the capacity search's own rule holds (P99 TBT within
its SLO, P50 scheduling delay within its bound; `vllm_ext.ab.capacity`).

A probe costs about its count times one replica's, so the search spends few probes on
large counts: it first bisects the rate one replica carries (cheap), and starts from the
count that rate implies. More replicas need not always do better on one trace: a router
can send the longest prompts of a burst to one replica at one count and spread them at
another. The search assumes they do only to choose what to probe next. It ends on a
count N that passed with N - 1 probed and failed, and checks the assumption where it
matters: unless a larger count was already probed, N + 1 is probed too, and any larger
count that failed where a smaller one passed is reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from vllm_ext.ab.capacity import CapacityTarget

RATE_PROBES = 7  # bisecting one replica's rate over [Q / max replicas, Q]: within 1-4%


@dataclass(frozen=True, slots=True)
class ReplicaTarget:
    """What a count must carry: `qps` within the SLOs, with at most `max_replicas`."""

    qps: float
    max_replicas: int
    requests_per_replica: int
    slo: CapacityTarget  # P99 TBT and P50 scheduling delay, as the capacity search judges
    ttft_p99_s: float

    def describe(self) -> str:
        return (f"{self.qps:g} QPS (Poisson) with every request completed, TTFT P99 <= "
                f"{self.ttft_p99_s:g} s, TBT P99 <= {self.slo.tbt_p99_ms:g} ms and P50 "
                f"scheduling delay <= {self.slo.sched_delay_p50_s:g} s; each count probed "
                f"with {self.requests_per_replica} requests per replica, up to "
                f"{self.max_replicas} replicas")

    def judge(self, replicas: int, qps: float, summary: dict, sched_delay_p50_s: float,
              wall_s: float) -> CountProbe:
        misses = []
        if summary["failed"]:
            misses.append(f"{summary['failed']} requests failed")
        if not summary["ttft_p99_s"] <= self.ttft_p99_s:
            misses.append(f"TTFT P99 {summary['ttft_p99_s']:.2f} s")
        if not summary["tbt_p99_ms"] <= self.slo.tbt_p99_ms:
            misses.append(f"TBT P99 {summary['tbt_p99_ms']:.0f} ms")
        if not sched_delay_p50_s <= self.slo.sched_delay_p50_s:
            misses.append(f"scheduling delay P50 {sched_delay_p50_s:.2f} s")
        # The capacity search's own verdict, so both searches keep one rule.
        passed = self.slo.judge(qps, summary["tbt_p99_ms"], sched_delay_p50_s,
                                summary["failed"]).passed and not misses
        return CountProbe(replicas, qps, passed, "; ".join(misses), summary["requests"],
                          summary["ttft_p50_s"], summary["ttft_p99_s"], summary["tbt_p50_ms"],
                          summary["tbt_p99_ms"], sched_delay_p50_s, wall_s)


@dataclass(frozen=True, slots=True)
class CountProbe:
    replicas: int
    qps: float
    passed: bool
    missed: str  # what was out of bounds ('' when it passed)
    requests: int
    ttft_p50_s: float
    ttft_p99_s: float
    tbt_p50_ms: float
    tbt_p99_ms: float
    sched_delay_p50_s: float
    wall_s: float  # how long simulating it took

    def line(self, arm: str) -> str:
        return (f"[{arm}] {self.replicas} replica{'s' * (self.replicas > 1)} at {self.qps:.3g} "
                f"QPS: TTFT P99 {self.ttft_p99_s:.2f} s, TBT P99 {self.tbt_p99_ms:.0f} ms -> "
                + ("pass" if self.passed else f"fail ({self.missed})"))


@dataclass
class ReplicaSearch:
    """The probes a search made, in order, and its answer."""

    rates: list[CountProbe] = field(default_factory=list)  # one replica, rate bisected
    probes: list[CountProbe] = field(default_factory=list)  # counts at the target rate
    one_replica_qps: float | None = None  # the highest rate one replica passed at
    needed: int | None = None  # None: more than the search's bound

    def at(self, n: int) -> CountProbe | None:
        return next((p for p in self.probes if p.replicas == n), None)

    def contradictions(self) -> list[tuple[int, int]]:
        """(smaller count that passed, larger count that failed): where more replicas
        did worse on this trace."""
        passed = sorted(p.replicas for p in self.probes if p.passed)
        failed = sorted(p.replicas for p in self.probes if not p.passed)
        return [(s, b) for s in passed for b in failed if b > s]

    def to_dict(self) -> dict:
        return {"needed": self.needed, "one_replica_qps": self.one_replica_qps,
                "contradictions": self.contradictions(),
                "rates": [asdict(p) for p in self.rates],
                "probes": [asdict(p) for p in self.probes]}


def fewest_replicas(probe: Callable[[int, float], CountProbe], qps: float, max_replicas: int,
                    on_probe: Callable[[CountProbe], None] | None = None,
                    rate_probes: int = RATE_PROBES) -> ReplicaSearch:
    """The fewest replicas, 1..`max_replicas`, whose probe at `qps` passes, with the
    count below it probed and failed. `probe(n, rate)` simulates n replicas at a rate.

    First the rate one replica carries, bisected geometrically over [qps / max_replicas,
    qps]; qps over that rate is the first guess (a balanced fleet smooths each replica's
    arrivals, so it rarely needs more). From the guess, steps of 1, 2, 4, ... down while
    probes pass, or up while they fail, bracket the answer; bisection closes the bracket.
    Then one more replica than the answer is probed, if no larger count was, to see that
    more replicas still carry the rate."""
    if max_replicas < 1:
        raise ValueError(f"max_replicas must be >= 1, got {max_replicas}")
    search = ReplicaSearch()

    def run(n: int, rate: float, into: list[CountProbe]) -> CountProbe:
        p = probe(n, rate)
        into.append(p)
        if on_probe is not None:
            on_probe(p)
        return p

    def passes(n: int) -> bool:
        known = search.at(n)
        return (known or run(n, qps, search.probes)).passed

    low, high = qps / max_replicas, qps
    for _ in range(rate_probes if max_replicas > 1 else 0):
        rate = math.sqrt(low * high)
        if run(1, rate, search.rates).passed:
            search.one_replica_qps = low = rate
        else:
            high = rate
    best = search.one_replica_qps
    guess = max_replicas if best is None else min(max_replicas, max(1, math.ceil(qps / best)))
    lo, hi = 0, None  # lo failed (0 replicas carry nothing); hi passed
    if passes(guess):
        hi, step = guess, 1
        while hi - step > lo:  # down while passing
            if not passes(hi - step):
                lo = hi - step
                break
            hi, step = hi - step, step * 2
    else:
        lo, step = guess, 1
        while hi is None:  # up while failing
            if lo == max_replicas:
                return search  # more than the bound
            n = min(lo + step, max_replicas)
            if passes(n):
                hi = n
            else:
                lo, step = n, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    search.needed = hi
    if hi < max_replicas and not any(p.replicas > hi for p in search.probes):
        passes(hi + 1)
    return search

"""One arm's figures from its request records: latency percentiles, throughput,
deadlines and goodput (Metron's definitions, see metron.py); and, when the trace gave
requests SLOs, the same per SLO class, each request judged by its own deadlines."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vllm_ext.ab.client import RequestRecord
from vllm_ext.ab.metron import Timeline, deadline_misses, percentile, pooled_gaps
from vllm_ext.ab.traces import counted_class


@dataclass(frozen=True, slots=True)
class SLO:
    """Service-level objectives used for deadlines, fluidity and goodput."""

    ttft_s: float = 2.0  # first-token deadline slack (Metron's TTFT slack)
    tbt_ms: float = 100.0  # deadline of every later token; goodput's TPOT bound too
    # Predicted prefill time per prompt token, added to the first-token deadline
    # (Metron's D_p = predicted prefill time + TTFT slack); 0 leaves the slack alone.
    prefill_ms_per_token: float = 0.0

    def ttft_deadline(self, prompt_tokens: int) -> float:
        return self.ttft_s + prompt_tokens * self.prefill_ms_per_token / 1e3

    def deadlines(self, r: RequestRecord) -> tuple[float, float]:
        """(first-token, later-token) deadlines of one request in seconds: the ones its
        trace gave it, else these; the prefill allowance is added to either TTFT."""
        ttft = self.ttft_s if r.ttft_slo_ms is None else r.ttft_slo_ms / 1e3
        tbt = self.tbt_ms if r.tbt_slo_ms is None else r.tbt_slo_ms
        return ttft + r.prompt_tokens * self.prefill_ms_per_token / 1e3, tbt / 1e3

    def describe(self) -> str:
        d = f"TTFT <= {self.ttft_s:g} s"
        if self.prefill_ms_per_token:
            d += f" + {self.prefill_ms_per_token:g} ms per prompt token"
        return d + f", TBT <= {self.tbt_ms:g} ms"


def _pct(values: Sequence[float], q: float, scale: float = 1.0) -> float:
    return scale * percentile(values, q) if len(values) else math.nan


def _defined(values) -> list[float]:
    return [v for v in values if v is not None]


def ttfts(tls: Sequence[Timeline]) -> list[float]:
    return _defined(tl.ttft for tl in tls)


def tpots(tls: Sequence[Timeline]) -> list[float]:
    return _defined(tl.tpot for tl in tls)


# Headline metrics as functions of a list of timelines, so that the bootstrap can
# recompute them on resampled requests: key -> (label, function, lower is better).
HEADLINE: dict[str, tuple[str, Callable[[Sequence[Timeline]], float], bool]] = {
    "ttft_p50_s": ("TTFT P50 (s)", lambda tls: _pct(ttfts(tls), 50), True),
    "ttft_p99_s": ("TTFT P99 (s)", lambda tls: _pct(ttfts(tls), 99), True),
    "tbt_p50_ms": ("TBT P50 (ms)", lambda tls: _pct(pooled_gaps(tls), 50, 1e3), True),
    "tbt_p99_ms": ("TBT P99 (ms)", lambda tls: _pct(pooled_gaps(tls), 99, 1e3), True),
    "tpot_p50_ms": ("TPOT P50 (ms)", lambda tls: _pct(tpots(tls), 50, 1e3), True),
}


def summarize(runs: Sequence[Sequence[RequestRecord]], slo: SLO) -> dict:
    """Figures pooled over `runs` (one per seed): percentiles over all requests of all
    runs, throughput as all output tokens over the runs' summed durations."""
    records = [r for run in runs for r in run]
    tls = [r.timeline() for r in records]
    done = [tl for tl in tls if tl.completed]
    gaps = pooled_gaps(tls)
    max_gaps = [max(g) for g in (tl.gaps for tl in tls) if g]
    norm = _defined(tl.normalized_latency for tl in tls)
    tpot = tpots(tls)

    duration = sum(_span(run) for run in runs)
    tokens = sum(tl.num_tokens for tl in tls)
    missed = total = good = 0
    fluidity = []
    for r, tl in zip(records, tls):
        ttft_deadline, tbt_deadline = slo.deadlines(r)
        m, t = deadline_misses(tl, ttft_deadline, tbt_deadline)
        missed, total = missed + m, total + t
        if t:
            fluidity.append(1.0 - m / t)
        good += (tl.completed and tl.ttft is not None and tl.ttft <= ttft_deadline
                 and (tl.tpot is None or tl.tpot <= tbt_deadline))

    out = {
        "requests": len(records), "completed": len(done), "failed": len(records) - len(done),
        "output_tokens": tokens, "duration_s": duration,
        **{key: fn(tls) for key, (_, fn, _) in HEADLINE.items()},
        "ttft_p90_s": _pct(ttfts(tls), 90), "ttft_mean_s": _mean(ttfts(tls)),
        "tbt_p90_ms": _pct(gaps, 90, 1e3), "tbt_p999_ms": _pct(gaps, 99.9, 1e3),
        "tbt_max_ms": 1e3 * float(gaps.max()) if len(gaps) else math.nan,
        "req_max_tbt_p50_ms": _pct(max_gaps, 50, 1e3), "req_max_tbt_p99_ms": _pct(max_gaps, 99, 1e3),
        "tpot_p90_ms": _pct(tpot, 90, 1e3), "tpot_p99_ms": _pct(tpot, 99, 1e3),
        "tpot_mean_ms": 1e3 * _mean(tpot),
        "norm_latency_p50_ms": _pct(norm, 50, 1e3), "norm_latency_p99_ms": _pct(norm, 99, 1e3),
        "req_per_s": len(done) / duration if duration else math.nan,
        "out_tok_per_s": tokens / duration if duration else math.nan,
        "deadline_miss_rate": missed / total if total else math.nan,
        "fluidity_mean": _mean(fluidity),
        "fluid_requests": (sum(f >= 0.9 for f in fluidity) / len(fluidity)) if fluidity else math.nan,
        "goodput_req_s": good / duration if duration else math.nan,
        "client_lag_p99_s": _pct([r.sent - r.scheduled for r in records], 99),
        "token_count_mismatches": sum(1 for r, tl in zip(records, tls)
                                      if r.usage_tokens is not None and r.usage_tokens != tl.num_tokens),
    }
    if states_slos(runs):
        out["per_class"] = summarize_classes(runs, slo)
    return out


# Per SLO class ---------------------------------------------------------------------------

def states_slos(runs: Sequence[Sequence[RequestRecord]]) -> bool:
    """Whether any request was given an SLO by its trace (then figures per class follow)."""
    return any(r.slo_class is not None or r.ttft_slo_ms is not None or r.tbt_slo_ms is not None
               for run in runs for r in run)


@dataclass(frozen=True, slots=True)
class Judged:
    """One request as its own deadlines judge it: what the per-class figures, and their
    bootstrap, are computed from."""

    tl: Timeline
    missed: int  # Metron's deadline misses, of
    total: int  # its token deadlines
    per_s: float  # 1 / the arm's duration (all seeds): what one good request adds to goodput

    @property
    def good(self) -> bool:
        """Completed with every token within its deadline."""
        return self.tl.completed and self.total > 0 and self.missed == 0


def judge(runs: Sequence[Sequence[RequestRecord]], slo: SLO) -> list[list[Judged]]:
    """Every request of every run (one per seed), in order, judged by its own deadlines."""
    duration = sum(_span(run) for run in runs)
    per_s = 1.0 / duration if duration else math.nan
    out = []
    for run in runs:
        judged = []
        for r in run:
            tl = r.timeline()
            judged.append(Judged(tl, *deadline_misses(tl, *slo.deadlines(r)), per_s))
        out.append(judged)
    return out


def _miss_rate(js: Sequence[Judged]) -> float:
    total = sum(j.total for j in js)
    return sum(j.missed for j in js) / total if total else math.nan


def _tls(js: Sequence[Judged]) -> list[Timeline]:
    return [j.tl for j in js]


# Per-class metrics as functions of judged requests, bootstrapped per class against the
# base arm: key -> (label, function, lower is better).
CLASS_METRICS: dict[str, tuple[str, Callable[[Sequence[Judged]], float], bool]] = {
    "ttft_p99_s": ("TTFT P99 (s)", lambda js: _pct(ttfts(_tls(js)), 99), True),
    "tbt_p99_ms": ("TBT P99 (ms)", lambda js: _pct(pooled_gaps(_tls(js)), 99, 1e3), True),
    "deadline_miss_rate": ("deadline miss rate", _miss_rate, True),
    "goodput_req_s": ("goodput (req/s)", lambda js: sum(j.per_s for j in js if j.good), False),
}


def class_items(runs: Sequence[Sequence[RequestRecord]], items: Sequence[Sequence]) -> dict:
    """class -> per run, the items (judged requests, timelines, ...) of that class's
    requests, in request order: request i of seed s is in the same class in every arm,
    so these lists pair up for the bootstrap. Classes in order of first appearance."""
    out: dict[str, list[list]] = {}
    for s, (run, its) in enumerate(zip(runs, items)):
        for r, item in zip(run, its):
            out.setdefault(counted_class(r), [[] for _ in runs])[s].append(item)
    return out


def summarize_classes(runs: Sequence[Sequence[RequestRecord]], slo: SLO) -> dict[str, dict]:
    """Per class (as requests are counted: their class's name, `custom` for their own
    deadlines without a class, `default` for none): requests, the deadlines they were
    judged by, TTFT and TBT P50/P99, Metron's deadline miss rate, SLO attainment (the
    share of requests completed with no deadline missed), goodput (those per second of
    the arm's duration, all seeds) and output tokens per second of that duration."""
    judged = judge(runs, slo)
    deadlines = class_items(runs, [[slo.deadlines(r) for r in run] for run in runs])
    out = {}
    for name, per_run in class_items(runs, judged).items():
        js = [j for run in per_run for j in run]
        tls = _tls(js)
        gaps = pooled_gaps(tls)
        slos = {d for run in deadlines[name] for d in run}
        ttft, tbt = next(iter(slos)) if len(slos) == 1 else (None, None)
        per_s = js[0].per_s
        out[name] = {
            "requests": len(js), "completed": sum(j.tl.completed for j in js),
            # The deadlines its requests were judged by; None where they differ.
            "ttft_deadline_s": ttft, "tbt_deadline_ms": None if tbt is None else tbt * 1e3,
            "ttft_p50_s": _pct(ttfts(tls), 50), "ttft_p99_s": _pct(ttfts(tls), 99),
            "tbt_p50_ms": _pct(gaps, 50, 1e3), "tbt_p99_ms": _pct(gaps, 99, 1e3),
            "deadline_miss_rate": _miss_rate(js),
            "slo_attainment": sum(j.good for j in js) / len(js),
            "goodput_req_s": sum(j.per_s for j in js if j.good),
            "out_tok_per_s": sum(tl.num_tokens for tl in tls) * per_s,
        }
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _span(run: Sequence[RequestRecord]) -> float:
    """From the first request sent to the last token received."""
    starts = [r.sent for r in run if not math.isnan(r.sent)]
    ends = [r.events[-1][0] for r in run if r.events]
    return max(ends) - min(starts) if starts and ends else 0.0

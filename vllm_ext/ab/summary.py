"""One arm's figures from its request records: latency percentiles, throughput,
deadlines and goodput (Metron's definitions, see metron.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vllm_ext.ab.client import RequestRecord
from vllm_ext.ab.metron import Timeline, deadline_misses, percentile, pooled_gaps


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
    missed = total = 0
    fluidity = []
    for r, tl in zip(records, tls):
        m, t = deadline_misses(tl, slo.ttft_deadline(r.prompt_tokens), slo.tbt_ms / 1e3)
        missed, total = missed + m, total + t
        if t:
            fluidity.append(1.0 - m / t)
    good = sum(1 for r, tl in zip(records, tls) if tl.completed and tl.ttft is not None
               and tl.ttft <= slo.ttft_deadline(r.prompt_tokens)
               and (tl.tpot is None or tl.tpot <= slo.tbt_ms / 1e3))

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
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _span(run: Sequence[RequestRecord]) -> float:
    """From the first request sent to the last token received."""
    starts = [r.sent for r in run if not math.isnan(r.sent)]
    ends = [r.events[-1][0] for r in run if r.events]
    return max(ends) - min(starts) if starts and ends else 0.0

"""Read histograms from a server's Prometheus /metrics text, and quantiles of the
observations made between two scrapes (what a run added)."""

from __future__ import annotations

import math
import re

_SAMPLE = re.compile(r'^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)')
_LE = re.compile(r'(?:^|,)\s*le="([^"]*)"')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def histogram(text: str | None, name: str) -> dict[float, float] | None:
    """Cumulative bucket counts {upper bound: count} of histogram `name`, summed over
    all its label sets (engines, models); None if the text lacks it."""
    if not text:
        return None
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != f"{name}_bucket":
            continue
        le = _LE.search(m.group(2) or "")
        if le is None:
            continue
        bound = math.inf if le.group(1) in ("+Inf", "Inf") else float(le.group(1))
        buckets[bound] = buckets.get(bound, 0.0) + float(m.group(3))
    return buckets or None


def counter(text: str | None, name: str) -> float | None:
    """Counter `name` (with or without its `_total` suffix) summed over label sets."""
    if not text:
        return None
    total, seen = 0.0, False
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) in (name, f"{name}_total"):
            total, seen = total + float(m.group(3)), True
    return total if seen else None


def samples(text: str | None, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of series `name` (exact, suffix included): its labels and value."""
    found = []
    for line in (text or "").splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == name:
            found.append((dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return found


def by_label(text: str | None, name: str, label: str) -> dict[str, float]:
    """Counter or gauge `name` summed per value of one label (e.g. vLLM's `engine`)."""
    out: dict[str, float] = {}
    for labels, value in samples(text, name):
        key = labels.get(label, "")
        out[key] = out.get(key, 0.0) + value
    return out


def delta(before: dict[float, float] | None, after: dict[float, float] | None):
    if after is None:
        return None
    before = before or {}
    return {b: c - before.get(b, 0.0) for b, c in after.items()}


def add(a: dict[float, float] | None, b: dict[float, float] | None):
    if a is None or b is None:
        return b if a is None else a
    return {k: a.get(k, 0.0) + v for k, v in b.items()}


def quantile(buckets: dict[float, float] | None, q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation inside the bucket that holds it,
    as Prometheus' histogram_quantile does; exact at bucket bounds. None without data;
    the largest finite bound if the quantile falls in the +Inf bucket."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lo_bound, lo_count = 0.0, 0.0
    for b in bounds:
        count = buckets[b]
        if count >= rank:
            if math.isinf(b):
                return lo_bound
            width = count - lo_count
            return b if width <= 0 else lo_bound + (b - lo_bound) * (rank - lo_count) / width
        lo_bound, lo_count = b, count
    return bounds[-1]

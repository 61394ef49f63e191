"""What a vLLM server's /metrics saw of a replay: the scheduling delays (time from
arrival to first scheduling), prefix-cache hits and, under a vllm-ext scheduler, the
engine's steps, their summed time and the decodes it deferred for a stricter SLO class,
as differences between scrapes; and, per engine (vLLM's `engine` label: a
data-parallel rank), the load each took and the steps it ran."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vllm_ext.ab import promtext
from vllm_ext.ab.client import get_text

QUEUE_TIME_METRIC = "vllm:request_queue_time_seconds"
# Per engine: what vLLM's router gave it, and what it ran (vllm-ext schedulers only).
ENGINE_COUNTERS = {"requests": "vllm:request_success_total",
                   "prompt_tokens": "vllm:prompt_tokens_total",
                   "generation_tokens": "vllm:generation_tokens_total",
                   "steps": "vllm_ext_steps_total", "step_s": "vllm_ext_step_seconds_sum"}


@dataclass
class ServerView:
    """What the server's /metrics saw of a replay (None where it does not export it)."""

    queue_time: dict | None = None  # scheduling-delay histogram, observations of the replay
    cache_hits: float | None = None  # prefix-cache tokens hit / queried during the replay
    cache_queries: float | None = None
    steps: float | None = None  # engine steps (vllm-ext schedulers only)
    step_seconds: float | None = None  # their wall time, summed
    decodes_deferred: float | None = None  # --scheduler mnemosyne with per-request SLOs
    # engine label -> ENGINE_COUNTERS name -> value (only the counters the server exports)
    engines: dict[str, dict[str, float]] | None = None

    @classmethod
    def scrape(cls, url: str) -> "ServerView":
        text = get_text(f"{url}/metrics")
        return cls(promtext.histogram(text, QUEUE_TIME_METRIC),
                   promtext.counter(text, "vllm:prefix_cache_hits"),
                   promtext.counter(text, "vllm:prefix_cache_queries"),
                   promtext.counter(text, "vllm_ext_steps"),
                   promtext.counter(text, "vllm_ext_step_seconds_sum"),
                   promtext.counter(text, "vllm_ext_decodes_deferred"),
                   _per_engine(text))

    def since(self, before: "ServerView") -> "ServerView":
        sub = lambda a, b: None if a is None else a - (b or 0.0)
        return ServerView(promtext.delta(before.queue_time, self.queue_time),
                          sub(self.cache_hits, before.cache_hits),
                          sub(self.cache_queries, before.cache_queries),
                          sub(self.steps, before.steps),
                          sub(self.step_seconds, before.step_seconds),
                          sub(self.decodes_deferred, before.decodes_deferred),
                          _engines_since(self.engines, before.engines))

    def __add__(self, other: "ServerView") -> "ServerView":
        add = lambda a, b: b if a is None else a if b is None else a + b
        return ServerView(promtext.add(self.queue_time, other.queue_time),
                          add(self.cache_hits, other.cache_hits),
                          add(self.cache_queries, other.cache_queries),
                          add(self.steps, other.steps),
                          add(self.step_seconds, other.step_seconds),
                          add(self.decodes_deferred, other.decodes_deferred),
                          _engines_sum(self.engines, other.engines))

    def figures(self) -> dict:
        delay = promtext.quantile(self.queue_time, 0.5)
        hit = self.cache_hits / self.cache_queries if self.cache_queries else None
        nan = lambda x: math.nan if x is None else x
        return {"sched_delay_p50_s": nan(delay), "prefix_cache_hit_rate": nan(hit),
                "engine_steps": nan(self.steps), "engine_step_s": nan(self.step_seconds),
                "decodes_deferred": nan(self.decodes_deferred),
                "per_engine": self.engines or {}}


def _per_engine(text: str | None) -> dict[str, dict[str, float]] | None:
    out: dict[str, dict[str, float]] = {}
    for field, metric in ENGINE_COUNTERS.items():
        for engine, value in promtext.by_label(text, metric, "engine").items():
            out.setdefault(engine, {})[field] = value
    return out or None


def _engines_since(after, before):
    if after is None:
        return None
    before = before or {}
    return {e: {f: v - before.get(e, {}).get(f, 0.0) for f, v in fields.items()}
            for e, fields in after.items()}


def _engines_sum(a, b):
    if a is None or b is None:
        return b if a is None else a
    out = {e: dict(fields) for e, fields in a.items()}
    for e, fields in b.items():
        for f, v in fields.items():
            out.setdefault(e, {})[f] = out.get(e, {}).get(f, 0.0) + v
    return out

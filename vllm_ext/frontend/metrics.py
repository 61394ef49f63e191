"""vllm-ext's per-step scheduler statistics on vLLM's `/metrics` and in Python.

Engine processes write step logs (`vllm_ext.schedulers.steplog`) into the
directory named by VLLMEXT_STATS_DIR. The front-end process creates that
directory before it spawns the engine, so the engine inherits it, and registers a
Prometheus collector that reads the logs at scrape time.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from vllm_ext import envs
from vllm_ext.schedulers.steplog import StepStats, read_dir

PREFIX = "vllm_ext_"
_COUNTERS = {
    "decode_tokens": "Decode tokens scheduled",
    "prefill_tokens": "Prompt tokens scheduled",
    "prefill_reqs": "Prefill chunks scheduled (one per request per step)",
    "partial_prefills": "Prefill chunks that left their prompt unfinished",
    "preempted": "Requests preempted to free KV memory",
    "pipelined_chunks": "Prefill chunks scheduled while an earlier chunk of the same prompt "
                        "was still in the pipeline (sequence pipeline parallelism)",
    "first_tokens": "First tokens delivered (deadline-aware schedulers)",
    "deadline_misses": "First tokens delivered after their request's deadline (--scheduler "
                       "mnemosyne: arrival + TTFT SLO + allowance per prompt token)",
    "decodes_deferred": "Running decodes that gave their slot to a stricter SLO class's "
                        "prefill (--scheduler mnemosyne, per-request SLOs)",
}
_collector_registered = False


def prepare_front_end() -> str:
    """Make sure engines started from this process will log, and that we export it."""
    global _collector_registered
    directory = envs.stats_dir()
    owner = envs.stats_owner()
    # A directory set by the operator is kept and shared on purpose; one inherited from
    # another front end's start-up is that front end's, and mixing would corrupt both.
    if directory is None or (owner is not None and owner != os.getpid()):
        directory = tempfile.mkdtemp(prefix="vllm-ext-stats-")
        os.environ[envs.STATS_DIR] = directory
        os.environ[envs.STATS_OWNER] = str(os.getpid())
        atexit.register(shutil.rmtree, directory, True)
    if not _collector_registered:
        from prometheus_client import REGISTRY

        REGISTRY.register(_StepCollector())
        _collector_registered = True
    return directory


def step_stats() -> StepStats:
    """Totals and recent steps of every engine this process started (all zeros if none)."""
    return read_dir(envs.stats_dir())


class _StepCollector:
    def describe(self):
        return []  # collected lazily: the engine may not have written anything yet

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        stats = step_stats()
        yield CounterMetricFamily(f"{PREFIX}steps", "Engine steps scheduled by vllm-ext schedulers",
                                  value=stats.steps)
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}{name}", doc, value=stats.totals[name])
        cumulative, buckets = 0, []
        for bound, count in stats.step_seconds_buckets:
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(f"{PREFIX}step_seconds",
                                    "Wall time of one engine step (schedule, run, update)",
                                    buckets=buckets, sum_value=stats.totals["wall_s"])
        yield CounterMetricFamily(
            f"{PREFIX}step_predicted_seconds", "Step time the latency model predicted, summed "
            "(adaptive chunking; compare with vllm_ext_step_seconds_sum)",
            value=stats.totals["predicted_s"])
        last = stats.recent[-1] if stats.recent else None
        for name in ("decode_tokens", "prefill_tokens", "partial_prefills", "wall_s",
                     "predicted_s", "min_slack_s"):
            yield GaugeMetricFamily(f"{PREFIX}last_step_{name}", f"{name} of the latest step",
                                    value=getattr(last, name) if last else 0)
        yield from _slo_class_metrics(envs.stats_dir())
        yield from _kv_pool_metrics(envs.stats_dir())


def _slo_class_metrics(directory):
    from prometheus_client.core import CounterMetricFamily

    from vllm_ext.schedulers.slo_counts import read_counts

    counts = read_counts(directory)
    if not counts:
        return
    first = CounterMetricFamily(
        f"{PREFIX}slo_first_tokens", "First tokens by SLO class, on time or past the "
        "request's first-token deadline (--scheduler mnemosyne)", labels=("slo_class", "outcome"))
    later = CounterMetricFamily(
        f"{PREFIX}slo_tokens", "Later tokens of requests with a TBT deadline, by SLO class, on "
        "time or late (Metron's walk: time saved is banked)", labels=("slo_class", "outcome"))
    deferred = CounterMetricFamily(
        f"{PREFIX}slo_decodes_deferred", "Decode slots given to a stricter class's prefill, by "
        "the deferred request's SLO class", labels=("slo_class",))
    for name, row in sorted(counts.items()):
        first.add_metric((name, "met"), row["first_met"])
        first.add_metric((name, "missed"), row["first_missed"])
        later.add_metric((name, "met"), row["tokens_met"])
        later.add_metric((name, "missed"), row["tokens_missed"])
        deferred.add_metric((name,), row["decodes_deferred"])
    yield from (first, later, deferred)


_KV_GAUGES = {
    "reserved_bytes": "Virtual KV memory reserved (vattention)",
    "mapped_bytes": "Physical KV memory mapped (vattention)",
    "provisioned_bytes": "Physical KV memory set aside when the pool was made: the most it "
                         "maps (vattention; on the host backend only counted)",
    "live_bytes": "KV bytes of the blocks in use by requests (vattention)",
    "live_page_bytes": "Bytes of the pages holding those blocks (vattention)",
    "max_map_seconds": "Slowest page map so far (vattention)",
}
_KV_COUNTERS = {
    "maps": "Pages mapped (vattention)",
    "unmaps": "Pages unmapped (vattention)",
    "map_seconds": "Time spent mapping pages (vattention)",
    "unmap_seconds": "Time spent unmapping pages (vattention)",
    "critical_maps": "Pages a step had to wait for: not mapped ahead in time (vattention)",
    "critical_wait_seconds": "Time steps waited for page maps (vattention)",
}


def _kv_pool_metrics(directory):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from vllm_ext.allocators.poolstats import read_pool_dir

    pools = read_pool_dir(directory)
    if not pools.samples:
        return
    for name, doc in _KV_GAUGES.items():
        yield GaugeMetricFamily(f"{PREFIX}kv_{name}", doc, value=pools.totals[name])
    for name, doc in _KV_COUNTERS.items():
        yield CounterMetricFamily(f"{PREFIX}kv_{name}", doc, value=pools.totals[name])

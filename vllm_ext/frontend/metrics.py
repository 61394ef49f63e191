"""vllm-ext's per-step scheduler statistics on vLLM's `/metrics` and in Python.

Engine processes write step logs (`vllm_ext.schedulers.steplog`), SLO counts and KV-pool
samples into their engine's folder of the directory named by VLLMEXT_STATS_DIR
(`vllm_ext.statsdir`). The front-end process creates that directory before it spawns
the engines, so they inherit it, and registers a Prometheus collector that reads the
files at scrape time, labelled per engine as vLLM labels its own series (`model_name`,
`engine`). With several API server processes (`--api-server-count`, which
`--data-parallel-size` raises) vLLM serves /metrics from a registry of its own in each;
the `metrics_registry` patch adds the collector there.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import weakref

from vllm_ext import envs, statsdir
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
# The registries that hold the collector: prometheus_client's global one (where the
# front end puts it) and the one each API server of a multi-server front end makes.
_registries: "weakref.WeakSet" = weakref.WeakSet()


def prepare_front_end() -> str:
    """Make sure engines started from this process will log, and that we export it."""
    directory = envs.stats_dir()
    owner = envs.stats_owner()
    # A directory set by the operator is kept and shared on purpose; one inherited from
    # another front end's start-up is that front end's, and mixing would corrupt both.
    if directory is None or (owner is not None and owner != os.getpid()):
        directory = tempfile.mkdtemp(prefix="vllm-ext-stats-")
        os.environ[envs.STATS_DIR] = directory
        os.environ[envs.STATS_OWNER] = str(os.getpid())
        atexit.register(shutil.rmtree, directory, True)
    from prometheus_client import REGISTRY

    register(REGISTRY)
    return directory


def register(registry) -> None:
    """Serve vllm-ext's series from `registry` (once per registry)."""
    if registry not in _registries:
        registry.register(_StepCollector())
        _registries.add(registry)


def step_stats(engine: int | None = None) -> StepStats:
    """Totals and recent steps of every engine this process started (all zeros if none),
    or of one: its data-parallel index, as vLLM's `engine` label gives it."""
    if engine is None:
        return read_dir(envs.stats_dir())
    by_engine = step_stats_by_engine()
    if engine not in by_engine:
        raise LookupError(f"no engine {engine} has written statistics here; engines: "
                          f"{sorted(by_engine) or 'none yet'}")
    return by_engine[engine]


def step_stats_by_engine() -> dict[int, StepStats]:
    """Each engine's totals and recent steps, by data-parallel index."""
    return {int(e.engine): read_dir(e.path) for e in statsdir.engines(envs.stats_dir())}


# vLLM's own per-engine series carry these labels (its PrometheusStatLogger's).
LABELS = ("model_name", "engine")


class _StepCollector:
    def describe(self):
        return []  # collected lazily: the engine may not have written anything yet

    def collect(self):
        engines = statsdir.engines(envs.stats_dir())
        yield from _step_families(engines)
        yield from _slo_class_metrics(engines)
        yield from _kv_pool_metrics(engines)


def _step_families(engines):
    from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                        HistogramMetricFamily)

    steps = CounterMetricFamily(f"{PREFIX}steps", "Engine steps scheduled by vllm-ext schedulers",
                                labels=LABELS)
    counters = {name: CounterMetricFamily(f"{PREFIX}{name}", doc, labels=LABELS)
                for name, doc in _COUNTERS.items()}
    seconds = HistogramMetricFamily(f"{PREFIX}step_seconds",
                                    "Wall time of one engine step (schedule, run, update)",
                                    labels=LABELS)
    predicted = CounterMetricFamily(
        f"{PREFIX}step_predicted_seconds", "Step time the latency model predicted, summed "
        "(adaptive chunking; compare with vllm_ext_step_seconds_sum)", labels=LABELS)
    last = {name: GaugeMetricFamily(f"{PREFIX}last_step_{name}", f"{name} of the latest step",
                                    labels=LABELS) for name in _LAST_STEP}
    for engine in engines:
        labels = (engine.model_name, engine.engine)
        stats = read_dir(engine.path)
        steps.add_metric(labels, stats.steps)
        for name, family in counters.items():
            family.add_metric(labels, stats.totals[name])
        cumulative, buckets = 0, []
        for bound, count in stats.step_seconds_buckets:
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        seconds.add_metric(labels, buckets, stats.totals["wall_s"])
        predicted.add_metric(labels, stats.totals["predicted_s"])
        latest = stats.recent[-1] if stats.recent else None
        for name, family in last.items():
            family.add_metric(labels, getattr(latest, name) if latest else 0)
    return (steps, *counters.values(), seconds, predicted, *last.values())


_LAST_STEP = ("decode_tokens", "prefill_tokens", "partial_prefills", "wall_s", "predicted_s",
              "min_slack_s")


def _slo_class_metrics(engines):
    from prometheus_client.core import CounterMetricFamily

    from vllm_ext.schedulers.slo_counts import read_counts

    by_engine = [(engine, read_counts(engine.path)) for engine in engines]
    if not any(counts for _, counts in by_engine):
        return ()
    first = CounterMetricFamily(
        f"{PREFIX}slo_first_tokens", "First tokens by SLO class, on time or past the "
        "request's first-token deadline (--scheduler mnemosyne)",
        labels=(*LABELS, "slo_class", "outcome"))
    later = CounterMetricFamily(
        f"{PREFIX}slo_tokens", "Later tokens of requests with a TBT deadline, by SLO class, on "
        "time or late (Metron's walk: time saved is banked)",
        labels=(*LABELS, "slo_class", "outcome"))
    deferred = CounterMetricFamily(
        f"{PREFIX}slo_decodes_deferred", "Decode slots given to a stricter class's prefill, by "
        "the deferred request's SLO class", labels=(*LABELS, "slo_class"))
    for engine, counts in by_engine:
        labels = (engine.model_name, engine.engine)
        for name, row in sorted(counts.items()):
            first.add_metric((*labels, name, "met"), row["first_met"])
            first.add_metric((*labels, name, "missed"), row["first_missed"])
            later.add_metric((*labels, name, "met"), row["tokens_met"])
            later.add_metric((*labels, name, "missed"), row["tokens_missed"])
            deferred.add_metric((*labels, name), row["decodes_deferred"])
    return (first, later, deferred)


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


def _kv_pool_metrics(engines):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from vllm_ext.allocators.poolstats import read_pool_dir

    by_engine = [(engine, read_pool_dir(engine.path)) for engine in engines]
    by_engine = [(engine, pools) for engine, pools in by_engine if pools.samples]
    if not by_engine:
        return
    for kinds, family in ((_KV_GAUGES, GaugeMetricFamily), (_KV_COUNTERS, CounterMetricFamily)):
        for name, doc in kinds.items():
            metric = family(f"{PREFIX}kv_{name}", doc, labels=LABELS)
            for engine, pools in by_engine:
                metric.add_metric((engine.model_name, engine.engine), pools.totals[name])
            yield metric

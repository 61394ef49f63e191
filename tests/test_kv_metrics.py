"""The KV pool's statistics file and its families on /metrics (no engine)."""

from __future__ import annotations

from vllm_ext.frontend import metrics
from vllm_ext.allocators.poolstats import PoolStatsWriter, read_pool_dir
from vllm_ext.allocators.pool import PoolStats
from vllm_ext.statsdir import engine_folder


def _stats(mapped: int, maps: int) -> PoolStats:
    return PoolStats(reserved_bytes=1 << 30, mapped_bytes=mapped, mapped_pages=mapped >> 16,
                     provisioned_bytes=1 << 24, maps=maps, unmaps=1, map_seconds=0.5, unmap_seconds=0.25,
                     max_map_seconds=0.1, critical_maps=2, critical_wait_seconds=0.05)


def test_samples_and_totals_round_trip_and_feed_metrics(tmp_path, monkeypatch):
    writer = PoolStatsWriter(engine_folder(tmp_path, 0, "m"), capacity=4)
    for i in range(6):  # wraps the ring: the latest 4 remain, in order
        writer.write(_stats((i + 1) << 16, i + 1), live_bytes=i << 16,
                     live_page_bytes=i << 16, slot_breaks=0)
    snap = read_pool_dir(tmp_path)
    assert [s[1] for s in snap.samples] == [2 << 16, 3 << 16, 4 << 16, 5 << 16]
    assert snap.totals["mapped_bytes"] == 6 << 16 and snap.totals["maps"] == 6
    writer.close()

    monkeypatch.setenv("VLLMEXT_STATS_DIR", str(tmp_path))
    families = {f.name: f for f in metrics._StepCollector().collect()}
    assert families["vllm_ext_kv_mapped_bytes"].samples[0].value == 6 << 16
    assert families["vllm_ext_kv_mapped_bytes"].samples[0].labels == {"model_name": "m",
                                                                      "engine": "0"}
    assert families["vllm_ext_kv_live_bytes"].samples[0].value == 5 << 16
    assert families["vllm_ext_kv_reserved_bytes"].samples[0].value == 1 << 30
    assert families["vllm_ext_kv_provisioned_bytes"].samples[0].value == 1 << 24
    maps = families["vllm_ext_kv_maps"]  # a counter: exported as vllm_ext_kv_maps_total
    assert maps.type == "counter" and maps.samples[0].value == 6


def test_no_pool_no_kv_families(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLMEXT_STATS_DIR", str(tmp_path))
    assert not [f for f in metrics._StepCollector().collect() if f.name.startswith("vllm_ext_kv")]

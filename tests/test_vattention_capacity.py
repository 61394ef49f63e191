"""vattention's physical memory, set aside when the worker allocates the KV cache and
told to the scheduler built after it, as vLLM's engine core orders the two: the real
runner allocation (V2's `init_kv_cache`) and a real `Scheduler`, in-process on the host
backend, with VLLMEXT_HOST_KV_LIMIT standing in for a device that has less memory
than vLLM sized. No engine runs.

Checked: the scheduler's cap becomes the pages the worker got, so the pool's free
count and usage measure against them; two engines sharing a statistics directory do
not read each other's count; a pool that cannot hold one request, or that got fewer
pages with no way to tell the scheduler, refuses to start and says what to change.
"""

from __future__ import annotations

import pytest
import torch
from vattention_engine import kv_cache_config, runner_config

pytestmark = pytest.mark.release

BLOCK, NUM_BLOCKS, MAX_LEN = 16, 256, 512
PAGE_BYTES = 2 * (16 << 10)  # --vattention-page-size 16KiB, in each of the tiny model's 2 layers


def _config(tmp_path, name: str, **options):
    return runner_config(tmp_path / name, BLOCK, MAX_LEN, kv_allocator="vattention", **options)


def _kv_config(config):
    return kv_cache_config(config, BLOCK, NUM_BLOCKS)


def _allocate(config):
    """The worker's KV allocation, as the runner makes it; the engine's pool runtime."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.worker.gpu.attn_utils import init_kv_cache

    from vllm_ext.engine import vattention

    with set_current_vllm_config(config):
        init_kv_cache({}, _kv_config(config), torch.device("cpu"), [BLOCK], config)
    return vattention.runtime_for(config)


def _scheduler(config):
    """The engine core's scheduler, built after the workers allocated, as vLLM builds it."""
    from vllm.v1.core.kv_cache_utils import resolve_kv_cache_block_sizes
    from vllm.v1.structured_output import StructuredOutputManager

    config.cache_config.num_gpu_blocks = NUM_BLOCKS
    kv_config = _kv_config(config)
    block_size, hash_block_size = resolve_kv_cache_block_sizes(kv_config, config)
    return config.scheduler_config.get_scheduler_cls()(
        vllm_config=config, kv_cache_config=kv_config,
        structured_output_manager=StructuredOutputManager(config),
        block_size=block_size, hash_block_size=hash_block_size)


@pytest.fixture
def engines(tmp_path, monkeypatch):
    """Make vattention engine configs sharing one statistics directory; drop their pools."""
    from vllm_ext.engine import vattention

    monkeypatch.setenv("VLLMEXT_STATS_DIR", str(tmp_path / "stats"))
    (tmp_path / "stats").mkdir()
    made = []

    def make(name: str, **options):
        made.append(_config(tmp_path, name, **options))
        return made[-1]

    yield make
    for config in made:
        vattention._drop(id(config))


def test_the_scheduler_caps_at_the_pages_the_worker_got(engines, monkeypatch):
    from vllm_ext.engine import vattention

    short = engines("short", vattention_page_size="16KiB")
    monkeypatch.setenv("VLLMEXT_HOST_KV_LIMIT", str(48 * PAGE_BYTES))
    runtime = _allocate(short)
    got = runtime.pool.physical_pages
    assert got == 48 < runtime.pool.num_pages
    monkeypatch.delenv("VLLMEXT_HOST_KV_LIMIT")
    # A second engine of the same directory, allocated after the first, got every page.
    full = engines("full", vattention_page_size="16KiB")
    full_pages = _allocate(full).pool.physical_pages
    assert full.instance_id != short.instance_id and full_pages > got

    pool = _scheduler(short).kv_cache_manager.block_pool
    k = pool.planner.k
    assert pool.planner.max_pages == got
    assert pool.get_num_free_blocks() == got * k - 1  # under the cap, the null block aside
    assert pool.get_usage() == 0.0  # idle, though most of vLLM's blocks are out of reach
    taken = pool.get_new_blocks(3 * k)
    assert pool.get_usage() == pytest.approx(3 * k / (got * k - 1))
    pool.free_blocks(taken)
    assert pool.get_usage() == 0.0
    assert _scheduler(full).kv_cache_manager.block_pool.planner.max_pages == full_pages

    vattention._drop(id(short))  # the pool, and the file that told its count, go together
    assert vattention.provisioned_pages(short) is None
    assert vattention.provisioned_pages(full) == full_pages


def test_a_pool_that_cannot_hold_one_request_refuses_to_start(engines, monkeypatch):
    from vllm_ext.engine.vattention import VAttentionError

    config = engines("tiny", vattention_page_size="16KiB")
    monkeypatch.setenv("VLLMEXT_HOST_KV_LIMIT", "64KiB")  # 2 pages: one request needs 17
    with pytest.raises(VAttentionError, match=r"physical memory \(2 of the \d+ KV pages "
                                              r"planned.*needs 17 pages.*--gpu-memory-util"):
        _allocate(config)


def test_a_cap_too_small_for_one_request_is_refused_by_the_worker_too(engines):
    from vllm_ext.engine.vattention import VAttentionError

    config = engines("tiny", vattention_page_size="16KiB",
                     vattention_physical_limit=str(4 * PAGE_BYTES))
    with pytest.raises(VAttentionError, match=r"--vattention-physical-limit 131072 bytes holds "
                                              r"4 pages.*raise it to at least 557056 bytes"):
        _allocate(config)


def test_fewer_pages_with_no_way_to_tell_the_scheduler_refuse_to_start(engines, monkeypatch):
    from vllm_ext.engine.vattention import VAttentionError

    config = engines("tiny", vattention_page_size="16KiB")
    monkeypatch.delenv("VLLMEXT_STATS_DIR")
    monkeypatch.setenv("VLLMEXT_HOST_KV_LIMIT", "1MiB")
    with pytest.raises(VAttentionError, match=r"cannot be told: set "
                                              r"--vattention-physical-limit to at most 1048576"):
        _allocate(config)

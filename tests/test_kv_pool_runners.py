"""`--kv-allocator vattention` reaches the pool from every model runner of every supported
vLLM release, through the runner's own KV-allocation code: V2's `init_kv_cache` (CUDA's
default runner in 0.32 and 0.33, the only one in 0.34) and V1's
`initialize_kv_cache_tensors` (0.32 and 0.33). In-process on CPU tensors, with the host
backend standing in for CUDA's: what is checked is that the runner's allocation lands in
the pool, and that the patch registry records the reach.

Runs in the main run (0.32) and in tests/test_vllm_releases.py's runs (0.33, 0.34).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vattention_engine import kv_cache_config, runner_config

pytestmark = pytest.mark.release

BLOCK, NUM_BLOCKS = 16, 256


@pytest.fixture
def engine(tmp_path, monkeypatch):
    """A vattention engine's config and KV cache config (layer-outermost, as vLLM plans it)."""
    monkeypatch.setenv("VLLMEXT_STATS_DIR", str(tmp_path))
    config = runner_config(tmp_path / "model", BLOCK, 512, kv_allocator="vattention")
    kv_config = kv_cache_config(config, BLOCK, NUM_BLOCKS)
    yield config, kv_config, tmp_path
    from vllm_ext.engine import vattention

    vattention._drop(id(config))


def _check_in_pool(config, caches, kv_config, stats_dir, calls_before):
    from vllm_ext.engine import vattention
    from vllm_ext.patches import patch, reached_in

    runtime = vattention.runtime_for(config)
    assert runtime is not None, "the runner's allocation did not reach the pool"
    pool = runtime.pool
    start, end = pool._base, pool._base + pool.reserved_bytes
    layers = kv_config.kv_cache_tensors[0].layers
    assert set(layers) <= set(caches)
    for name in layers:
        assert start <= caches[name].data_ptr() < end  # the layer's KV lives in the pool
    caches[layers[0]].view(-1)[:8].fill_(1.0)  # the null block's page is mapped from the start
    assert patch("kv_pool_alloc").calls == calls_before + 1
    assert "kv_pool_alloc" in reached_in(str(stats_dir))


def test_v2_runner(engine):
    from vllm.config import set_current_vllm_config
    from vllm.v1.worker.gpu.attn_utils import init_kv_cache

    from vllm_ext.patches import patch

    config, kv_config, stats = engine
    before = patch("kv_pool_alloc").calls
    with set_current_vllm_config(config):  # as the worker does around it
        caches = init_kv_cache({}, kv_config, torch.device("cpu"), [BLOCK], config)
    _check_in_pool(config, caches, kv_config, stats, before)
    # vLLM 0.34's own growable KV cache is off for a vattention engine.
    assert getattr(config.cache_config, "enable_extensible_kv_cache", False) is False


def test_v2_runner_refuses_an_allocation_hook_beside_the_pool(engine):
    import inspect

    from vllm.config import set_current_vllm_config
    from vllm.v1.worker.gpu.attn_utils import init_kv_cache

    from vllm_ext.engine.vattention import VAttentionError

    if "allocate" not in inspect.signature(init_kv_cache).parameters:
        pytest.skip("no allocation hook before vLLM 0.34")
    config, kv_config, _ = engine
    with set_current_vllm_config(config), \
            pytest.raises(VAttentionError, match="extensible KV cache must be off"):
        init_kv_cache({}, kv_config, torch.device("cpu"), [BLOCK], config,
                      allocate=lambda size: torch.zeros(size, dtype=torch.int8))


def test_v1_runner(engine):
    from vllm_ext.versions import installed_vllm_version

    if installed_vllm_version().minor >= 34:
        pytest.skip("no V1 runner from vLLM 0.34")
    from vllm.config import set_current_vllm_config
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_ext.patches import patch

    config, kv_config, stats = engine
    # The runner's own method, on a stand-in runner holding what it reads; the model is
    # not loaded, so its attention layers are stand-ins that keep what they are bound to.
    bound = {}
    layers = {name: SimpleNamespace(bind_kv_cache=lambda kv, name=name: bound.__setitem__(
        name, kv)) for name in kv_config.kv_cache_tensors[0].layers}
    runner = SimpleNamespace(
        device=torch.device("cpu"), cache_config=config.cache_config, shared_kv_cache_layers={},
        model_config=config.model_config, attn_groups=[], speculative_config=None,
        compilation_config=SimpleNamespace(static_forward_context=layers), kv_caches=[])
    before = patch("kv_pool_alloc").calls
    with set_current_vllm_config(config):
        caches = GPUModelRunner.initialize_kv_cache_tensors(runner, kv_config, [BLOCK])
    _check_in_pool(config, caches, kv_config, stats, before)
    assert {name: kv.data_ptr() for name, kv in bound.items()} == \
        {name: caches[name].data_ptr() for name in layers}  # the layers got the pool's views


def test_the_unselected_engine_keeps_vllms_allocation(engine, tmp_path):
    from vllm.config import set_current_vllm_config
    from vllm.v1.worker.gpu.attn_utils import init_kv_cache

    from vllm_ext.engine import vattention

    _, kv_config, _ = engine
    stock = runner_config(tmp_path / "stock", BLOCK, 512)
    with set_current_vllm_config(stock):
        caches = init_kv_cache({}, kv_config, torch.device("cpu"), [BLOCK], stock)
    assert vattention.runtime_for(stock) is None
    assert all(int(t.count_nonzero()) == 0 for t in caches.values())  # vLLM's zeroed buffer

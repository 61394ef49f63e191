"""vattention under tensor parallelism, without an engine: what each rank's pool is sized
from and what device it maps on. (The engine run is tests/test_engine_vattention.py's
tensor-parallel test.)

- Each rank's KV cache config holds its shard of the KV heads (vLLM's planning), so a
  rank's pages are a fraction of a single worker's, and `--vattention-physical-limit`
  caps each rank: the scheduler, planning from a rank's config, fits as many pages as
  one rank's device holds under the cap, and a refusal says its bytes are per rank.
- On CUDA a rank's pool names the worker's own device (cuda:<local rank>) in every
  driver call, and makes that device's context current on any thread that calls the
  driver, the pool's own included; checked against a stand-in driver that knows which
  context each thread has current (this machine has no GPU).
"""

from __future__ import annotations

import threading

import pytest
import torch
from test_cuda_backend_logic import FakeDriver, NoTensorBackend
from vattention_engine import kv_cache_config, runner_config

from vllm_ext.allocators import VirtualKVPool
from vllm_ext.allocators.settings import VAttentionSettings

BLOCK, MAX_LEN, NUM_BLOCKS = 32, 576, 256
# The small preset: 8 layers, 4 KV heads of 64. A block of 32 tokens holds 64 KiB per
# layer on one worker, 32 KiB on each of 2 ranks (2 heads each); pages of 16 KiB asked
# for become one block each.
RANK_PAGE_BYTES = 8 * (32 << 10)
CAP = 20 * RANK_PAGE_BYTES  # per rank; one request of 576 tokens needs 19 pages


def _config(tmp_path, name: str, **parallel):
    return runner_config(tmp_path / name, BLOCK, MAX_LEN, preset="small",
                         kv_allocator="vattention", vattention_page_size="16KiB",
                         vattention_physical_limit=str(CAP), **parallel)


def test_a_rank_pools_its_shard_of_the_heads_and_the_cap_is_each_ranks(tmp_path):
    from vllm_ext.engine.vattention import (
        VAttentionError,
        geometry,
        plan_pages,
        settings_for,
    )

    tp2, one = _config(tmp_path, "tp2", tensor_parallel_size=2), _config(tmp_path, "one")
    rank = geometry(kv_cache_config(tp2, BLOCK, NUM_BLOCKS), settings_for(tp2))
    whole = geometry(kv_cache_config(one, BLOCK, NUM_BLOCKS), settings_for(one))
    assert 2 * rank.block_bytes == whole.block_bytes  # half the heads
    assert rank.page_bytes == RANK_PAGE_BYTES and whole.page_bytes == 2 * RANK_PAGE_BYTES

    # The scheduler plans with a rank's config (vLLM's first worker's): the cap in pages
    # is what one rank's device holds under it, not the cap shared out among the ranks.
    planner = plan_pages(kv_cache_config(tp2, BLOCK, NUM_BLOCKS), MAX_LEN, settings_for(tp2),
                         True, 0)
    assert planner.max_pages == CAP // RANK_PAGE_BYTES == 20
    # The same cap on one worker that holds every head fits 10 of its larger pages, short
    # of one request; the refusal says the bytes are a rank's.
    with pytest.raises(VAttentionError, match=(
            rf"--vattention-physical-limit {CAP} bytes holds 10 pages of "
            rf"{2 * RANK_PAGE_BYTES} bytes per rank .*needs 19 pages .*raise it to at least "
            rf"{19 * 2 * RANK_PAGE_BYTES} bytes \(per rank\)")):
        plan_pages(kv_cache_config(one, BLOCK, NUM_BLOCKS), MAX_LEN, settings_for(one), True, 0)


class ContextDriver(FakeDriver):
    """The stand-in driver, knowing which device each primary context is and which context
    each thread has current, as CUDA does (a thread starts with none)."""

    def __init__(self) -> None:
        super().__init__()
        self._thread = threading.local()
        self.calls_on: list[tuple[str, object, str]] = []  # (call, device current, thread)
        self.located: list[tuple[str, int]] = []  # (call, device it names)

    def current_device(self):
        return getattr(self._thread, "device", None)

    def _r(self, name, *values):
        self.calls_on.append((name, self.current_device(), threading.current_thread().name))
        return super()._r(name, *values)

    def cuDevicePrimaryCtxRetain(self, dev):
        return self._r("cuDevicePrimaryCtxRetain", ("primary context", dev))

    def cuCtxSetCurrent(self, ctx):
        self._thread.device = ctx[1]
        return self._r("cuCtxSetCurrent")

    def cuDeviceGet(self, ordinal):
        self.located.append(("cuDeviceGet", ordinal))
        return super().cuDeviceGet(ordinal)

    def cuMemCreate(self, size, prop, flags):
        self.located.append(("cuMemCreate", prop.location.id))
        return super().cuMemCreate(size, prop, flags)

    def cuMemSetAccess(self, addr, size, desc, count):
        self.located.append(("cuMemSetAccess", desc[0].location.id))
        return super().cuMemSetAccess(addr, size, desc, count)


class Fence:
    """A device event stand-in: notes the device whose context its waiter has current."""

    def __init__(self, driver: ContextDriver) -> None:
        self.driver, self.waited_on = driver, []

    def synchronize(self) -> None:
        self.waited_on.append(self.driver.current_device())


def test_a_rank_picks_its_workers_device_not_device_0():
    from vllm_ext.engine.vattention import backend_for

    drv = ContextDriver()
    # What vLLM's GPU worker of local rank 1 hands its runner, and so the KV allocation.
    backend = backend_for(VAttentionSettings("cuda"), torch.device("cuda", 1), driver=drv)
    assert backend.device_index == 1 and ("cuDeviceGet", 1) in drv.located
    # Device 1's context was made current before the first question about memory.
    assert [d for c, d, _ in drv.calls_on if c == "granularity"] == [1]


def test_every_driver_call_of_a_ranks_pool_is_on_its_device_on_every_thread():
    drv = ContextDriver()
    pool = VirtualKVPool(2, 8 * (2 << 20), backend=NoTensorBackend(device_index=1, driver=drv),
                         physical_pages=1)
    # The pool's thread waits for a fence before it has made any other call: CUDA would
    # give a thread without a current context device 0's.
    fence = Fence(drv)
    pool.unmap([0], fence=fence).result()
    pool.map([1, 2])
    pool.map_async([3])
    pool.unmap([1, 3], fence=fence)
    pool.wait()
    pool.map([4, 5])
    pool.unmap([4, 5]).result()
    pool.trim()
    pool.close()

    assert fence.waited_on == [1, 1]
    memory_calls = [(c, d, t) for c, d, t in drv.calls_on
                    if c not in ("cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain")]
    on_pool_thread = [c for c, _, t in memory_calls if t.startswith("kv-pool")]
    assert {"cuMemMap", "cuMemsetD8Async", "cuMemUnmap", "cuMemCreate"} <= set(on_pool_thread)
    assert {d for _, d, _ in memory_calls} == {1}, [m for m in memory_calls if m[1] != 1][:5]
    assert drv.located and {d for _, d in drv.located} == {1}
    assert drv.live == set()


@pytest.mark.parametrize("user, refused", [
    ({"tensor_parallel_size": 2}, None),
    ({"tensor_parallel_size": 2, "pipeline_parallel_size": 2},
     ("not pipeline parallelism (pipeline_parallel_size=2 was given): the stages hold "
      "different layers")),
    ({"tensor_parallel_size": 2, "decode_context_parallel_size": 2},
     "not context parallelism (decode_context_parallel_size=2 was given)"),
])
def test_the_front_end_takes_tensor_parallelism_and_says_why_not_the_others(user, refused):
    from vllm_ext.frontend.components import SelectionError
    from vllm_ext.frontend.selection import resolve

    def select():
        return resolve({"kv_allocator": "vattention"}, {}, user, "cuda")

    if refused is None:
        assert "tensor_parallel_size" not in select()  # the operator's, left as given
    else:
        with pytest.raises(SelectionError, match=refused.replace("(", r"\(").replace(")", r"\)")):
            select()

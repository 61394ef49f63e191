"""vAttention in vLLM (`--kv-allocator vattention`): the glue between the engine and
`vllm_ext.allocators`.

Where things run. The scheduler (engine-core process) hands out KV blocks; the
worker owns the KV memory, in another process on vLLM's CPU platform. So the
decisions are made where blocks are handed out and carried to the worker with
each step:

Every process reads the engine's choice from the engine's own config
(`vllm_ext.config.ExtConfig`), so engines of one process never share it.

- scheduler side: vLLM's `BlockPool` becomes a `PagedBlockPool` (patches/paged_block_pool.py,
  with the planner from `plan_pages`). Its free queue asks a
  `PagePlanner` which free block to hand out (compactly), and `get_num_free_blocks`
  counts only blocks that fit under the physical cap, so vLLM preempts at the cap
  exactly as it does when its own pool runs out. When a page is unmapped, the
  prefix-cache entries of its blocks are evicted first: their bytes are about to go.
- every step: the planner's `PageOps` ride on the `SchedulerOutput` to the worker.
- worker side: every layer's KV is a view of one `VirtualKVPool`; before the step
  runs, the worker maps what the step needs (waiting only for pages the look-ahead
  did not map in time), queues unmaps behind a device fence, and queues the
  look-ahead maps on the pool's background thread.

Both sides derive the page size from the same numbers (block bytes, requested page
size, granularity), so they agree on which blocks share a page without talking.

Under tensor parallelism every rank is a worker process with its own pool over its own
shard of the KV heads: vLLM sizes each rank's KV cache config for the heads it holds
(`num_kv_heads / tp`, replicated when fewer) and gives all ranks the same block ids, so
the one plan the scheduler drains applies to every rank, and every rank carries it out
before its step (each receives the same SchedulerOutput). The scheduler's config is a
rank's (vLLM plans with the first worker's), so its page size and its physical budget
are a rank's: `--vattention-physical-limit` caps each rank's physical KV memory (each
GPU has its own), and the scheduler caps at the fewest pages any rank got. On CUDA each
rank's pool maps on the device vLLM gave its worker (`backend_for`).

Physical memory is set aside once, when the worker allocates the KV cache: the pages
under the physical cap, or without one every page (the KV bytes vLLM sized, which
stock vLLM holds for the engine's life). A map can then not run out of memory in the
middle of a step, where nothing could undo it: the scheduler hands out a step's
blocks before the worker maps them, and vLLM cannot take a scheduled step back. If
the device gives fewer pages (another process took memory after vLLM measured it),
the worker keeps what it got and the scheduler's cap becomes that count, so vLLM
preempts there. The count can reach the scheduler at its construction because the
engine core has its workers allocate the KV cache before it builds the scheduler
(`EngineCore.__init__`, 0.32 to 0.34); it travels in a file of the engine's
statistics directory named after the engine's `instance_id`, which the workers
receive with the engine core's config (`provisioned_pages`).
"""

from __future__ import annotations

import atexit
import dataclasses
import glob
import logging
import mmap
import os
import threading
import weakref
from pathlib import Path

from vllm_ext import envs, statsdir
from vllm_ext.allocators.pages import PageOps, PagePlanner, SlotPlanner
from vllm_ext.allocators.pool import DEFAULT_PAGE_SIZE, VirtualKVPool, make_backend
from vllm_ext.allocators.settings import VAttentionSettings, page_size_for
from vllm_ext.config import ExtConfig

logger = logging.getLogger("vllm_ext")

OPS_ATTR = "vllm_ext_page_ops"  # the SchedulerOutput attribute that carries PageOps
# The scheduler may live in a process that never touches the device, so it cannot
# ask the driver; every current NVIDIA GPU has a 2 MiB minimum granularity, and the
# worker checks that the driver agrees before it reserves anything.
GRANULARITY = {"host": mmap.PAGESIZE, "cuda": 2 << 20}


class VAttentionError(RuntimeError):
    """The model or engine configuration does not fit vAttention; the message says why."""


def settings_for(vllm_config) -> VAttentionSettings | None:
    """The engine's vattention settings, from its own config; None if it did not choose it."""
    return ExtConfig.of(vllm_config).settings("kv_allocator", "vattention")


@dataclasses.dataclass(frozen=True, slots=True)
class Geometry:
    """Where a block's bytes are: the same offset in each layer's contiguous region."""

    num_blocks: int
    num_layers: int
    block_bytes: int  # one block of one layer
    page_size: int  # one page of one layer
    blocks_per_page: int

    @property
    def page_bytes(self) -> int:
        return self.page_size * self.num_layers


def geometry(kv_cache_config, settings: VAttentionSettings) -> Geometry:
    """Check that vLLM's KV placement is one a pool can hold, and size its pages."""
    groups = kv_cache_config.kv_cache_groups
    tensors = kv_cache_config.kv_cache_tensors
    if len(groups) != 1 or len(tensors) != 1:
        raise VAttentionError(
            f"--kv-allocator vattention supports models with one kind of attention layer "
            f"(one KV cache group); this model has {len(groups)} groups in {len(tensors)} "
            f"KV tensors (sliding-window, hybrid or Mamba layers)")
    tensor = tensors[0]
    spec = groups[0].kv_cache_spec
    num_blocks = kv_cache_config.num_blocks
    block_bytes = tensor.block_stride
    if (block_bytes != spec.page_size_bytes or tensor.offset != 0
            or tensor.layer_stride != num_blocks * block_bytes):
        raise VAttentionError(
            "--kv-allocator vattention needs a layer-outermost KV cache layout whose blocks "
            "are dense (VLLM_KV_CACHE_LAYOUT LBHNC or LBNHC); this engine resolved block "
            f"stride {block_bytes}, layer stride {tensor.layer_stride}, page "
            f"{spec.page_size_bytes} bytes")
    requested = settings.page_size or DEFAULT_PAGE_SIZE[settings.backend]
    page = page_size_for(block_bytes, requested, GRANULARITY[settings.backend])
    return Geometry(num_blocks, len(tensor.layers), block_bytes, page, page // block_bytes)


def physical_budget(geo: Geometry, settings: VAttentionSettings) -> int:
    """Pages of physical memory a rank plans for: those under the physical cap, which is
    per rank (each rank's pages hold its shard of the KV heads, on its own device), or
    without one every page (the KV bytes vLLM sized for the rank)."""
    pages = -(-geo.num_blocks // geo.blocks_per_page)
    if settings.physical_limit is None:
        return pages
    return min(pages, settings.physical_limit // geo.page_bytes)


def pages_for_one_request(geo: Geometry, block_size: int, max_model_len: int) -> int:
    """Pages that one request of `max_model_len` tokens needs, with the null block's."""
    blocks = -(-max_model_len // block_size)
    return 1 + -(-blocks // geo.blocks_per_page)


def _refuse_if_short(what: str, pages: int, geo: Geometry, block_size: int,
                     max_model_len: int, fix: str | None = None) -> None:
    """Refuse an engine whose `pages` (from `what`) cannot hold one request."""
    needed = pages_for_one_request(geo, block_size, max_model_len)
    if pages < needed:
        fix = fix or f"raise it to at least {needed * geo.page_bytes} bytes (per rank)"
        # Every figure is one rank's: under tensor parallelism a page holds the rank's
        # shard of the KV heads, and the cap applies to each rank's device.
        raise VAttentionError(
            f"{what} holds {pages} pages of {geo.page_bytes} bytes per rank ({geo.page_size} "
            f"per layer x {geo.num_layers} layers, the rank's share of the KV heads); one "
            f"request of max_model_len {max_model_len} needs {needed} pages "
            f"({needed * geo.page_bytes} bytes per rank): {fix} or lower --max-model-len")


def _budget_source(settings: VAttentionSettings) -> str:
    if settings.physical_limit is None:
        return "the KV cache"
    return f"--vattention-physical-limit {settings.physical_limit} bytes"


# -- scheduler side ----------------------------------------------------------------------
def plan_pages(kv_cache_config, max_model_len: int, settings: VAttentionSettings,
               prefix_caching: bool, null_block_id: int,
               provisioned: int | None = None) -> PagePlanner:
    """The planner that decides, for an engine's block pool, which free block goes next
    and which pages are mapped (the `paged_block_pool` patch puts it in place).

    `provisioned`: the physical pages the engine's workers got (`provisioned_pages`);
    the cap is the fewer of those and the planned ones.
    """
    geo = geometry(kv_cache_config, settings)
    block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    planned = physical_budget(geo, settings)
    max_pages = planned if provisioned is None else min(planned, provisioned)
    source = "what the workers got" if max_pages < planned else _budget_source(settings)
    _refuse_if_short(source, max_pages, geo, block_size, max_model_len)
    if settings.layout == "slots" and prefix_caching:
        raise VAttentionError("--vattention-layout slots gives every request its own blocks; "
                              "it needs prefix caching off")
    kwargs = dict(premap=settings.premap, watermark=settings.watermark, max_pages=max_pages,
                  live_from_start=(null_block_id,))
    if settings.layout == "slots":
        slot = (pages_for_one_request(geo, block_size, max_model_len) - 1) * geo.blocks_per_page
        planner = SlotPlanner(geo.num_blocks, geo.blocks_per_page, slot, **kwargs)
        layout = f"{planner.num_slots} slots of {slot} blocks (max_model_len {max_model_len})"
    else:
        planner = PagePlanner(geo.num_blocks, geo.blocks_per_page, **kwargs)
        layout = "blocks"
    logger.info("vllm-ext vattention: %d blocks in %d pages of %d blocks (%s per layer, %d "
                "layers), layout %s, at most %d pages mapped (%s) on each rank", geo.num_blocks,
                planner.num_pages, geo.blocks_per_page, _fmt(geo.page_size), geo.num_layers,
                layout, max_pages, source)
    return planner


def provisioned_pages(vllm_config) -> int | None:
    """The fewest physical pages a worker of this engine set aside, as its KV allocation
    wrote it down (`_publish`); None if none did (no statistics directory). Under tensor
    parallelism every rank writes its own count and all share the scheduler's plan, so
    the cap is the fewest."""
    directory = statsdir.for_engine(vllm_config)  # this engine's (a DP rank's) workers
    if directory is None:
        return None
    pattern = _pages_file(directory, glob.escape(vllm_config.instance_id), "*").name
    counts = [int(p.read_text()) for p in Path(directory).glob(pattern)]
    if not counts:
        # A worker elsewhere (another node's file system) or one given another config:
        # the scheduler cannot learn what it got, and plans with the whole budget.
        logger.warning("vllm-ext vattention: no worker of engine %s wrote down its physical "
                       "KV pages in %s; planning with every page of the budget",
                       vllm_config.instance_id, directory)
    return min(counts, default=None)


def _pages_file(directory: str, instance_id: str, pid: int | str) -> Path:
    # One file per worker process: the engine's workers each write theirs, and two
    # engines (of one process, or two servers sharing a directory) differ in instance_id.
    return Path(directory) / f"vattention-pages-{instance_id}-{pid}.txt"


# -- worker side -------------------------------------------------------------------------
class SlotCheck:
    """Slots layout: every request's block ids run on consecutively, step after step.

    That is the layout's promise (a kernel could address a request's KV without its
    block table), so the worker checks it on the blocks each step brings.
    """

    def __init__(self) -> None:
        self.last: dict[str, int] = {}
        self.requests = 0
        self.breaks = 0

    def observe(self, out) -> None:
        for req_id in out.finished_req_ids or ():
            self.last.pop(req_id, None)
        for req in out.scheduled_new_reqs:
            self._extend(req.req_id, req.block_ids[0], fresh=True)
        cached = out.scheduled_cached_reqs
        for req_id, ids in zip(cached.req_ids, cached.new_block_ids):
            if ids is not None:
                # A resumed request: up to 0.33 with the V1 runner listed here; with V2,
                # and always from 0.34 on, re-sent among the new ones.
                self._extend(req_id, ids[0],
                             fresh=req_id in getattr(cached, "resumed_req_ids", ()))

    def _extend(self, req_id: str, ids: list[int], fresh: bool) -> None:
        if not ids:
            return
        start = ids[0] if fresh or req_id not in self.last else self.last[req_id] + 1
        if list(ids) != list(range(start, start + len(ids))):
            self.breaks += 1
            if self.breaks == 1:
                logger.warning("vllm-ext vattention: request %s got blocks %s, not the next "
                               "ones in its slot (from %d)", req_id, list(ids)[:8], start)
        self.requests += fresh
        self.last[req_id] = ids[-1]


class PoolRuntime:
    """The worker's pool, applying each step's PageOps and publishing statistics.

    `published`: the file that told the scheduler the pool's physical pages; it goes
    with the pool.
    """

    def __init__(self, pool: VirtualKVPool, geo: Geometry, settings: VAttentionSettings,
                 published: Path | None = None, directory: str | None = None) -> None:
        self.pool = pool
        self.geo = geo
        self._published = published
        self.slots = SlotCheck() if settings.layout == "slots" else None
        # vLLM's null block is allocated for good and its page mapped with the pool.
        self.live_bytes = geo.block_bytes * geo.num_layers
        self.live_page_bytes = geo.page_bytes
        self._shut = False
        self._lock = threading.Lock()
        if directory:  # the engine's statistics folder (vllm_ext.statsdir)
            from vllm_ext.allocators.poolstats import PoolStatsWriter

            self._writer = PoolStatsWriter(directory)
        else:
            self._writer = None
        self._publish()
        atexit.register(self.shutdown)

    def step(self, scheduler_output) -> None:
        """Before the step runs: carry out its page orders (and check slots)."""
        if self.slots is not None:
            self.slots.observe(scheduler_output)
        self.apply(getattr(scheduler_output, OPS_ATTR, None))

    def apply(self, ops: PageOps | None) -> None:
        pool = self.pool
        with self._lock:
            if pool.idle():
                self._publish()  # the state the previous step's orders left, all carried out
            if not ops:
                return
            # Look-ahead maps still running for pages this step's new blocks are in.
            pool.wait(ops.touched)
            self.live_bytes = ops.live_blocks * self.geo.block_bytes * self.geo.num_layers
            self.live_page_bytes = ops.live_pages * self.geo.page_bytes
            if ops.map_now:
                pool.map(ops.map_now)
            if ops.unmap:
                pool.unmap(ops.unmap, fence=pool.backend.fence())
            if ops.map_ahead:
                pool.map_async(ops.map_ahead)
            # Samples show only states where every order has been carried out: this one
            # as soon as the pool is done (an idle engine sends no further step).
            last = pool.last_work()
            if last is not None:
                last.add_done_callback(self._publish_if_last)

    def _publish_if_last(self, work) -> None:
        # Runs on the pool's thread. Never block here: a step holding the lock may be
        # waiting for that thread, and it publishes at its start anyway.
        if not self._lock.acquire(blocking=False):
            return
        try:
            if work is self.pool.last_work() and work.exception() is None and not self._shut:
                self._publish()
        finally:
            self._lock.release()

    def _publish(self) -> None:
        if self._writer is not None:
            slots = self.slots or SlotCheck()
            self._writer.write(self.pool.stats(), live_bytes=self.live_bytes,
                               live_page_bytes=self.live_page_bytes,
                               slot_requests=slots.requests, slot_breaks=slots.breaks)

    def shutdown(self) -> None:
        with self._lock:
            if self._shut:
                return
            self._shut = True
            self.pool.wait()
            self._log_summary()
            if self._writer is not None:
                self._publish()
                self._writer.close()
                self._writer = None
            if self._published is not None:
                self._published.unlink(missing_ok=True)

    def _log_summary(self) -> None:
        s = self.pool.stats()
        share = s.critical_maps / s.maps if s.maps else 0.0
        logger.info(
            "vllm-ext vattention: reserved %s, mapped %s at shutdown; %d pages mapped (mean "
            "%.0f us, max %.0f us), %d unmapped (mean %.0f us); %.1f%% of maps on the critical "
            "path", _fmt(s.reserved_bytes), _fmt(s.mapped_bytes), s.maps,
            1e6 * s.map_seconds / max(s.maps, 1), 1e6 * s.max_map_seconds, s.unmaps,
            1e6 * s.unmap_seconds / max(s.unmaps, 1), 100 * share)


# Each engine's pool runtime, by its config (the worker's `vllm_config`): two engines
# of one process (vLLM's in-process mode) each get their own, and it goes with them.
_runtimes: dict[int, PoolRuntime] = {}


def runtime_for(vllm_config) -> PoolRuntime | None:
    """The pool runtime of the engine with this config, if vattention allocated its KV here."""
    return _runtimes.get(id(vllm_config))


def _drop(key: int) -> None:
    runtime = _runtimes.pop(key, None)
    if runtime is not None:
        runtime.shutdown()
        runtime.pool.close()


def allocate_kv_cache(vllm_config, kv_cache_config, device, layout, kernel_block_sizes,
                      settings: VAttentionSettings) -> dict:
    """vLLM's `allocate_kv_cache` for the engine with `vllm_config`, with the backing memory
    in a VirtualKVPool.

    Each layer's region is rounded up to whole pages, so the per-layer views differ
    from vLLM's only in where each layer starts.
    """
    from vllm.v1.kv_cache_interface import create_kv_cache_views

    if runtime_for(vllm_config) is not None:
        raise VAttentionError("this engine already holds a vattention KV pool; "
                              "re-initialising the KV cache is not supported")
    geo = geometry(kv_cache_config, settings)
    tensor = kv_cache_config.kv_cache_tensors[0]
    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    rank = _rank_note(vllm_config)
    backend = backend_for(settings, device)
    if geo.page_size % backend.granularity:
        raise VAttentionError(f"the device's mapping granularity does not divide the page size "
                              f"{geo.page_size} chosen by the scheduler; set "
                              f"--vattention-page-size to a multiple of {backend.granularity}")
    budget = physical_budget(geo, settings)
    max_model_len = vllm_config.model_config.max_model_len
    _refuse_if_short(_budget_source(settings), budget, geo, spec.block_size, max_model_len)
    pool = VirtualKVPool(geo.num_layers, geo.num_blocks * geo.block_bytes, geo.page_size,
                         backend=backend, physical_pages=budget)
    try:
        _check_provisioned(pool, geo, budget, spec.block_size, max_model_len, rank)
        directory = statsdir.for_engine(vllm_config)
        published = _publish(directory, vllm_config.instance_id, pool.physical_pages, budget,
                             geo.page_bytes)
    except BaseException:
        pool.close()
        raise
    placed = dataclasses.replace(tensor, size=pool.reserved_bytes, layer_stride=pool.region_bytes)
    kernel_block_size = kernel_block_sizes[0] if kernel_block_sizes else None
    # Padded block tables point at the null block, in page 0: mapped with the pool.
    views = create_kv_cache_views(pool.buffer, spec, geo.num_blocks, layout, placed,
                                  kernel_block_size=kernel_block_size)
    key = id(vllm_config)
    _runtimes[key] = PoolRuntime(pool, geo, settings, published, directory)
    weakref.finalize(vllm_config, _drop, key)
    logger.info("vllm-ext vattention: reserved %s of virtual KV memory (%d layers), physical "
                "memory for %d of %d pages set aside (%s), %s mapped%s", _fmt(pool.reserved_bytes),
                geo.num_layers, pool.physical_pages, budget,
                _fmt(pool.physical_pages * geo.page_bytes), _fmt(pool.mapped_bytes), rank)
    return dict(zip(tensor.layers, views))


def backend_for(settings: VAttentionSettings, device, driver=None):
    """The pool's physical backend, on the worker's own device.

    Under tensor parallelism each rank's worker runs on cuda:<local rank> (vLLM's GPU
    worker makes that torch's current device and hands it to the runner), so the pool
    reserves, creates and maps on it, not on device 0. `driver`: a stand-in for
    cuda-python's, for tests without a GPU.
    """
    if settings.backend == "cuda":
        return make_backend("cuda", device_index=device.index,
                            **({"driver": driver} if driver is not None else {}))
    return make_backend("host", limit=envs.host_kv_limit())


def _rank_note(vllm_config) -> str:
    """' on rank r of n' for a worker of a multi-rank engine (log and error text), else ''."""
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size <= 1:
        return ""
    return f" on rank {parallel.rank} of {parallel.tensor_parallel_size}"


def _check_provisioned(pool: VirtualKVPool, geo: Geometry, budget: int, block_size: int,
                       max_model_len: int, rank: str = "") -> None:
    """Refuse a pool that got too few pages for one request; say so when it got fewer
    than planned (the scheduler caps there, for every rank)."""
    got = pool.physical_pages
    what = (f"the {pool.backend.device} device's physical memory ({got} of the {budget} KV "
            f"pages planned{rank}; another process may have taken memory after vLLM measured "
            f"it)")
    _refuse_if_short(what, got, geo, block_size, max_model_len,
                     "free device memory, size the KV cache to what the device holds "
                     "(--gpu-memory-utilization, --vattention-physical-limit)")
    if got < budget:
        logger.warning("vllm-ext vattention: the %s device had physical memory for %d of the %d "
                       "KV pages planned%s; the scheduler caps the KV cache of every rank there",
                       pool.backend.device, got, budget, rank)


def _publish(directory: str | None, instance_id: str, pages: int, budget: int,
             page_bytes: int) -> Path | None:
    """Write down the worker's physical pages for the scheduler (`provisioned_pages`).

    Without a statistics directory (vllm-ext's front end always makes one; an engine
    configured without it has none) there is nowhere to write: the scheduler then plans
    with every page of its budget, so the worker must have got them all.
    """
    if directory is None:
        if pages < budget:
            raise VAttentionError(
                f"the device had physical memory for {pages} of the {budget} KV pages planned, "
                f"and without a statistics directory ({envs.STATS_DIR}) the scheduler cannot be "
                f"told: set --vattention-physical-limit to at most {pages * page_bytes} (bytes "
                f"per rank)")
        return None
    path = _pages_file(directory, instance_id, os.getpid())
    path.write_text(str(pages))
    return path


def _fmt(nbytes: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"

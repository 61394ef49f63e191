"""Patch: each step's page orders ride from the scheduler to the workers on the SchedulerOutput.

The scheduler decides which KV pages must be mapped; the workers own the memory,
in other processes on vLLM's CPU platform. vLLM 0.32 has no field for extension
data on the step it sends, so `Scheduler.schedule` is wrapped to attach the
drained `PageOps` as one extra attribute.

Invariant bent: a SchedulerOutput carries only vLLM's fields. Safe because the
attribute has a name vLLM does not use, survives the pickling to worker processes
(a plain dataclass instance), and is read only by the matching worker patch
(`page_ops_worker`); without the flag nothing is attached.
"""

from __future__ import annotations

import functools
from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_ext import envs
from vllm_ext.patches.base import Patch


class PageOpsSchedule(Patch):
    name = "page_ops_schedule"
    target = "vllm.v1.core.sched.scheduler:Scheduler.schedule"
    vllm_versions = SpecifierSet(">=0.32,<0.33")

    def _apply(self, owner: Any, attr: str, original: Any) -> None:
        @functools.wraps(original)
        def schedule(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if envs.kv_pool_selected():
                from vllm_ext.vattention import OPS_ATTR, PagedBlockPool

                pool = self.kv_cache_manager.block_pool
                if isinstance(pool, PagedBlockPool):
                    setattr(out, OPS_ATTR, pool.take_page_ops())
            return out

        setattr(owner, attr, schedule)

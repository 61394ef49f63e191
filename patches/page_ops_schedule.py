"""Patch: each step's page orders ride from the scheduler to the workers on the SchedulerOutput.

The scheduler decides which KV pages must be mapped; the workers own the memory,
in other processes on vLLM's CPU platform. vLLM 0.32 has no field for extension
data on the step it sends, so `Scheduler.schedule` is wrapped to attach the
drained `PageOps` as one extra attribute, for engines whose block pool is paged.

Invariant bent: a SchedulerOutput carries only vLLM's fields. Safe because the
attribute has a name vLLM does not use, survives the pickling to worker processes
(a plain dataclass instance), and is read only by the matching worker patch
(`page_ops_worker`); other engines get nothing attached.
"""

from __future__ import annotations

import functools
from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_ext.patches.base import ENGINE_CORE, Patch, Target


class PageOpsSchedule(Patch):
    """vattention: each step's page orders attached to the SchedulerOutput"""

    name = "page_ops_schedule"
    process = ENGINE_CORE
    targets = (Target("vllm.v1.core.sched.scheduler:Scheduler.schedule",
                      ("self", "throttle_prefills")),)
    vllm_versions = SpecifierSet(">=0.32,<0.35")
    components = ("kv_allocator=vattention",)

    def wrap(self, original: Any) -> Any:
        @functools.wraps(original)
        def schedule(sched, *args, **kwargs):
            out = original(sched, *args, **kwargs)
            pool = sched.kv_cache_manager.block_pool
            take = getattr(pool, "take_page_ops", None)
            if take is not None:
                from vllm_ext.engine.vattention import OPS_ATTR

                setattr(out, OPS_ATTR, take())
                self.reached()
            return out

        return schedule

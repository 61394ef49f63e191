"""Patch: each step's page orders ride from the scheduler to the workers on the SchedulerOutput.

The scheduler decides which KV pages must be mapped; the workers own the memory,
in other processes on vLLM's CPU platform. vLLM 0.32 has no field for extension
data on the step it sends, so `Scheduler.schedule` is wrapped to attach the
drained `PageOps` as one extra attribute. The wrapper is put on each vattention
engine's own scheduler when `paged_block_pool` makes its pool paged, not on vLLM's
class, so other engines' steps run vLLM's code alone.

Invariant bent: a SchedulerOutput carries only vLLM's fields. Safe because the
attribute has a name vLLM does not use, survives the pickling to worker processes
(a plain dataclass instance; under tensor parallelism every rank gets it with the
step), and is read only by the matching worker patch (`page_ops_worker`); other
engines get nothing attached.
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

    replaces = 0  # installed on each vattention engine (`install`, from paged_block_pool)

    def install(self, sched: Any) -> None:
        """Attach this scheduler's page orders to every step it schedules."""
        from vllm_ext.engine.vattention import OPS_ATTR

        original, take = sched.schedule, sched.kv_cache_manager.block_pool.take_page_ops

        @functools.wraps(original)
        def schedule(*args, **kwargs):
            out = original(*args, **kwargs)
            setattr(out, OPS_ATTR, take())
            self.reached()
            return out

        sched.schedule = schedule

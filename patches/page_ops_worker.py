"""Patch: the worker maps and unmaps KV pages as the step's orders say, before the step runs.

Counterpart of `page_ops_schedule`. vLLM 0.32 has no hook between receiving a step
and running it, so `Worker.execute_model` (which the CPU worker inherits) is wrapped;
it acts only for an engine whose KV cache is a vattention pool. Under tensor
parallelism every rank's worker receives the same step and carries out the same
orders in its own pool: block ids are shared across ranks, each rank's pages holding
its shard of the KV heads.

Invariant bent: a step's KV memory exists before the step. Safe because the
pages a step's blocks need are mapped (or their look-ahead mapping waited for)
before the original method runs; unmapped pages hold no live block, and on a GPU
their unmapping waits for a fence recorded after the work queued so far.
"""

from __future__ import annotations

import functools
from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_ext.patches.base import WORKER, Patch, Target


class PageOpsWorker(Patch):
    """vattention: the worker carries out each step's page orders before the step"""

    name = "page_ops_worker"
    process = WORKER
    targets = (Target("vllm.v1.worker.gpu_worker:Worker.execute_model",
                      ("self", "scheduler_output")),
               Target("vllm.v1.worker.gpu_worker:Worker", attrs=("vllm_config",)),
               # What the slots layout's check reads of each step (vattention.SlotCheck).
               Target("vllm.v1.core.sched.output:SchedulerOutput", attrs=(
                   "scheduled_new_reqs", "scheduled_cached_reqs", "finished_req_ids")),
               Target("vllm.v1.core.sched.output:NewRequestData", attrs=("req_id", "block_ids")),
               Target("vllm.v1.core.sched.output:CachedRequestData",
                      attrs=("req_ids", "new_block_ids")))
    vllm_versions = SpecifierSet(">=0.32,<0.35")
    components = ("kv_allocator=vattention",)

    def wrap(self, original: Any) -> Any:
        @functools.wraps(original)
        def execute_model(worker, scheduler_output, *args, **kwargs):
            from vllm_ext.engine.vattention import runtime_for

            rt = runtime_for(worker.vllm_config)
            if rt is not None:
                rt.step(scheduler_output)
                self.reached()
            return original(worker, scheduler_output, *args, **kwargs)

        return execute_model

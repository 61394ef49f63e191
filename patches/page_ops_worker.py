"""Patch: the worker maps and unmaps KV pages as the step's orders say, before the step runs.

Counterpart of `page_ops_schedule`. vLLM 0.32 has no hook between receiving a step
and running it, so `Worker.execute_model` (which the CPU worker inherits) is wrapped.

Invariant bent: a step's KV memory exists before the step. Safe because the
pages a step's blocks need are mapped (or their look-ahead mapping waited for)
before the original method runs; unmapped pages hold no live block, and on a GPU
their unmapping waits for a fence recorded after the work queued so far.
"""

from __future__ import annotations

import functools
from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_ext import envs
from vllm_ext.patches.base import Patch


class PageOpsWorker(Patch):
    name = "page_ops_worker"
    target = "vllm.v1.worker.gpu_worker:Worker.execute_model"
    vllm_versions = SpecifierSet(">=0.32,<0.33")

    def _apply(self, owner: Any, attr: str, original: Any) -> None:
        @functools.wraps(original)
        def execute_model(self, scheduler_output, *args, **kwargs):
            if envs.kv_pool_selected():
                from vllm_ext.vattention import runtime

                rt = runtime()
                if rt is not None:
                    rt.step(scheduler_output)
            return original(self, scheduler_output, *args, **kwargs)

        setattr(owner, attr, execute_model)

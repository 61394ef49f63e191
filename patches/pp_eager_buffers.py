"""Patch: pipeline parallelism on vLLM's CPU platform in eager mode.

A pipeline stage after the first receives the previous stage's activations into a
buffer the model runner allocates lazily, in its dummy run. vLLM 0.32's CPU worker
makes that run only to warm up compilation, and skips it in eager mode
(--enforce-eager), so the second stage's first real step fails on
`assert self.intermediate_tensors is not None` in
`sync_and_gather_intermediate_tensors`. The wrapper allocates the buffer there,
exactly as the dummy run would have, when a vllm-ext component was selected for
this engine; without one vLLM runs unchanged. Applied on the CPU platform only.

Invariant bent: none; the buffer has the size and dtype vLLM's dummy run gives it.
"""

from __future__ import annotations

import functools
from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_ext.patches.base import WORKER, Patch, Target


class PPEagerBuffers(Patch):
    """pipeline parallelism on CPU with --enforce-eager: the later stages' activation buffer"""

    name = "pp_eager_buffers"
    process = WORKER
    targets = (Target("vllm.v1.worker.gpu_model_runner:GPUModelRunner."
                      "sync_and_gather_intermediate_tensors",
                      ("self", "num_tokens", "intermediate_tensors", "sync_self")),)
    vllm_versions = SpecifierSet(">=0.32,<0.34")
    # 0.34's runner (V2; V1 is gone) makes the buffer when it loads the model.
    obsolete_from = "0.34"
    components = ("*",)
    platforms = ("cpu",)

    def wrap(self, original: Any) -> Any:
        from vllm_ext.config import ExtConfig

        @functools.wraps(original)
        def sync_and_gather_intermediate_tensors(runner, *args, **kwargs):
            if runner.intermediate_tensors is None and \
                    not ExtConfig.of(runner.vllm_config).is_empty():
                self.reached()
                runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
                    batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype,
                    device=runner.device)
            return original(runner, *args, **kwargs)

        return sync_and_gather_intermediate_tensors

"""Patch: vLLM's CPU platform honours the CUSTOM attention backend an engine selects.

A plugin's attention backend is registered as `AttentionBackendEnum.CUSTOM` and chosen
per engine with the engine argument `attention_backend="CUSTOM"`, as on CUDA. vLLM 0.32's
CPU platform ignores the choice and always returns CPU_ATTN, so the only other way in
is to re-register CPU_ATTN, which is process-wide and would reach every later engine of
the process. The wrapper returns the CUSTOM backend's path for an engine that selected
it, and calls the original otherwise.

Invariant bent: a CPU engine always runs CPU_ATTN. Safe because only engines that ask
for CUSTOM are affected; vllm-ext's POD backend keeps CPU_ATTN's KV-cache shape and
layout, and refuses (naming what it supports) any layer it cannot run.
"""

from __future__ import annotations

import functools
from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_ext.patches.base import WORKER, Patch, Target


class CpuCustomAttention(Patch):
    """the CPU platform honours attention_backend=CUSTOM (how --attn pod is chosen per engine)"""

    name = "cpu_custom_attn"
    process = WORKER
    targets = (Target("vllm.platforms.cpu:CpuPlatform.get_attn_backend_cls",
                      ("selected_backend", "attn_selector_config", "num_heads")),
               Target("vllm.v1.attention.backends.registry:AttentionBackendEnum.CUSTOM"))
    vllm_versions = SpecifierSet(">=0.32,<0.35")
    components = ("attn=pod",)
    platforms = ("cpu",)

    def wrap(self, original: Any) -> Any:
        func = original.__func__

        @functools.wraps(func)
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            from vllm.v1.attention.backends.registry import AttentionBackendEnum

            if selected_backend == AttentionBackendEnum.CUSTOM and \
                    not attn_selector_config.use_mla:
                self.reached()
                return AttentionBackendEnum.CUSTOM.get_path()
            return func(cls, selected_backend, attn_selector_config, num_heads)

        return classmethod(get_attn_backend_cls)

"""Patch: on vLLM's CPU platform, slot mapping that places each token on its KVP rank.

vLLM's CPU platform replaces the slot-mapping Triton kernel by a C++ op that has no
context parallelism (it asserts a world of 1), so `--kvp N` (vLLM's decode context
parallelism) cannot place KV on CPU ranks. Through vLLM's kernel-override registry
(`register_kernels`, the platform's own mechanism) the kernel is replaced, in a worker
of an engine that runs KVP, by one that deals tokens to ranks as vLLM's Triton kernel
does (`vllm_ext.kernels.kvp.slot_mapping`). The platform registers its op when the
worker starts, before the model (and so this) is built.

Invariant bent: the kernel is the platform's. Safe because launches of a single rank
(a world of 1) still go to the platform's own op, so a later engine of the same
process without KVP computes exactly as before.
"""

from __future__ import annotations

from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_ext.patches.base import WORKER, Patch, Target

KERNEL = "vllm.v1.worker.block_table.ComputeSlotMappingKernel.kernel"


class KVPSlotMapping(Patch):
    """--kvp on CPU: slot mapping that places each token on its rank"""

    name = "kvp_slot_mapping"
    process = WORKER
    targets = (Target("vllm.v1.worker.block_table:ComputeSlotMappingKernel.kernel",
                      ("num_tokens", "max_num_tokens", "query_start_loc_ptr", "positions_ptr",
                       "block_table_ptr", "block_table_stride", "slot_mapping_ptr",
                       "KV_CACHE_BLOCK_SIZE", "TOTAL_CP_WORLD_SIZE", "TOTAL_CP_RANK",
                       "CP_KV_CACHE_INTERLEAVE_SIZE", "PAD_ID", "BLOCK_SIZE")),
               Target("vllm.triton_utils.dispatcher:register_kernels", ("overrides",)))
    vllm_versions = SpecifierSet(">=0.32,<0.34")
    # 0.34's CPU platform runs vLLM's own Triton slot mapping (triton-cpu), which deals
    # tokens to context-parallel ranks itself.
    obsolete_from = "0.34"
    components = ("attn=pod",)  # with --kvp > 1
    platforms = ("cpu",)

    def needed_for(self, kind: str, name: str, settings: dict[str, Any]) -> bool:
        return super().needed_for(kind, name, settings) and (settings.get("kvp") or 1) > 1

    def __init__(self) -> None:
        super().__init__()
        self._installed = False

    def install(self) -> None:
        """In a worker of a KVP engine: put the rank-aware kernel in place (once)."""
        if self._installed:
            return
        from vllm.triton_utils.dispatcher import register_kernels
        from vllm.v1.worker.block_table import ComputeSlotMappingKernel

        platform_op = getattr(ComputeSlotMappingKernel.kernel, "_impl", None)
        register_kernels({KERNEL: self._kernel(platform_op)})
        self._installed = True

    def _kernel(self, platform_op: Any):
        import torch

        from vllm_ext.kernels.kvp import slot_mapping

        def kvp_slot_mapping(num_tokens, max_num_tokens, query_start_loc, positions,
                             block_table, block_table_stride, slot_mapping_out,
                             KV_CACHE_BLOCK_SIZE, TOTAL_CP_WORLD_SIZE=1, TOTAL_CP_RANK=0,
                             CP_KV_CACHE_INTERLEAVE_SIZE=1, PAD_ID=-1, BLOCK_SIZE=1024):
            # Launched like the Triton kernel it stands for: its arguments, in its order.
            if TOTAL_CP_WORLD_SIZE == 1 and platform_op is not None:
                return platform_op(num_tokens, max_num_tokens, query_start_loc, positions,
                                   block_table, block_table_stride, slot_mapping_out,
                                   KV_CACHE_BLOCK_SIZE, TOTAL_CP_WORLD_SIZE, TOTAL_CP_RANK,
                                   CP_KV_CACHE_INTERLEAVE_SIZE, PAD_ID, BLOCK_SIZE)
            self.reached()
            starts = query_start_loc.long()
            request = torch.repeat_interleave(torch.arange(len(starts) - 1),
                                              starts.diff())[:num_tokens]
            table = block_table.reshape(-1, block_table_stride)
            slot_mapping_out[:num_tokens] = slot_mapping(
                positions[:num_tokens].long(), request, table, KV_CACHE_BLOCK_SIZE,
                TOTAL_CP_WORLD_SIZE, TOTAL_CP_RANK, CP_KV_CACHE_INTERLEAVE_SIZE, PAD_ID)
            slot_mapping_out[num_tokens:max_num_tokens] = PAD_ID

        return kvp_slot_mapping

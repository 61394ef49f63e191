"""`--attn pod`: POD-Attention as vLLM's attention backend on the CPU platform.

The backend keeps vLLM's CPU KV-cache tensor and its layout ([blocks, kv_heads,
2 * block_size rows of head_dim]: a block's keys, then its values) but writes the
rows itself, plainly, so that the kernel reads them through strided views with no
copy. Its metadata builder asks vLLM to put decodes first, as the kernel expects.
With `--kvp N` (vLLM's decode context parallelism) each rank holds a share of every
request's KV; the backend computes all heads of the step's queries over that share
with its LSE, and merges the ranks' results exactly (`kernels/kvp.py`, `kernels/merge.py`).

An engine selects it with `attention_backend="CUSTOM"` (vllm-ext registers this class as
CUSTOM in every process); its settings (`--pod-impl`) come from the engine's own config.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadataBuilder)

from vllm_ext.engine.pod.support import check_layer
from vllm_ext.engine.pod.support import impl as pod_impl
from vllm_ext.kernels import reference
from vllm_ext.kernels.kvp import shard_attention
from vllm_ext.kernels.limits import SUPPORTED_HEAD_DIMS, leading_decodes
from vllm_ext.kernels.merge import merge_attention


def _triton_kernels():
    """The Triton kernel module. On a CPU, Triton only interprets, which it must be told
    before it is first imported (its own library functions are decorated then); vLLM
    imports it at the start of every process, so the interpreter comes from the
    environment the process started with (see `_configure_pod`)."""
    from vllm.platforms import current_platform

    if current_platform.device_type == "cpu":
        from triton import knobs

        if not knobs.runtime.interpret:
            raise RuntimeError("--pod-impl triton on a CPU runs Triton's interpreter, which "
                               "must be on before Triton is imported: start this process "
                               "with TRITON_INTERPRET=1 (vllm-ext sets it for the engine "
                               "processes it starts), or use --pod-impl torch")
    from vllm_ext.kernels import pod

    return pod


class PodAttentionBackend(CPUAttentionBackend):
    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_DIMS)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        from vllm.v1.attention.backend import AttentionType

        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls():
        return PodAttentionImpl

    @staticmethod
    def get_builder_cls():
        return PodMetadataBuilder


class PodMetadataBuilder(CPUAttentionMetadataBuilder):
    # Decodes (one query token) first: the kernel's grid is laid out that way.
    reorder_batch_threshold = 1

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if torch.device(device).type == "cpu":
            # vLLM keeps each process's backend choice, so a later engine of the process
            # is served by the patched selector's earlier answer: count it here.
            from vllm_ext.patches import patch

            patch("cpu_custom_attn").reached()
            patch("pod_cpu_internals").reached()  # the CPU classes this backend extends
        self._plan = self.workspace = None
        if pod_impl(vllm_config) == "triton":
            import functools

            pod = _triton_kernels()
            tile = pod.tile_for(kv_cache_spec.head_size, vllm_config.model_config.dtype)
            # One workspace for every launch of this builder's layers, sized for the
            # engine's largest step, as on CUDA (vllm_ext.engine.pod.cuda).
            sched = vllm_config.scheduler_config
            self.workspace = pod.Workspace.for_batches(
                device, max_seqs=sched.max_num_seqs, max_tokens=sched.max_num_batched_tokens,
                num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                head_dim=kv_cache_spec.head_size, block_m=tile.block_m)
            self._plan = functools.partial(pod.plan, block_m=tile.block_m,
                                           workspace=self.workspace)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        md.num_decode_tokens = leading_decodes(md.query_start_loc)
        # The kernel's tile list is per step, not per layer: plan it once here.
        md.pod_plan = (self._plan(md.query_start_loc, md.seq_lens, md.num_decode_tokens,
                                  self.num_heads, self.num_kv_heads)
                       if self._plan is not None else None)
        md.pod_workspace = self.workspace
        return md


class PodAttentionImpl(CPUAttentionBackendImpl):
    # vLLM's decode context parallelism asks for both; the base class's __new__ reads them.
    can_return_lse_for_decode = True
    supports_dcp = True

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type="decoder",
                 kv_sharing_target_layer_name=None, sinks=None) -> None:
        check_layer(head_size, kv_cache_dtype, attn_type, alibi_slopes, sliding_window,
                    logits_soft_cap, sinks)
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name,
                         sinks)
        from vllm.config import get_current_vllm_config

        config = get_current_vllm_config()
        triton = pod_impl(config) == "triton"
        self.kernel = _triton_kernels().pod_attention if triton else reference.pod_attention
        if self.dcp_world_size > 1:
            from vllm_ext.patches import patch

            self.kvp_interleave = config.parallel_config.cp_kv_cache_interleave_size
            patch("kvp_slot_mapping").install()

    @staticmethod
    def _kv_views(kv_cache):
        """[blocks, kv_heads, 2 * block_size, head_dim] -> key and value caches as the
        kernel indexes them, [blocks, block_size, kv_heads, head_dim] (strided views)."""
        blocks, heads, block_size, _ = kv_cache.shape
        rows = kv_cache.view(blocks, heads, 2 * block_size, -1)
        key, value = rows[:, :, :block_size], rows[:, :, block_size:]
        return key.transpose(1, 2), value.transpose(1, 2)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        key_cache, value_cache = self._kv_views(kv_cache)
        n = slot_mapping.shape[0]
        slots = slot_mapping.long()
        keep = slots >= 0  # padding tokens carry slot -1
        block_size = key_cache.shape[1]
        blocks, offsets = slots[keep] // block_size, slots[keep] % block_size
        key_cache[blocks, offsets] = key[:n][keep].to(key_cache.dtype)
        value_cache[blocks, offsets] = value[:n][keep].to(value_cache.dtype)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("--attn pod: fused output quantization is not supported")
        if attn_metadata is None:  # profiling run
            return output
        n = attn_metadata.num_actual_tokens
        key_cache, value_cache = self._kv_views(kv_cache)
        out = output[:n].view(n, self.num_heads, self.head_size)
        if self.dcp_world_size > 1:
            self._forward_kvp(query[:n].reshape(n, self.num_heads, self.head_size), key_cache,
                              value_cache, attn_metadata, out)
            return output
        self.kernel(query[:n].reshape(n, self.num_heads, self.head_size), key_cache, value_cache,
                    attn_metadata.block_table, attn_metadata.seq_lens,
                    attn_metadata.query_start_loc, attn_metadata.num_decode_tokens, self.scale,
                    out=out, **({"pod_plan": attn_metadata.pod_plan,
                                 "workspace": attn_metadata.pod_workspace}
                                if attn_metadata.pod_plan is not None else {}))
        return output

    def _forward_kvp(self, query, key_cache, value_cache, md, out) -> None:
        """This rank's heads of attention over KV sharded across the DCP group: every
        rank attends all the group's heads over its share, then each merges its heads."""
        from vllm.distributed.parallel_state import get_dcp_group

        group, ranks, rank = get_dcp_group(), self.dcp_world_size, self.dcp_rank
        n, heads = query.shape[:2]
        every_head = group.all_gather(query.contiguous(), dim=1)  # [n, ranks * heads, d]
        shard = (ranks, rank, self.kvp_interleave)
        if self.kernel is reference.pod_attention:
            part, lse = shard_attention(every_head, key_cache, value_cache, md.block_table,
                                        md.seq_lens, md.query_start_loc, self.scale, *shard)
        else:  # the step's plan is for this rank's heads: the launch plans for the group's
            part, lse = self.kernel(every_head, key_cache, value_cache, md.block_table,
                                    md.seq_lens, md.query_start_loc, md.num_decode_tokens,
                                    self.scale, return_lse=True, kv_shard=shard)
        parts = group.all_gather(part, dim=0).view(ranks, n, ranks, heads, -1)[:, :, rank]
        lses = group.all_gather(lse, dim=0).view(ranks, n, ranks, heads)[:, :, rank]
        merged, _ = merge_attention(list(parts), list(lses))
        out.copy_(merged)

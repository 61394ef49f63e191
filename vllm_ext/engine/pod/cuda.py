"""`--attn pod` on CUDA: POD-Attention as vLLM's CUSTOM attention backend.

It is TRITON_ATTN's backend with POD's metadata and forward: the KV cache keeps the
Triton layout ([blocks, kv_heads, block_size, 2 * head_size], K and V the two halves
of the last dimension) and is written by vLLM's own writer (TritonAttentionImpl's
`do_kv_cache_update`, `triton_reshape_and_cache_flash`); the forward reads it through
strided views in one POD launch per layer.

The step's plan (prefill tiles, decode splits, the prefill:decode ticket ratio) is made
once per step by the metadata builder from the host copy of the batch's query_start_loc,
so no layer waits on the device. Decodes come first under both model runners: V1
honours `reorder_batch_threshold = 1`, V2 always sorts them first. A batch that is not
ordered so is still exact: only its leading one-token requests run as decode tiles.

`--kvp N` is vLLM's decode context parallelism: each rank of the DCP group holds every
request's KV in runs of `cp_kv_cache_interleave_size` tokens dealt round-robin (this
step's tokens too, written before attention). A rank gathers the group's query heads,
attends all of them over its share in one POD launch (each key at its own position in
the sequence, so causality is exact; a query that sees none of the share gets LSE
-inf), and vLLM's own collective (`cp_lse_ag_out_rs`: the LSEs all-gathered, each
output rescaled, then reduce-scattered over heads) leaves each rank its heads' exact
result.

CUDA graphs: UNIFORM_SINGLE_TOKEN_DECODE. vLLM captures full graphs of decode-only steps,
one per batch size, and replays them for every decode step it pads to a captured size;
steps with prefills run attention eagerly between piecewise graphs. A decode step's launch
is the same for every batch of one padded size (`kernels.pod`: its split count depends on
the size alone; each request's context and span are read from device memory; padding
requests, with no query token, do nothing), and it reads only vLLM's persistent metadata
buffers and the builder's Workspace, allocated once at construction for the engine's
largest batch and written in place: the prefill work list through one pinned staging
buffer. `--pod-impl torch` reads the batch on the host, so it declares NEVER.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
)

from vllm_ext.engine.pod.support import DTYPES, check_layer, impl, refusal, unsupported
from vllm_ext.kernels import reference
from vllm_ext.kernels.limits import SUPPORTED_HEAD_DIMS, leading_decodes

IMPL_DEFAULT = "triton"


@dataclass
class PodCudaMetadata:
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    num_decodes: int  # the leading one-token requests
    plan: Any = None  # kernels.pod.PodPlan (--pod-impl triton)
    workspace: Any = None  # kernels.pod.Workspace, the builder's (--pod-impl triton)


class PodCudaBackend(TritonAttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = list(DTYPES)
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # vLLM looks the layer's backend up by this name

    @staticmethod
    def get_impl_cls() -> type[PodCudaImpl]:
        return PodCudaImpl

    @staticmethod
    def get_builder_cls() -> type[PodCudaMetadataBuilder]:
        return PodCudaMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_DIMS)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size in SUPPORTED_HEAD_DIMS

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == "decoder"

    # What TRITON_ATTN runs and the POD kernel does not.
    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_rswa(cls) -> bool:
        return False

    @classmethod
    def supports_alibi_sqrt(cls) -> bool:
        return False

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        return False

    @classmethod
    def validate_configuration(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla,
                               has_sink, use_sparse, use_mm_prefix, use_per_head_quant_scales,
                               device_capability, attn_type, **more) -> list[str]:
        """vLLM's CUDA platform refuses the selected backend with these reasons."""
        reasons = unsupported(
            head_size, kv_cache_dtype, attn_type, dtype,
            MLA=use_mla, attention_sinks=has_sink, sparse_attention=use_sparse,
            multimodal_prefix_attention=use_mm_prefix,
            per_head_quantization_scales=use_per_head_quant_scales,
            sliding_windows=more.get("has_sliding_window", False),
            non_causal_attention=more.get("use_non_causal", False),
            batch_invariance=more.get("use_batch_invariant", False),
            prefill_context_parallelism=more.get("use_pcp", False),
            restricted_sliding_windows=more.get("use_rswa", False))
        if reasons:
            return [refusal(reasons)]
        return super().validate_configuration(
            head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink, use_sparse,
            use_mm_prefix, use_per_head_quant_scales, device_capability, attn_type, **more)


class PodCudaMetadataBuilder(AttentionMetadataBuilder[PodCudaMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)
    reorder_batch_threshold: int | None = 1

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        if impl(vllm_config, IMPL_DEFAULT) != "triton":
            return AttentionCGSupport.NEVER  # the reference reads the batch on the host
        return cls._cudagraph_support

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        from vllm_ext.patches import patch

        patch("pod_cuda_internals").reached()  # the vLLM classes this backend builds on
        model, parallel = vllm_config.model_config, vllm_config.parallel_config
        # With KVP a rank attends every head of its DCP group.
        self.num_heads = (model.get_num_attention_heads(parallel)
                          * parallel.decode_context_parallel_size)
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        self.device = torch.device(device)
        self._plan = self.workspace = None
        if impl(vllm_config, IMPL_DEFAULT) == "triton":
            self._plan, self.workspace = self._planner(kv_cache_spec, vllm_config)

    def _planner(self, kv_cache_spec, vllm_config):
        """The step's planner and the Workspace every launch of this builder's layers
        uses, sized for the engine's largest step (its batch limits, and any captured
        graph's size) so that it never grows while serving."""
        from vllm_ext.kernels import pod

        parallel = vllm_config.parallel_config
        if parallel.use_ubatching:
            # Microbatches run their layers' launches on two streams at once, and build
            # their metadata one after the other: one workspace cannot serve both.
            raise ValueError("--attn pod does not run with microbatching (--enable-dbo, "
                             "--ubatch-size): run without it, or with --attn vllm")
        tile = pod.tile_for(kv_cache_spec.head_size, kv_cache_spec.dtype,
                            sharded=parallel.decode_context_parallel_size > 1)
        sched = vllm_config.scheduler_config
        graphs = vllm_config.compilation_config.max_cudagraph_capture_size or 0
        workspace = pod.Workspace.for_batches(
            self.device, max_seqs=max(sched.max_num_seqs, graphs),
            max_tokens=max(sched.max_num_batched_tokens, graphs), num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, head_dim=kv_cache_spec.head_size,
            block_m=tile.block_m)
        return functools.partial(pod.plan, block_m=tile.block_m, device=self.device,
                                 workspace=workspace), workspace

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False
              ) -> PodCudaMetadata:
        cam = common_attn_metadata
        qsl = cam.query_start_loc_cpu[:cam.num_reqs + 1]
        num_decodes = leading_decodes(qsl)  # host memory: no device sync
        plan = None
        if self._plan is not None:
            # Of the device's seq_lens the plan reads only their count (the kernel reads
            # their values), so planning never waits on the device.
            plan = self._plan(qsl, cam.seq_lens, num_decodes, self.num_heads, self.num_kv_heads)
        return PodCudaMetadata(
            num_actual_tokens=cam.num_actual_tokens, max_query_len=cam.max_query_len,
            max_seq_len=cam.max_seq_len, query_start_loc=cam.query_start_loc,
            seq_lens=cam.seq_lens, block_table=cam.block_table_tensor,
            slot_mapping=cam.slot_mapping, num_decodes=num_decodes, plan=plan,
            workspace=self.workspace)

    def build_for_cudagraph_capture(self, common_attn_metadata) -> PodCudaMetadata:
        """vLLM captures full graphs of decode-only steps alone (the support declared). A
        graph of a step with prefill tiles would replay their count and work list for
        steps that have others: refused."""
        md = self.build(0, common_attn_metadata)
        if md.plan is not None and md.plan.num_prefill_tiles:
            raise ValueError(f"--attn pod captures decode-only steps in full CUDA graphs; this "
                             f"step has {md.plan.num_prefill_tiles} prefill tiles")
        return md


class PodCudaImpl(TritonAttentionImpl):
    """TRITON_ATTN's KV writer (inherited `do_kv_cache_update`), POD's forward."""

    # vLLM's decode context parallelism: accepted by its backend selection
    # (`supports_dcp`); the shard's LSE is returned for its merge.
    supports_dcp = True
    can_return_lse_for_decode = True

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type="decoder",
                 kv_sharing_target_layer_name=None, sinks=None, **more) -> None:
        check_layer(head_size, kv_cache_dtype, attn_type, alibi_slopes, sliding_window,
                    logits_soft_cap, sinks)
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name,
                         sinks, **more)
        from vllm.config import get_current_vllm_config

        config = get_current_vllm_config()
        self.triton = impl(config, IMPL_DEFAULT) == "triton"
        if self.triton:
            from vllm_ext.kernels.pod import pod_attention

            self.kernel = pod_attention
        else:
            self.kernel = reference.pod_attention
        self.kvp_interleave = config.parallel_config.cp_kv_cache_interleave_size

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("--attn pod: fused output quantization is not supported")
        if attn_metadata is None:  # the profiling run
            return output.fill_(0)
        md: PodCudaMetadata = attn_metadata
        n = md.num_actual_tokens
        # (B, H, N, 2*hs) -> K and V as (B, N, H, hs): strided views, as the writer sees them.
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        out = output[:n].view(n, self.num_heads, self.head_size)
        query = query[:n].view(n, self.num_heads, self.head_size)
        if self.dcp_world_size > 1:
            out.copy_(self._forward_kvp(query, key_cache, value_cache, md))
            return output
        launch = ({"pod_plan": md.plan, "workspace": md.workspace} if md.plan is not None
                  else {})
        self.kernel(query, key_cache, value_cache, md.block_table, md.seq_lens,
                    md.query_start_loc, md.num_decodes, self.scale, out=out, **launch)
        return output

    def _forward_kvp(self, query, key_cache, value_cache, md) -> torch.Tensor:
        """This rank's heads of attention over KV sharded across the DCP group."""
        from vllm.distributed.parallel_state import get_dcp_group
        from vllm.v1.attention.ops.dcp import cp_lse_ag_out_rs

        group = get_dcp_group()
        shard = (self.dcp_world_size, self.dcp_rank, self.kvp_interleave)
        every_head = group.all_gather(query.contiguous(), dim=1)  # [n, ranks * heads, d]
        if self.triton:
            part, lse = self.kernel(every_head, key_cache, value_cache, md.block_table,
                                    md.seq_lens, md.query_start_loc, md.num_decodes, self.scale,
                                    return_lse=True, pod_plan=md.plan, kv_shard=shard,
                                    workspace=md.workspace)
        else:
            from vllm_ext.kernels.kvp import shard_attention

            part, lse = shard_attention(every_head, key_cache, value_cache, md.block_table,
                                        md.seq_lens, md.query_start_loc, self.scale, *shard)
        return cp_lse_ag_out_rs(part, lse, group, is_lse_base_on_e=True)

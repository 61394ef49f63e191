"""vLLM internals that components read, steer or extend without patching them, declared.

A scheduler class is vLLM's supported hook (`scheduler_cls`), but what the policies do
inside it touches vLLM's own state: they set a request's decode-eligibility step to sit
a prefill (or, for a stricter SLO class, a decode) out, read its sampling parameters'
`extra_args` (the request's `vllm_xargs`), rewrite the step's token budget, and reorder the waiting queue in place.
An attention backend is a supported hook too, but POD's CPU backend subclasses vLLM's
CPU classes and overrides their KV writer. None of that is API. Declared here, a vLLM
that renamed or reshaped any of it refuses the component by name (`vllm-ext doctor` shows
which), also under VLLMEXT_ALLOW_ANY_VLLM, instead of an AttributeError mid-step or, worse,
a policy silently steering nothing.

Relied on, not bent: vLLM's loop reads `max_num_scheduled_tokens` afresh every step,
skips a running request while `current_step < next_decode_eligible_step`, and takes
waiting requests from the head of its deque-based FCFS queue, so an order written there
is the order served; the CPU backend calls `do_kv_cache_update` before `forward` with the
step's slot mapping. The property and engine tests check these readings on every
release's real classes; these declarations catch the names.
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet

from vllm_ext.patches.base import ENGINE_CORE, WORKER, Reliance, Target

_SCHED = "vllm.v1.core.sched"


class SchedulerInternals(Reliance):
    """schedulers: vLLM scheduler state the policies read and steer"""

    name = "scheduler_internals"
    process = ENGINE_CORE
    targets = (
        Target(f"{_SCHED}.scheduler:Scheduler", attrs=(
            "requests", "running", "waiting", "kv_cache_manager", "block_size",
            "hash_block_size", "max_num_scheduled_tokens", "max_num_active_reqs",
            "current_step", "parallel_config", "scheduler_reserve_full_isl")),
        Target(f"{_SCHED}.scheduler:Scheduler.schedule", ("self", "throttle_prefills")),
        Target(f"{_SCHED}.scheduler:Scheduler.update_from_output",
               ("self", "scheduler_output", "model_runner_output")),
        Target(f"{_SCHED}.scheduler:Scheduler.add_request", ("self", "request")),
        Target(f"{_SCHED}.async_scheduler:AsyncScheduler"),
        Target("vllm.v1.request:Request", attrs=(
            "request_id", "arrival_time", "status", "num_prompt_tokens", "num_tokens",
            "num_output_tokens", "num_output_placeholders", "num_computed_tokens",
            "is_prefill_chunk", "max_tokens", "num_preemptions", "next_decode_eligible_step",
            "block_hashes", "sampling_params", "is_finished")),
        # A request's vllm_xargs, where per-request SLOs travel (vllm_ext.schedulers.slo).
        Target("vllm.sampling_params:SamplingParams", attrs=("extra_args",)),
        # The tokens a step sampled, per request: what per-request TBT deadlines walk.
        Target("vllm.v1.outputs:ModelRunnerOutput", attrs=("req_ids", "sampled_token_ids")),
        Target(f"{_SCHED}.output:SchedulerOutput", attrs=(
            "num_scheduled_tokens", "total_num_scheduled_tokens", "preempted_req_ids")),
        # Called with the request alone (0.33 added an optional cap on the hit).
        Target("vllm.v1.core.kv_cache_manager:KVCacheManager.get_computed_blocks",
               ("self", "request", "...")),
        Target("vllm.v1.core.kv_cache_manager:KVCacheBlocks", attrs=("blocks",)),
        Target("vllm.v1.core.kv_cache_utils:KVCacheBlock", attrs=("ref_cnt",)),
        Target("vllm.v1.core.block_pool:BlockPool.get_num_free_blocks", ("self",)),
        # Mnemosyne keeps the waiting queue in its order (vllm_ext.engine.waiting_order):
        # a new way for vLLM to take from it could serve another order.
        Target(f"{_SCHED}.request_queue:FCFSRequestQueue", methods=(
            "__bool__", "__iter__", "__len__", "add_request", "peek_request", "pop_request",
            "prepend_request", "prepend_requests", "remove_request", "remove_requests")),
    )
    vllm_versions = SpecifierSet(">=0.32,<0.35")
    components = ("scheduler=vllm", "scheduler=sarathi", "scheduler=mnemosyne",
                  "scheduler=prefill-first")


class EngineIdentity(Reliance):
    """statistics: the engine index and model name that label each engine's series"""

    name = "engine_identity"
    process = ENGINE_CORE
    targets = (
        # An engine's data-parallel index, which vLLM keeps also for dense models whose
        # ranks it runs as independent DP=1 engines (data_parallel_rank reset to 0): the
        # `engine` label of its own per-engine series (vllm_ext.statsdir).
        Target("vllm.config.parallel:ParallelConfig", attrs=("data_parallel_index",)),
        Target("vllm.config.model:ModelConfig", attrs=("served_model_name",)),
    )
    vllm_versions = SpecifierSet(">=0.32,<0.35")
    components = ("scheduler=vllm", "scheduler=sarathi", "scheduler=mnemosyne",
                  "scheduler=prefill-first", "kv_allocator=vattention")


_CPU_ATTN = "vllm.v1.attention.backends.cpu_attn"
# How vLLM constructs and calls an attention implementation (POD's subclass one on each
# platform and pass these through).
_IMPL_INIT = ("self", "num_heads", "head_size", "scale", "num_kv_heads", "alibi_slopes",
              "sliding_window", "kv_cache_dtype", "logits_soft_cap", "attn_type",
              "kv_sharing_target_layer_name", "sinks")
_IMPL_FORWARD = ("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output",
                 "output_scale", "output_block_scale")


class PodCpuInternals(Reliance):
    """--attn pod (CPU): the CPU attention classes POD's backend extends"""

    name = "pod_cpu_internals"
    process = WORKER
    platforms = ("cpu",)
    targets = (
        Target(f"{_CPU_ATTN}:CPUAttentionMetadataBuilder.__init__",
               ("self", "kv_cache_spec", "layer_names", "vllm_config", "device")),
        Target(f"{_CPU_ATTN}:CPUAttentionMetadataBuilder.build",
               ("self", "common_prefix_len", "common_attn_metadata", "fast_build")),
        Target(f"{_CPU_ATTN}:CPUAttentionMetadataBuilder", attrs=("num_heads", "num_kv_heads")),
        # The builder's metadata, which POD's forward reads and extends with its plan.
        Target(f"{_CPU_ATTN}:CPUAttentionMetadata", attrs=(
            "num_actual_tokens", "query_start_loc", "seq_lens", "block_table",
            "num_decode_tokens")),
        Target(f"{_CPU_ATTN}:CPUAttentionBackendImpl.__init__", _IMPL_INIT),
        # Overridden: POD writes the rows of vLLM's CPU KV layout itself.
        Target(f"{_CPU_ATTN}:CPUAttentionBackendImpl.do_kv_cache_update",
               ("self", "layer", "key", "value", "kv_cache", "slot_mapping")),
        Target(f"{_CPU_ATTN}:CPUAttentionBackendImpl.forward", _IMPL_FORWARD),
        Target(f"{_CPU_ATTN}:CPUAttentionBackendImpl", attrs=(
            "num_heads", "head_size", "scale", "dcp_world_size", "dcp_rank")),
        Target("vllm.distributed.parallel_state:get_dcp_group"),
        Target("vllm.config.parallel:ParallelConfig", attrs=("cp_kv_cache_interleave_size",)),
    )
    vllm_versions = SpecifierSet(">=0.32,<0.35")
    components = ("attn=pod",)


_BACKEND = "vllm.v1.attention.backend"
_TRITON_ATTN = "vllm.v1.attention.backends.triton_attn"


class PodCudaInternals(Reliance):
    """--attn pod (CUDA): the Triton attention classes and metadata POD's backend builds on"""

    name = "pod_cuda_internals"
    process = WORKER
    platforms = ("cuda",)
    targets = (
        Target(f"{_BACKEND}:AttentionMetadataBuilder.__init__",
               ("self", "kv_cache_spec", "layer_names", "vllm_config", "device")),
        # The graph support POD declares, and how vLLM asks for it and captures.
        Target(f"{_BACKEND}:AttentionMetadataBuilder.get_cudagraph_support",
               ("vllm_config", "kv_cache_spec")),
        Target(f"{_BACKEND}:AttentionMetadataBuilder.build_for_cudagraph_capture",
               ("self", "common_attn_metadata")),
        Target(f"{_BACKEND}:AttentionCGSupport", attrs=("UNIFORM_SINGLE_TOKEN_DECODE", "NEVER")),
        Target(f"{_BACKEND}:CommonAttentionMetadata", attrs=(
            "query_start_loc", "query_start_loc_cpu", "seq_lens", "num_reqs",
            "num_actual_tokens", "max_query_len", "max_seq_len", "block_table_tensor",
            "slot_mapping")),
        # TRITON_ATTN's KV layout and writer (`do_kv_cache_update`, inherited), POD's forward.
        Target(f"{_BACKEND}:AttentionBackend.validate_configuration", (
            "head_size", "dtype", "kv_cache_dtype", "block_size", "use_mla", "has_sink",
            "use_sparse", "use_mm_prefix", "use_per_head_quant_scales", "device_capability",
            "attn_type", "...")),
        Target(f"{_TRITON_ATTN}:TritonAttentionImpl.__init__", (*_IMPL_INIT, "...")),
        Target(f"{_TRITON_ATTN}:TritonAttentionImpl.forward", _IMPL_FORWARD),
        Target(f"{_TRITON_ATTN}:TritonAttentionImpl", attrs=(
            "do_kv_cache_update", "num_heads", "head_size", "scale", "dcp_world_size",
            "dcp_rank")),
        Target("vllm.distributed.parallel_state:get_dcp_group"),
        Target("vllm.v1.attention.ops.dcp:cp_lse_ag_out_rs"),
        # What sizes the builder's workspace and refuses microbatching.
        Target("vllm.config.parallel:ParallelConfig", attrs=(
            "decode_context_parallel_size", "cp_kv_cache_interleave_size", "use_ubatching")),
        Target("vllm.config.scheduler:SchedulerConfig",
               attrs=("max_num_seqs", "max_num_batched_tokens")),
        Target("vllm.config.compilation:CompilationConfig",
               attrs=("max_cudagraph_capture_size",)),
    )
    vllm_versions = SpecifierSet(">=0.32,<0.35")
    components = ("attn=pod",)

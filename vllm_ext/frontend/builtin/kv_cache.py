"""The KV-cache allocators: `--kv-allocator vllm | vattention`, from flags to engine
arguments. The glue inside the engine is `vllm_ext.engine.vattention`; the pool and page
planner, `vllm_ext.allocators`."""

from __future__ import annotations

from dataclasses import asdict

from vllm_ext.allocators.settings import LAYOUTS, VAttentionSettings, size_in_bytes
from vllm_ext.frontend.components import Component, ConfigureContext, Option, SelectionError
from vllm_ext.frontend.hookspecs import hookimpl


def _configure_stock_kv(settings: dict, ctx: ConfigureContext) -> tuple[dict, dict]:
    return {}, {}


_KV_BACKENDS = {"cpu": "host", "cuda": "cuda"}


def _engine_has(arg: str) -> bool:
    """Whether the installed vLLM's engine takes this argument."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    return arg in {f.name for f in dataclasses.fields(EngineArgs)}


def _configure_vattention(settings: dict, ctx: ConfigureContext) -> tuple[dict, dict]:
    backend = _KV_BACKENDS.get(ctx.platform)
    if backend is None:
        raise SelectionError(f"--kv-allocator vattention runs on vLLM's cpu and cuda platforms, "
                             f"not {ctx.platform!r}")
    # Tensor parallelism is fine: every rank pools its own shard of the KV heads under
    # the block ids all ranks share, and carries out the one page plan (docs/vattention.md).
    args = ctx.user_engine_args
    if (args.get("pipeline_parallel_size") or 1) > 1:
        raise SelectionError(
            f"--kv-allocator vattention runs under tensor parallelism, not pipeline "
            f"parallelism (pipeline_parallel_size={args['pipeline_parallel_size']} was given): "
            f"the stages hold different layers, so a stage's KV page can be larger than the "
            f"first stage's, which the scheduler plans from, and fit fewer pages under a "
            f"per-rank cap, and no engine run checks that in this release; spread the model "
            f"with --tensor-parallel-size instead")
    for key in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if (args.get(key) or 1) > 1:
            raise SelectionError(
                f"--kv-allocator vattention runs under tensor parallelism, not context "
                f"parallelism ({key}={args[key]} was given): each rank would hold only some "
                f"tokens of every block, which vattention is not checked with in this release; "
                f"use --tensor-parallel-size alone")
    given = {k: v for k, v in settings.items() if v is not None}
    try:
        chosen = VAttentionSettings(backend=backend, **given)
    except ValueError as e:
        raise SelectionError(str(e)) from None
    engine = {}
    if _engine_has("enable_extensible_kv_cache"):
        # vLLM 0.34's growable KV cache reserves the same buffer's virtual memory itself
        # and maps it whole once sized; the pool maps pages as requests need them.
        engine.update(ctx.require("--kv-allocator vattention",
                                  {"enable_extensible_kv_cache": False}))
    if chosen.layout == "slots":
        # A slot is one request's; blocks shared through the prefix cache would break it.
        engine |= ctx.require("--kv-allocator vattention --vattention-layout slots",
                              {"enable_prefix_caching": False})
    return asdict(chosen), engine


@hookimpl
def vllm_ext_kv_allocators() -> list[Component]:
    return [
        Component("kv_allocator", "vllm", "vLLM's own paged KV cache", _configure_stock_kv),
        Component(
            "kv_allocator", "vattention",
            "vAttention: KV in contiguous virtual memory, physical pages mapped on demand",
            _configure_vattention,
            options=(
                Option("layout", str, "blocks (default): vLLM's block ids and tables, a page "
                       "mapped while a live block uses it; slots: each request owns a contiguous "
                       "slot of max_model_len tokens (consecutive block ids; prefix caching off)",
                       choices=LAYOUTS),
                Option("page-size", size_in_bytes, "bytes per page per layer, e.g. 64KiB, 2MiB "
                       "(default: 64KiB on CPUs, 2MiB on GPUs; rounded up to hold whole blocks)"),
                Option("premap", int, "idle pages mapped ahead of need in the background "
                       "(default 2)"),
                Option("watermark", int, "freed pages kept mapped for reuse beyond the premap "
                       "pages before they are unmapped (default 8)"),
                Option("physical-limit", size_in_bytes, "cap on each rank's physical KV "
                       "memory (per GPU: all its layers, its share of the KV heads), e.g. "
                       "512MiB; at the cap requests are preempted (default: none)"),
            )),
    ]

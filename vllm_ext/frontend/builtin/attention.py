"""The attention backends: `--attn vllm | pod` (and `--kvp N`), from flags to engine
arguments. The backends themselves are `vllm_ext.engine.pod`; the kernel, `vllm_ext.kernels`."""

from __future__ import annotations

import os

from vllm_ext.config import POD_IMPLS
from vllm_ext.engine.pod import backends as pod_backends
from vllm_ext.frontend.components import Component, ConfigureContext, Option, SelectionError
from vllm_ext.frontend.hookspecs import hookimpl


def _configure_stock_attn(settings: dict, ctx: ConfigureContext) -> tuple[dict, dict]:
    return {}, {}


def _configure_pod(settings: dict, ctx: ConfigureContext) -> tuple[dict, dict]:
    if pod_backends.backend_path(ctx.platform) is None:
        platforms = " and ".join(pod_backends.BACKEND_PATHS)
        raise SelectionError(f"--attn pod runs on vLLM's {platforms} platforms, "
                             f"not {ctx.platform!r}")
    owner = pod_backends.custom_owner()
    if owner is not None:
        raise SelectionError(f"--attn pod runs as vLLM's CUSTOM attention backend, which "
                             f"another plugin has taken ({owner})")
    # The kernel is compiled on a GPU; on a CPU Triton only interprets it (slowly).
    impl = settings.get("impl") or ("torch" if ctx.platform == "cpu" else "triton")
    kvp = 1 if settings.get("kvp") is None else settings["kvp"]
    engine = ctx.require("--attn pod", {"attention_backend": pod_backends.ENGINE_ARG})
    if impl == "triton" and ctx.platform == "cpu":
        # Triton has no CPU backend, only its interpreter, which must be on before Triton
        # is first imported: the engine processes this one starts take it from here. It
        # is Triton's switch, not the selection (that stays in the engine's config), and
        # changes nothing for other engines on a CPU, where vLLM runs no Triton kernels.
        os.environ["TRITON_INTERPRET"] = "1"
    if kvp != 1:
        engine.update(_configure_kvp(kvp, ctx))
    return {"impl": impl, "kvp": kvp}, engine


def _configure_kvp(kvp: int, ctx: ConfigureContext) -> dict:
    """KVP on vLLM's decode-context-parallel machinery: its process groups shard each
    request's KV over `kvp` of the tensor-parallel ranks, and our backend gives every
    rank's attention with its LSE and merges them."""
    if kvp < 1:
        raise SelectionError(f"--kvp must be at least 1, got {kvp}")
    if ctx.selected.get("kv_allocator") == "vattention":
        raise SelectionError("--kvp with --kv-allocator vattention is not supported: KV-cache "
                             "parallelism shards every block's tokens over the ranks, which "
                             "the vAttention pool is not checked with; it runs under plain "
                             "--tensor-parallel-size")
    args = ctx.user_engine_args
    dcp = args.get("decode_context_parallel_size")
    if dcp is not None and dcp != kvp:
        raise SelectionError(f"--kvp {kvp} contradicts --decode-context-parallel-size {dcp} "
                             f"(KVP is vLLM's decode context parallelism); give one of them")
    tp = args.get("tensor_parallel_size")
    if tp is not None and tp % kvp:
        raise SelectionError(f"--kvp {kvp} shards KV over tensor-parallel ranks: "
                             f"--tensor-parallel-size {tp} must be a multiple of it")
    engine = {"decode_context_parallel_size": kvp}
    if tp is None:
        engine["tensor_parallel_size"] = kvp
    return engine


@hookimpl
def vllm_ext_attention_backends() -> list[Component]:
    return [
        Component("attn", "vllm", "vLLM's own attention backend for the platform",
                  _configure_stock_attn),
        Component("attn", "pod", "POD-Attention: prefills and decodes of a step in one kernel",
                  _configure_pod,
                  options=(Option("impl", str, "triton: the Triton kernel (default on GPUs; "
                                  "interpreted on CPUs, slow); torch: the PyTorch reference "
                                  "(default on CPUs; on GPUs, for checking)",
                                  choices=POD_IMPLS),
                           Option("kvp", int, "KV-cache parallelism over this many ranks "
                                  "(also --kvp N; default 1: none)"))),
    ]

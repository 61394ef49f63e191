"""vllm-ext's own components, registered through the same hooks as third-party ones."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from vllm_ext import attn_select
from vllm_ext.allocators.settings import LAYOUTS, VAttentionSettings, size_in_bytes
from vllm_ext.components import Component, ConfigureContext, Option, SelectionError
from vllm_ext.hookspecs import hookimpl
from vllm_ext.schedulers.sarathi import KV_ADMISSION, SarathiConfig

_GLUE = "vllm_ext.scheduling"

# Settings a scheduler needs from the engine; an explicit operator value that
# contradicts them is an error rather than a silent override.
_SYNC = {"async_scheduling": False}  # the policies act on the synchronous loop


def _require(ctx: ConfigureContext, who: str, needed: dict[str, Any]) -> dict[str, Any]:
    for key, value in needed.items():
        given = ctx.user_engine_args.get(key)
        if given is not None and given != value:
            raise SelectionError(
                f"{who} needs {key}={value!r}, but {key}={given!r} was given")
    return dict(needed)


def _configure_vllm(settings: dict, ctx: ConfigureContext) -> tuple[dict, dict]:
    return {}, {"scheduler_cls": f"{_GLUE}.StockScheduler"}


def _configure_prefill_first(settings: dict, ctx: ConfigureContext) -> tuple[dict, dict]:
    overrides = _require(ctx, "--scheduler prefill-first",
                         {"enable_chunked_prefill": False, **_SYNC})
    return {}, {"scheduler_cls": f"{_GLUE}.PrefillFirstScheduler", **overrides}


def _configure_sarathi(settings: dict, ctx: ConfigureContext, name: str = "sarathi",
                       cls: str = "SarathiScheduler") -> tuple[dict, dict]:
    """Sarathi's stall-free steps, and any scheduler built on them (`name`'s flags)."""
    budget = settings.get("token_budget")
    engine_budget = ctx.user_engine_args.get("max_num_batched_tokens")
    if budget is not None and engine_budget is not None and budget != engine_budget:
        raise SelectionError(
            f"--{name}-token-budget {budget} contradicts --max-num-batched-tokens "
            f"{engine_budget}: the token budget is the batch size; give one of them")
    model_path = settings.get("latency_model")
    try:
        cfg = SarathiConfig.for_platform(ctx.platform, engine_budget if budget is None else budget,
                                         settings.get("kv_admission"), settings.get("tbt_slo_ms"),
                                         model_path and os.path.abspath(model_path),
                                         settings.get("spp", "on") != "off")
        if cfg.tbt_slo_ms is not None and cfg.latency_model is None:
            # No model given: measure this engine once (about a minute), then reuse it.
            from dataclasses import replace

            from vllm_ext.profile import ProfileTarget, profile_for

            target = ProfileTarget.of(ctx.user_engine_args, cfg.token_budget,
                                      ctx.selected.get("attn"), ctx.options.get("pod_kvp"))
            cfg = replace(cfg, latency_model=profile_for(target))
    except OSError as e:
        raise SelectionError(f"--{name}-latency-model: cannot read {model_path}: "
                             f"{e.strerror}") from None
    except ValueError as e:
        raise SelectionError(str(e).replace("--sarathi-", f"--{name}-")) from None
    if cfg.latency_model is not None:
        _read_latency_model(model_path or cfg.latency_model, f"--{name}-latency-model")
    overrides = _require(ctx, f"--scheduler {name}", {
        "enable_chunked_prefill": True,
        # The stock cap on one prefill's share would split chunks below the
        # budget left; Sarathi gives a partial prefill everything that is left.
        "long_prefill_token_threshold": 0,
        **_SYNC,
    })
    overrides.update(scheduler_cls=f"{_GLUE}.{cls}",
                     max_num_batched_tokens=cfg.token_budget)
    resolved = {"token_budget": cfg.token_budget, "kv_admission": cfg.kv_admission}
    if not cfg.sequence_pipeline:
        resolved["sequence_pipeline"] = False
    if cfg.tbt_slo_ms is not None:
        resolved.update(tbt_slo_ms=cfg.tbt_slo_ms, latency_model=cfg.latency_model)
    return resolved, overrides


def _configure_mnemosyne(settings: dict, ctx: ConfigureContext) -> tuple[dict, dict]:
    from vllm_ext.schedulers.mnemosyne import (DEFAULT_PREFILL_MS_PER_TOKEN, DEFAULT_TTFT_SLO_S,
                                               MnemosyneConfig)

    ttft, allowance = settings.get("ttft_slo_s"), settings.get("prefill_ms_per_token")
    deadlines = {"ttft_slo_s": DEFAULT_TTFT_SLO_S if ttft is None else ttft,
                 "prefill_ms_per_token": DEFAULT_PREFILL_MS_PER_TOKEN if allowance is None
                 else allowance}
    if settings.get("starvation_s") is not None:
        deadlines["starvation_s"] = settings["starvation_s"]
    settings, predictor = dict(settings), {}
    if settings.get("tbt_slo_ms") is None and settings.get("latency_model") is not None:
        # Without adaptive chunking a step-time model only predicts prefill times.
        path = settings.pop("latency_model")
        predictor["latency_model"] = _read_latency_model(path, "--mnemosyne-latency-model")
    resolved, overrides = _configure_sarathi(settings, ctx, "mnemosyne", "MnemosyneScheduler")
    try:
        MnemosyneConfig(**deadlines)
    except ValueError as e:
        raise SelectionError(str(e)) from None
    # Deadlines are the order; a client-given priority order would fight it.
    overrides.update(_require(ctx, "--scheduler mnemosyne", {"scheduling_policy": "fcfs"}))
    return {**resolved, **predictor, **deadlines}, overrides


def _read_latency_model(path: str, flag: str) -> str:
    """The absolute path of a readable, valid step-time model file."""
    from vllm_ext.schedulers.latency import LatencyModel

    try:
        with open(path) as f:
            LatencyModel.from_json(f.read())
    except OSError as e:
        raise SelectionError(f"{flag}: cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise SelectionError(f"{flag}: {e}") from None
    return os.path.abspath(path)


@hookimpl
def vllm_ext_schedulers() -> list[Component]:
    return [
        Component("scheduler", "vllm", "vLLM's own scheduler, instrumented (the A/B baseline)",
                  _configure_vllm),
        Component("scheduler", "prefill-first",
                  "Orca / vLLM-V0 style: waiting prompts run whole before decodes resume",
                  _configure_prefill_first),
        Component(
            "scheduler", "sarathi", "Sarathi-Serve stall-free chunked-prefill batching",
            _configure_sarathi,
            options=_SARATHI_OPTIONS,
        ),
        Component(
            "scheduler", "mnemosyne",
            "Mnemosyne: Sarathi's stall-free steps, prefills ordered by their first-token "
            "deadlines",
            _configure_mnemosyne,
            options=(
                Option("ttft-slo-s", float, "first-token deadline after arrival, before the "
                       "per-token allowance (default 2)"),
                Option("prefill-ms-per-token", float, "deadline allowance per prompt token, "
                       "also the predicted prefill time without a latency model (default 1)"),
                Option("starvation-s", float, "the starvation bound: a request this many "
                       "seconds past its deadline is served in arrival order before every "
                       "request that is not (default 8 x --mnemosyne-ttft-slo-s)"),
                *(o for o in _SARATHI_OPTIONS if o.name != "latency-model"),
                Option("latency-model", str,
                       "a step-time model (from `vllm-ext profile`): predicts the prefill "
                       "time in each request's slack, and with --mnemosyne-tbt-slo-ms sizes "
                       "the chunks"),
            ),
        ),
    ]


_SARATHI_OPTIONS = (
    Option("token-budget", int,
           "tokens per step (default: 512 on GPUs, 256 on CPUs; the same as "
           "--max-num-batched-tokens)"),
    Option("kv-admission", str,
           "full: admit a prompt only if KV for all of it is free (the paper); "
           "chunk: grow KV per chunk", choices=KV_ADMISSION),
    Option("tbt-slo-ms", float,
           "adaptive chunking (Mnemosyne): each step's prefill chunks are the "
           "largest predicted to keep the step within this many ms; the token "
           "budget becomes the most a step may take"),
    Option("latency-model", str,
           "the step-time model for the TBT target (from `vllm-ext profile`)"),
    Option("spp", str,
           "with --pipeline-parallel-size > 1: on (default, as vLLM does): a "
           "prompt's next chunk enters the pipeline before its previous chunk has "
           "left the last stage (sequence pipeline parallelism); off: it waits "
           "(plain pipeline parallelism, the baseline)", choices=("on", "off")),
)


def _configure_stock_attn(settings: dict, ctx: ConfigureContext) -> tuple[dict, dict]:
    return {}, {}


def _configure_pod(settings: dict, ctx: ConfigureContext) -> tuple[dict, dict]:
    if attn_select.backend_path(ctx.platform) is None:
        raise SelectionError(f"--attn pod runs on vLLM's {' and '.join(attn_select.BACKEND_PATHS)} "
                             f"platforms, not {ctx.platform!r}")
    owner = attn_select.custom_owner()
    if owner is not None:
        raise SelectionError(f"--attn pod runs as vLLM's CUSTOM attention backend, which "
                             f"another plugin has taken ({owner})")
    # The kernel is compiled on a GPU; on a CPU Triton only interprets it (slowly).
    impl = settings.get("impl") or ("torch" if ctx.platform == "cpu" else "triton")
    kvp = 1 if settings.get("kvp") is None else settings["kvp"]
    engine = _require(ctx, "--attn pod", {"attention_backend": attn_select.ENGINE_ARG})
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
        raise SelectionError("--kvp with --kv-allocator vattention is not supported: the "
                             "vAttention pool runs one worker per engine in this release")
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
                  options=(Option("impl", str, "triton: the Triton kernel (default on GPUs; interpreted "
                                  "on CPUs, slow); torch: the PyTorch reference (default on "
                                  "CPUs; on GPUs, for checking)",
                                  choices=attn_select.IMPLS),
                           Option("kvp", int, "KV-cache parallelism over this many ranks "
                                  "(also --kvp N; default 1: none)"))),
    ]


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
    for key in ("tensor_parallel_size", "pipeline_parallel_size"):
        if (ctx.user_engine_args.get(key) or 1) > 1:
            raise SelectionError(f"--kv-allocator vattention runs one worker per engine in this "
                                 f"release; {key}={ctx.user_engine_args[key]} was given")
    given = {k: v for k, v in settings.items() if v is not None}
    try:
        chosen = VAttentionSettings(backend=backend, **given)
    except ValueError as e:
        raise SelectionError(str(e)) from None
    engine = {}
    if _engine_has("enable_extensible_kv_cache"):
        # vLLM 0.34's growable KV cache reserves the same buffer's virtual memory itself
        # and maps it whole once sized; the pool maps pages as requests need them.
        engine.update(_require(ctx, "--kv-allocator vattention",
                               {"enable_extensible_kv_cache": False}))
    if chosen.layout == "slots":
        # A slot is one request's; blocks shared through the prefix cache would break it.
        engine |= _require(ctx, "--kv-allocator vattention --vattention-layout slots",
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
                Option("physical-limit", size_in_bytes, "cap on physical KV memory, all layers, "
                       "e.g. 512MiB; at the cap requests are preempted (default: none)"),
            )),
    ]

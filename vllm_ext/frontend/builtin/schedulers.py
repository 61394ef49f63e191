"""The schedulers: `--scheduler vllm | prefill-first | sarathi | mnemosyne`, from flags to
engine arguments. The policies are `vllm_ext.schedulers`; the classes vLLM runs,
`vllm_ext.engine.scheduling` (named here by dotted path, vLLM's `scheduler_cls` hook)."""

from __future__ import annotations

import os
from dataclasses import replace

from vllm_ext.frontend.components import Component, ConfigureContext, Option, SelectionError
from vllm_ext.frontend.hookspecs import hookimpl
from vllm_ext.schedulers.mnemosyne import (DEFAULT_MAX_DEFER_STEPS, DEFAULT_PREFILL_MS_PER_TOKEN,
                                           DEFAULT_TTFT_SLO_S, MnemosyneConfig)
from vllm_ext.schedulers.sarathi import KV_ADMISSION, SarathiConfig
from vllm_ext.schedulers.slo import CLASS_FORM, SLOError, parse_classes

# Each class runs on the loop vLLM chooses (async on CUDA unless --no-async-scheduling):
# see vllm_ext.engine.scheduling.async_variant.
_CLASSES = "vllm_ext.engine.scheduling"


def _configure_vllm(settings: dict, ctx: ConfigureContext) -> tuple[dict, dict]:
    return {}, {"scheduler_cls": f"{_CLASSES}.StockScheduler"}


def _configure_prefill_first(settings: dict, ctx: ConfigureContext) -> tuple[dict, dict]:
    overrides = ctx.require("--scheduler prefill-first",
                            {"enable_chunked_prefill": False})
    return {}, {"scheduler_cls": f"{_CLASSES}.PrefillFirstScheduler", **overrides}


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
            from vllm_ext.frontend.startup_profile import ProfileTarget, profile_for

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
    overrides = ctx.require(f"--scheduler {name}", {
        "enable_chunked_prefill": True,
        # The stock cap on one prefill's share would split chunks below the
        # budget left; Sarathi gives a partial prefill everything that is left.
        "long_prefill_token_threshold": 0,
    })
    overrides.update(scheduler_cls=f"{_CLASSES}.{cls}",
                     max_num_batched_tokens=cfg.token_budget)
    resolved = {"token_budget": cfg.token_budget, "kv_admission": cfg.kv_admission}
    if not cfg.sequence_pipeline:
        resolved["sequence_pipeline"] = False
    if cfg.tbt_slo_ms is not None:
        resolved.update(tbt_slo_ms=cfg.tbt_slo_ms, latency_model=cfg.latency_model)
    return resolved, overrides


def _configure_mnemosyne(settings: dict, ctx: ConfigureContext) -> tuple[dict, dict]:
    ttft, allowance = settings.get("ttft_slo_s"), settings.get("prefill_ms_per_token")
    deadlines = {"ttft_slo_s": DEFAULT_TTFT_SLO_S if ttft is None else ttft,
                 "prefill_ms_per_token": DEFAULT_PREFILL_MS_PER_TOKEN if allowance is None
                 else allowance}
    if settings.get("starvation_s") is not None:
        deadlines["starvation_s"] = settings["starvation_s"]
    try:
        classes = parse_classes(settings.get("slo_class"))
    except SLOError as e:
        raise SelectionError(str(e)) from None
    defer = settings.get("max_defer_steps")
    settings, predictor = dict(settings), {}
    if settings.get("tbt_slo_ms") is None and settings.get("latency_model") is not None:
        # Without adaptive chunking a step-time model only predicts prefill times.
        path = settings.pop("latency_model")
        predictor["latency_model"] = _read_latency_model(path, "--mnemosyne-latency-model")
    resolved, overrides = _configure_sarathi(settings, ctx, "mnemosyne", "MnemosyneScheduler")
    try:
        MnemosyneConfig(**deadlines, classes=tuple(classes.items()),
                        max_defer_steps=DEFAULT_MAX_DEFER_STEPS if defer is None else defer)
    except ValueError as e:
        raise SelectionError(str(e)) from None
    # Recorded only when given, so a record without them reads as it did before.
    if classes:
        deadlines["slo_classes"] = {name: slo.to_record() for name, slo in classes.items()}
    if defer is not None:
        deadlines["max_defer_steps"] = defer
    # Deadlines are the order; a client-given priority order would fight it.
    overrides.update(ctx.require("--scheduler mnemosyne", {"scheduling_policy": "fcfs"}))
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
            # Refuses a request's bad SLO with a 400 and merges the x-slo-* headers into
            # its vllm_xargs, where the scheduler reads them.
            api_middleware=("vllm_ext.frontend.slo_middleware.SLOIntake",),
            options=(
                Option("ttft-slo-s", float, "first-token deadline after arrival, before the "
                       "per-token allowance (default 2)"),
                Option("prefill-ms-per-token", float, "deadline allowance per prompt token, "
                       "also the predicted prefill time without a latency model (default 1)"),
                Option("starvation-s", float, "the starvation bound: a request this many "
                       "seconds past its deadline is served in arrival order before every "
                       "request that is not (default 8 x --mnemosyne-ttft-slo-s)"),
                Option("slo-class", str, f"a named SLO class, {CLASS_FORM}; a request "
                       "chooses it with vllm_xargs slo_class or the x-slo-class header, and "
                       "its own ttft_slo_ms / tbt_slo_ms override the class's", repeat=True),
                Option("max-defer-steps", int, "a decode of a looser-TBT class may give its "
                       "slot to a stricter class's prefill that is due, never past its own "
                       "next-token deadline and at most N steps in a row (default "
                       f"{DEFAULT_MAX_DEFER_STEPS}; 0: decodes are never deferred)"),
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

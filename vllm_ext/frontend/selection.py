"""Turn a component selection into engine arguments: one path for the CLI and Python.

The result travels to the engine and worker processes inside vLLM's own config:
classes by dotted name (`scheduler_cls`), our settings under
`additional_config["vllm_ext"]`, checked here the way every process will read them
(`vllm_ext.config.ExtConfig`). Nothing else crosses the process boundary.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any

from vllm_ext.config import CONFIG_KEY, ConfigError, ExtConfig
from vllm_ext.frontend.components import KINDS, Component, ConfigureContext, SelectionError
from vllm_ext.frontend.registry import components

__all__ = ["SelectionError", "api_middleware", "engine_kwargs", "resolve"]


def _choose(kind: str, name: str) -> Component:
    choices = components(kind)
    if name not in choices:
        flag, _ = KINDS[kind]
        raise SelectionError(
            f"{flag}: unknown {kind.replace('_', ' ')} {name!r}; choose from: "
            f"{', '.join(sorted(choices))}")
    return choices[name]


# Flags that stand for a component together with one of its options:
# `--kvp N` is `--attn pod --pod-kvp N`.
SHORTHANDS: dict[str, tuple[str, str, str, type, str]] = {
    "kvp": ("attn", "pod", "pod_kvp", int,
            "KV-cache parallelism (Mnemosyne): shard each request's KV over N ranks "
            "(tensor-parallel ranks, N by default), attention merged exactly by LSE; "
            "the same as --attn pod --pod-kvp N"),
}


def _expand_shorthands(selected: dict[str, str | None], options: dict[str, Any]) -> None:
    for short, (kind, name, dest, _, _) in SHORTHANDS.items():
        value = options.pop(short, None)
        if value is None:
            continue
        flag = f"--{short.replace('_', '-')}"
        if selected.get(kind) not in (None, name):
            raise SelectionError(f"{flag} runs with {KINDS[kind][0]} {name}, but "
                                 f"{KINDS[kind][0]} {selected[kind]} was given")
        if options.get(dest) not in (None, value):
            raise SelectionError(f"{flag} {value} contradicts --{dest.replace('_', '-')} "
                                 f"{options[dest]}; give one of them")
        selected[kind], options[dest] = name, value


def option_dests() -> dict[str, tuple[str, str, Any]]:
    """Every component option by its snake-case name: (kind, component, option)."""
    return {opt.dest(comp.name): (kind, comp.name, opt)
            for kind in KINDS for comp in components(kind).values() for opt in comp.options}


def resolve(selected: Mapping[str, str | None], options: Mapping[str, Any],
            user_engine_args: Mapping[str, Any], platform: str) -> dict[str, Any]:
    """Engine-argument overrides for the selected components.

    `selected` maps kind to component name (None: not selected); `options` maps
    option dests (`sarathi_token_budget`) to values; `user_engine_args` holds only
    the engine arguments the operator set, so that conflicts can be named.
    """
    selected, options = dict(selected), dict(options)
    _expand_shorthands(selected, options)
    dests = option_dests()
    chosen = {kind: _choose(kind, name) for kind, name in selected.items() if name is not None}
    for dest, value in options.items():
        if value is None:
            continue
        kind, comp_name, opt = dests[dest]
        if chosen.get(kind) is None or chosen[kind].name != comp_name:
            raise SelectionError(
                f"{opt.flag(comp_name)} applies to {KINDS[kind][0]} {comp_name}, "
                f"which is not selected")
    if "scheduler" in chosen and user_engine_args.get("scheduler_cls") is not None:
        raise SelectionError(
            "--scheduler and --scheduler-cls both choose the scheduler class; give one of them")
    if not chosen:
        return {}

    for kind, comp in chosen.items():
        given = {opt.name: options.get(opt.dest(comp.name)) for opt in comp.options}
        _refuse_if_unpatched(kind, comp.name, given, platform)
    ctx = ConfigureContext(platform, dict(user_engine_args),
                           {kind: comp.name for kind, comp in chosen.items()},
                           {k: v for k, v in options.items() if v is not None})
    overrides: dict[str, Any] = {}
    record: dict[str, Any] = {}
    for kind, comp in chosen.items():
        settings = {opt.name.replace("-", "_"):
                    opt.check(comp.name, options.get(opt.dest(comp.name))) for opt in comp.options}
        resolved, engine = comp.configure(settings, ctx)
        clash = overrides.keys() & engine.keys()
        if clash:
            raise SelectionError(f"components disagree on engine arguments {sorted(clash)}")
        overrides.update(engine)
        record[kind] = {"name": comp.name, **resolved}

    try:
        ExtConfig.from_record(record)  # what every engine process will read back
    except ConfigError as e:
        raise SelectionError(f"{e} (from {_named(chosen)})") from None
    additional = dict(user_engine_args.get("additional_config") or {})
    additional[CONFIG_KEY] = record
    overrides["additional_config"] = additional
    from vllm_ext.frontend import metrics

    metrics.prepare_front_end()
    return overrides


def api_middleware(selected: Mapping[str, str | None], options: Mapping[str, Any]) -> list[str]:
    """The API-server middleware (import paths) of the components a selection chooses,
    shorthands included; for a selection `resolve` accepted."""
    selected, options = dict(selected), dict(options)
    _expand_shorthands(selected, options)
    return [path for kind, name in selected.items() if name is not None
            for path in _choose(kind, name).api_middleware]


def _refuse_if_unpatched(kind: str, name: str, settings: dict, platform: str) -> None:
    """A component whose patches did not fit this vLLM is refused, naming them."""
    from vllm_ext.patches import needed_by, refused

    why = {p.name: refused()[p.name] for p in needed_by(kind, name, settings, platform)
           if p.name in refused()}
    if why:
        reasons = "; ".join(f"patch {n}: {w}" for n, w in why.items())
        raise SelectionError(f"{KINDS[kind][0]} {name} is unavailable with the installed vLLM "
                             f"({reasons}); `vllm-ext doctor` shows every patch")


def _named(chosen: Mapping[str, Component]) -> str:
    return ", ".join(f"{KINDS[kind][0]} {comp.name}" for kind, comp in chosen.items())


# Selections resolve for this machine's platform, except while a simulation configures
# its arms for the platform it forecasts (`vllm_ext.simulate`): a GPU's default token
# budget, not this CPU's.
_resolving_for: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "vllm_ext_resolving_for", default=None)


@contextlib.contextmanager
def resolving_for(platform: str | None) -> Iterator[None]:
    token = _resolving_for.set(platform)
    try:
        yield
    finally:
        _resolving_for.reset(token)


def current_platform_name() -> str:
    if (simulated := _resolving_for.get()) is not None:
        return simulated
    from vllm.platforms import current_platform

    return current_platform.device_type or "unknown"


def engine_kwargs(**kwargs: Any) -> dict[str, Any]:
    """`vllm_ext.engine_kwargs`: see there."""
    from vllm_ext import plugin
    from vllm_ext.versions import check_supported

    check_supported()
    plugin.register()  # as vLLM would on its first engine: patches in place, refusals known
    selected = {kind: kwargs.pop(kind, None) for kind in KINDS}
    dests = option_dests()
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in dests or k in SHORTHANDS}
    overrides = resolve(selected, options, kwargs, current_platform_name())
    return {**kwargs, **overrides}

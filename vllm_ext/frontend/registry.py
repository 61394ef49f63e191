"""The plugin manager and the components it collects, by kind and name."""

from __future__ import annotations

import functools
import sys

import pluggy

from vllm_ext import envs
from vllm_ext.frontend import hookspecs
from vllm_ext.frontend.components import KINDS, Component


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if envs.trace_plugins():
        pm.trace.root.setwriter(lambda line: print(line, end="", file=sys.stderr))
        pm.enable_tracing()
    from vllm_ext.frontend.builtin import MODULES

    for module in MODULES:
        pm.register(module, name=module.__name__)
    pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    return pm


@functools.cache
def components(kind: str) -> dict[str, Component]:
    """Every registered component of `kind`, by name; two with one name is an error."""
    _, hook_name = KINDS[kind]
    found: dict[str, Component] = {}
    for batch in getattr(get_plugin_manager().hook, hook_name)():
        for comp in batch:
            if comp.kind != kind:
                raise TypeError(f"{hook_name} returned a {comp.kind!r} component ({comp.name})")
            if comp.name in found:
                raise ValueError(f"two {kind} components are named {comp.name!r}")
            found[comp.name] = comp
    return found

"""The hooks through which components are registered, vllm-ext's own included.

A third-party package adds components by exposing a module with `@hookimpl`
functions under the entry-point group `vllm_ext`:

    [project.entry-points.vllm_ext]
    my_pkg = "my_pkg.vllm_ext_plugin"
"""

from __future__ import annotations

import pluggy

from vllm_ext.frontend.components import Component

PROJECT = "vllm_ext"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# --- collected once per process, when the CLI flags are built or a selection is resolved ---


@hookspec
def vllm_ext_schedulers() -> list[Component]:
    """Scheduling policies, selectable with `--scheduler NAME`."""


@hookspec
def vllm_ext_attention_backends() -> list[Component]:
    """Attention backends, selectable with `--attn NAME`."""


@hookspec
def vllm_ext_kv_allocators() -> list[Component]:
    """KV-cache memory backends, selectable with `--kv-allocator NAME`."""

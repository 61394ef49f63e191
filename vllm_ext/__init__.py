"""vllm-ext: research serving techniques for stock vLLM, each switched on by a flag.

    vllm serve MODEL --scheduler sarathi             # from the command line
    LLM(**vllm_ext.engine_kwargs(model=MODEL, scheduler="sarathi"))   # from Python

Importing this package is cheap and never imports vLLM: the interpreter-start
alias (see `_dist_alias`) imports it in every process of the environment.
"""

from __future__ import annotations

from typing import Any

from vllm_ext._version import __version__

__all__ = ["__version__", "engine_kwargs", "step_stats", "step_stats_by_engine"]


def engine_kwargs(**kwargs: Any) -> dict[str, Any]:
    """Engine keyword arguments for `vllm.LLM` / `EngineArgs` with vllm-ext components.

    Takes `scheduler=`, `attn=`, `kv_allocator=`, each component's options by their
    flag name in snake case (`sarathi_token_budget=256`), and any other engine
    argument, which passes through and is checked against the selection. Raises
    `vllm_ext.frontend.selection.SelectionError` naming the allowed choices.
    """
    from vllm_ext.frontend.selection import engine_kwargs as _engine_kwargs

    return _engine_kwargs(**kwargs)


def step_stats(engine: int | None = None):
    """Per-step scheduler statistics of the engines this process started, summed, or of
    one: its data-parallel rank, vLLM's `engine` label (see `vllm_ext.frontend.metrics`)."""
    from vllm_ext.frontend.metrics import step_stats as _step_stats

    return _step_stats(engine)


def step_stats_by_engine():
    """Each engine's per-step scheduler statistics, by data-parallel rank."""
    from vllm_ext.frontend.metrics import step_stats_by_engine as _by_engine

    return _by_engine()

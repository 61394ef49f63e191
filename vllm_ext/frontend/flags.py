"""The vllm-ext flag group, and the fold from parsed flags into engine arguments.

Both are pure argparse work; the `cli_flags` patch puts them on vLLM's parser.
"""

from __future__ import annotations

import argparse
from typing import Any

from vllm_ext.frontend import metrics_middleware
from vllm_ext.frontend.components import KINDS
from vllm_ext.frontend.registry import components
from vllm_ext.frontend.selection import (SHORTHANDS, api_middleware, current_platform_name,
                                         option_dests, resolve)

GROUP = "vllm-ext"


def _kind_dest(kind: str) -> str:
    return f"vllm_ext_{kind}"


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the vllm-ext group: one flag per kind, every component's options, shorthands."""
    group = parser.add_argument_group(
        GROUP, description="Research serving techniques from vllm-ext; with none of these "
                           "flags vLLM runs unchanged.")
    for kind, (flag, _) in KINDS.items():
        comps = components(kind)
        summary = "; ".join(f"{n}: {c.summary}" for n, c in sorted(comps.items()))
        group.add_argument(flag, dest=_kind_dest(kind), choices=sorted(comps), default=None,
                           help=f"{summary}. Default: vLLM's own, unchanged.")
        for comp in comps.values():
            for opt in comp.options:
                group.add_argument(opt.flag(comp.name), dest=opt.dest(comp.name), type=opt.type,
                                   choices=opt.choices, default=None,
                                   action="append" if opt.repeat else "store",
                                   help=f"[{flag} {comp.name}] {opt.help}"
                                        + (" (repeatable)" if opt.repeat else ""))
    for short, (_, _, _, type_, help_) in SHORTHANDS.items():
        group.add_argument(f"--{short.replace('_', '-')}", dest=short, type=type_, default=None,
                           help=help_)
    return parser


def fold(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> bool:
    """Replace the vllm-ext choices in `ns` by the engine arguments they stand for;
    False (and `ns` untouched) when none was given."""
    selected = {kind: getattr(ns, _kind_dest(kind), None) for kind in KINDS}
    options = {dest: getattr(ns, dest, None) for dest in [*option_dests(), *SHORTHANDS]}
    if not any(selected.values()) and not any(v is not None for v in options.values()):
        return False
    ours = {_kind_dest(k) for k in KINDS} | set(options)
    explicit: dict[str, Any] = {
        k: v for k, v in vars(ns).items() if k not in ours and v != parser.get_default(k)}
    # `vllm serve MODEL` keeps the model in `model_tag` until the command runs.
    if getattr(ns, "model_tag", None):
        explicit["model"] = ns.model_tag
    for key, value in resolve(selected, options, explicit, current_platform_name()).items():
        setattr(ns, key, value)
    # Every selection: its series on /metrics also with several API servers.
    _add_middleware(ns, [metrics_middleware.PATH, *api_middleware(selected, options)])
    return True


def _add_middleware(ns: argparse.Namespace, paths: list[str]) -> None:
    """The chosen components' API-server middleware, on vLLM's own `--middleware` list.
    Only `vllm serve` has that list; each path is added once, whoever gave it first."""
    given = getattr(ns, "middleware", None)
    if not isinstance(given, list):
        return
    # A new list: without --middleware, argparse hands out the parser's default list itself.
    ns.middleware = given + [p for p in dict.fromkeys(paths) if p not in given]

"""Patch: vllm-ext's flags on every engine command line (`vllm serve`, `vllm bench ...`).

vLLM 0.32 has no hook for a general plugin to add engine flags: the plugin runs
inside `AsyncEngineArgs.add_cli_args` just before `EngineArgs.add_cli_args` builds
the flags, so wrapping the latter is the earliest safe place.

Invariant bent: the engine flags are vLLM's own list. Safe because every added
flag uses a name vLLM does not have (`--scheduler` shadowed `--scheduler-cls` only
through argparse's prefix matching), the parsed values are folded into ordinary
`EngineArgs` fields before vLLM reads the namespace, and with none of the flags
given the namespace is left exactly as vLLM parsed it.
"""

from __future__ import annotations

import functools
from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_ext.patches.base import Patch


class CliFlags(Patch):
    name = "cli_flags"
    target = "vllm.engine.arg_utils:EngineArgs.add_cli_args"
    vllm_versions = SpecifierSet(">=0.32,<0.33")

    def _apply(self, owner: Any, attr: str, original: Any) -> None:
        from vllm_ext.flags import add_flags

        build = original.__func__ if isinstance(original, staticmethod) else original

        @functools.wraps(build)
        def add_cli_args(parser):
            return add_flags(build(parser))

        setattr(owner, attr, staticmethod(add_cli_args))

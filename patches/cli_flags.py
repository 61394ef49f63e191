"""Patch: vllm-ext's flags on every engine command line (`vllm serve`, `vllm bench ...`).

vLLM 0.32 has no hook for a general plugin to add engine flags: the plugin runs
inside `AsyncEngineArgs.add_cli_args` just before `EngineArgs.add_cli_args` builds
the flags, so wrapping the latter is the earliest safe place. The parser it returns
folds our flags into ordinary engine arguments right after parsing, before vLLM
reads the namespace.

Invariant bent: the engine flags are vLLM's own list. Safe because every added flag
uses a name vLLM does not have (`--scheduler` shadowed `--scheduler-cls` only through
argparse's prefix matching), the parsed values become ordinary `EngineArgs` fields,
and with none of the flags given the namespace is left exactly as vLLM parsed it.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_ext.patches.base import FRONT_END, Patch, Target


class CliFlags(Patch):
    """vllm-ext's flags on every engine command line, folded into engine arguments"""

    name = "cli_flags"
    process = FRONT_END
    targets = (Target("vllm.engine.arg_utils:EngineArgs.add_cli_args", ("parser",)),)
    vllm_versions = SpecifierSet(">=0.32,<0.35")
    components = ("cli",)

    def wrap(self, original: Any) -> Any:
        build = original.__func__ if isinstance(original, staticmethod) else original

        @functools.wraps(build)
        def add_cli_args(parser):
            parser = build(parser)
            if not getattr(parser, "_vllm_ext_flags", False):
                from vllm_ext.frontend.flags import add_flags

                add_flags(parser)
                self._fold_after_parsing(parser)
                parser._vllm_ext_flags = True
            return parser

        return staticmethod(add_cli_args)

    def _fold_after_parsing(self, parser: argparse.ArgumentParser) -> None:
        from vllm_ext.frontend.components import SelectionError
        from vllm_ext.frontend.flags import fold

        parse = parser.parse_known_args

        def parse_known_args(args=None, namespace=None):
            ns, rest = parse(args, namespace)
            try:
                if fold(parser, ns):
                    self.reached()
            except SelectionError as e:
                parser.error(str(e))
            return ns, rest

        parser.parse_known_args = parse_known_args

"""An arm's `vllm serve` flags, parsed by vLLM's own serve parser into the engine config
its scheduler would be built from: the same flags `vllm-ext bench ab` gives a server.

For a GPU forecast the config is the one `vllm serve` would make on that GPU: vllm-ext's
selections resolve for CUDA (e.g. Sarathi's GPU token budget), vLLM sizes its batch
defaults for that GPU through its own defaulting code, and blocks are CUDA's 16 tokens.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from unittest import mock

from vllm_ext.frontend.components import SelectionError


class ArmError(ValueError):
    """An arm's flags that vLLM's serve parser or vllm-ext refuses, with the reason."""


@dataclass(frozen=True, slots=True)
class Target:
    """The machine a config is made for: this one (None) or a GPU's serve defaults."""

    platform: str | None = None  # e.g. "cuda"
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    block_size: int | None = None


class _Refused(Exception):
    pass


@functools.cache
def _serve_parser():
    # The builder `vllm serve` itself calls; it loads the general plugins, as `vllm
    # serve` does. Its module moved in vLLM 0.33 (the server's own modules, which also
    # import it, need the server's dependencies).
    try:
        from vllm.entrypoints.common.cli_args import make_arg_parser  # 0.33, 0.34
    except ImportError:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser  # 0.32
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))

    def error(message: str):  # argparse's own prints usage and exits the process
        raise _Refused(message)

    parser.error = error
    return parser


@contextlib.contextmanager
def _batch_defaults(target: Target) -> Iterator[None]:
    """vLLM's batch defaults as on the target GPU, so that its own defaulting (e.g. a
    budget raised to max_model_len without chunked prefill) applies to them."""
    if target.max_num_batched_tokens is None:
        yield
        return
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    def defaults(cls, world_size: int):
        return ({UsageContext.OPENAI_API_SERVER: target.max_num_batched_tokens},
                {UsageContext.OPENAI_API_SERVER: target.max_num_seqs})

    with mock.patch.object(EngineArgs, "get_batch_defaults", classmethod(defaults)):
        yield


def arm_config(model: str, args: Sequence[str], target: Target = Target()):
    """The `VllmConfig` of `vllm serve MODEL ARGS` (for the target), never tokenizing."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    from vllm_ext.frontend.selection import resolving_for
    from vllm_ext.tools.driver import loop_as_on_gpu

    try:
        with resolving_for(target.platform), contextlib.redirect_stderr(io.StringIO()):
            ns = _serve_parser().parse_args([model, *args])
        ns.model = ns.model_tag  # as `vllm serve` does before building the engine
        engine_args = AsyncEngineArgs.from_cli_args(ns)
        engine_args.skip_tokenizer_init = True
        if target.block_size is not None and engine_args.block_size is None:
            engine_args.block_size = target.block_size
        # The loop is vLLM's choice for the target: on a GPU async unless the flags or
        # the config forbid it (--no-async-scheduling); on this CPU synchronous.
        with resolving_for(target.platform), _batch_defaults(target), \
                loop_as_on_gpu(target.platform is not None):
            return engine_args.create_engine_config(UsageContext.OPENAI_API_SERVER)
    except _Refused as e:
        raise ArmError(str(e)) from None
    except (SelectionError, ValueError, TypeError) as e:
        raise ArmError(f"{type(e).__name__}: {e}") from None

"""Every change vllm-ext makes to vLLM outside a supported hook, listed in one place.

| patch      | target                                          | vLLM     | why                                   |
|------------|-------------------------------------------------|----------|---------------------------------------|
| cli_flags  | vllm.engine.arg_utils:EngineArgs.add_cli_args   | 0.32.x   | `--scheduler`/`--attn`/`--kv-allocator` and component options on every engine CLI |
"""

from __future__ import annotations

from packaging.version import Version

from vllm_ext.patches.base import Patch, PatchError
from vllm_ext.patches.cli_flags import CliFlags

PATCHES: tuple[Patch, ...] = (CliFlags(),)

__all__ = ["PATCHES", "Patch", "PatchError", "apply_all"]


def apply_all(vllm_version: Version) -> None:
    for patch in PATCHES:
        patch.apply(vllm_version)

"""Every environment variable vllm-ext reads, in one place.

The prefix is VLLMEXT_, not VLLM_: vLLM treats every VLLM_* name as its own and
warns about (or, in strict mode, refuses) the ones it does not know.

| variable                  | meaning                                                              |
|---------------------------|----------------------------------------------------------------------|
| VLLMEXT_STATS_DIR        | where engine processes write per-step scheduler stats (set by vllm-ext in the front-end process before the engine is spawned; an operator may set it to keep the files) |
| VLLMEXT_STATS_OWNER      | pid of the front end that created VLLMEXT_STATS_DIR itself; a front end that inherits another's temporary directory makes its own instead of mixing stats |
| VLLMEXT_TRACE_PLUGINS    | `1` prints every pluggy hook call while components are collected      |
| VLLMEXT_ALLOW_ANY_VLLM   | `1` runs on a vLLM outside the supported range (at your own risk): each patch is applied if its targets are there as written, and the components whose patches do not fit are refused by name |
| VLLMEXT_PROFILE_TIMEOUT_S | seconds the start-up profile for `--sarathi-tbt-slo-ms` may take (default 900); past it the engine refuses to start and names `vllm-ext profile` |
| VLLMEXT_HOST_KV_LIMIT    | test only: bytes of physical memory (`64MiB`, `2097152`) a `--kv-allocator vattention` KV pool on the host backend may hold, so that a CPU runs out of KV memory as a full GPU would; unset: no limit |

vllm-ext also sets Triton's own TRITON_INTERPRET=1 for the engine processes it starts
when `--pod-impl triton` is chosen on a CPU (Triton reads it only before its first import).

Which components an engine uses is never read from the environment: it travels in the
engine's own config (`additional_config["vllm_ext"]`).
"""

from __future__ import annotations

import os

STATS_DIR = "VLLMEXT_STATS_DIR"
STATS_OWNER = "VLLMEXT_STATS_OWNER"
TRACE_PLUGINS = "VLLMEXT_TRACE_PLUGINS"
ALLOW_ANY_VLLM = "VLLMEXT_ALLOW_ANY_VLLM"
PROFILE_TIMEOUT_S = "VLLMEXT_PROFILE_TIMEOUT_S"
HOST_KV_LIMIT = "VLLMEXT_HOST_KV_LIMIT"


def stats_dir() -> str | None:
    return os.environ.get(STATS_DIR) or None


def stats_owner() -> int | None:
    value = os.environ.get(STATS_OWNER)
    return int(value) if value else None


def trace_plugins() -> bool:
    return os.environ.get(TRACE_PLUGINS, "") == "1"


def allow_any_vllm() -> bool:
    return os.environ.get(ALLOW_ANY_VLLM, "") == "1"


def profile_timeout_s() -> float:
    return float(os.environ.get(PROFILE_TIMEOUT_S) or 900)


def host_kv_limit() -> int | None:
    from vllm_ext.allocators.settings import size_in_bytes

    value = os.environ.get(HOST_KV_LIMIT)
    return size_in_bytes(value) if value else None

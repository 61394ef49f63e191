"""Every environment variable vllm-ext reads, in one place.

The prefix is VLLMEXT_, not VLLM_: vLLM treats every VLLM_* name as its own and
warns about (or, in strict mode, refuses) the ones it does not know.

| variable                  | meaning                                                              |
|---------------------------|----------------------------------------------------------------------|
| VLLMEXT_STATS_DIR        | where engine processes write per-step scheduler stats (set by vllm-ext in the front-end process before the engine is spawned; an operator may set it to keep the files) |
| VLLMEXT_STATS_OWNER      | pid of the front end that created VLLMEXT_STATS_DIR itself; a front end that inherits another's temporary directory makes its own instead of mixing stats |
| VLLMEXT_TRACE_PLUGINS    | `1` prints every pluggy hook call while components are collected      |
| VLLMEXT_ALLOW_ANY_VLLM   | `1` skips the supported-vLLM-version check (at your own risk)         |
| VLLMEXT_ATTN             | `pod` when `--attn pod` was chosen: set by the CLI process for the engine processes it spawns, which then register the POD backend |
| VLLMEXT_POD_IMPL         | `torch` or `triton` (`--pod-impl`), set the same way                  |
| VLLMEXT_KV_POOL          | the vattention settings as JSON when `--kv-allocator vattention` was chosen: set by the CLI process for the engine processes, which then apply the vattention patches |
"""

from __future__ import annotations

import os

STATS_DIR = "VLLMEXT_STATS_DIR"
STATS_OWNER = "VLLMEXT_STATS_OWNER"
TRACE_PLUGINS = "VLLMEXT_TRACE_PLUGINS"
ALLOW_ANY_VLLM = "VLLMEXT_ALLOW_ANY_VLLM"
ATTN = "VLLMEXT_ATTN"
POD_IMPL = "VLLMEXT_POD_IMPL"
KV_POOL = "VLLMEXT_KV_POOL"


def stats_dir() -> str | None:
    return os.environ.get(STATS_DIR) or None


def stats_owner() -> int | None:
    value = os.environ.get(STATS_OWNER)
    return int(value) if value else None


def trace_plugins() -> bool:
    return os.environ.get(TRACE_PLUGINS, "") == "1"


def allow_any_vllm() -> bool:
    return os.environ.get(ALLOW_ANY_VLLM, "") == "1"


def kv_pool_selected() -> bool:
    return bool(os.environ.get(KV_POOL))

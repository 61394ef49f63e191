"""vllm-ext's own components, registered through the same hooks as a third party's
(`vllm_ext.frontend.hookspecs`): one module per kind, each turning its flags into engine
arguments and refusing settings it cannot honour, before any engine starts."""

from vllm_ext.frontend.builtin import attention, kv_cache, schedulers

MODULES = (schedulers, attention, kv_cache)

"""How an engine gets the POD backend: registered as vLLM's CUSTOM attention backend in
every process (a supported hook), chosen per engine by `attention_backend="CUSTOM"`.

The registration is process-wide but inert: only an engine whose config asks for
CUSTOM runs it (on the CPU platform through the `cpu_custom_attn` patch). Another
plugin may already own CUSTOM; then `--attn pod` is refused, naming it.
"""

from __future__ import annotations

IMPLS = ("torch", "triton")
BACKEND_PATH = "vllm_ext.pod_backend.PodAttentionBackend"
ENGINE_ARG = "CUSTOM"  # the engine's attention_backend


def custom_owner() -> str | None:
    """The class registered as CUSTOM by someone else, if any."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != BACKEND_PATH:
        return custom.get_path()
    return None


def register() -> str | None:
    """In every vLLM process: register the POD backend as CUSTOM unless another plugin
    owns it; return that owner, if any."""
    owner = custom_owner()
    if owner is None:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    return owner

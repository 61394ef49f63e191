"""How an engine gets the POD backend: registered as vLLM's CUSTOM attention backend in
every process (a supported hook), chosen per engine by `attention_backend="CUSTOM"`.

The registration is process-wide but inert: only an engine whose config asks for
CUSTOM runs it (on the CPU platform through the `cpu_custom_attn` patch). Another
plugin may already own CUSTOM; then `--attn pod` is refused, naming it.
"""

from __future__ import annotations

# The backend class for each platform --attn pod runs on.
BACKEND_PATHS = {"cpu": "vllm_ext.engine.pod.cpu.PodAttentionBackend",
                 "cuda": "vllm_ext.engine.pod.cuda.PodCudaBackend"}
ENGINE_ARG = "CUSTOM"  # the engine's attention_backend


def backend_path(platform: str | None = None) -> str | None:
    """This platform's POD backend class (None: --attn pod does not run there)."""
    if platform is None:
        from vllm.platforms import current_platform

        platform = current_platform.device_type
    return BACKEND_PATHS.get(platform)


def custom_owner() -> str | None:
    """The class registered as CUSTOM by someone else, if any."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() not in BACKEND_PATHS.values():
        return custom.get_path()
    return None


def register() -> str | None:
    """In every vLLM process: register this platform's POD backend as CUSTOM unless
    another plugin owns it; return that owner, if any."""
    owner = custom_owner()
    path = backend_path()
    if owner is None and path is not None:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        register_backend(AttentionBackendEnum.CUSTOM, path)
    return owner

"""Which attention backend an engine's processes use, chosen once in the CLI process.

vLLM's CPU platform always resolves the CPU_ATTN backend and honours an override
registered in every process (`register_backend`, a supported hook). The choice made
in the CLI process reaches the engine and worker processes through the environment
(they are spawned after it is set); the plugin registers the backend there. Nothing
here imports vLLM until a process actually registers.
"""

from __future__ import annotations

import os

from vllm_ext.envs import ATTN as ENV_ATTN
from vllm_ext.envs import POD_IMPL as ENV_POD_IMPL

IMPLS = ("torch", "triton")
BACKEND_PATH = "vllm_ext.pod_backend.PodAttentionBackend"
_INTERPRET = "TRITON_INTERPRET"
_we_set_interpret = False


def select(name: str, impl: str | None = None, platform: str = "cpu") -> None:
    """Record the attention choice for the processes this one will spawn."""
    global _we_set_interpret
    if name == "pod":
        os.environ[ENV_ATTN] = "pod"
        os.environ[ENV_POD_IMPL] = impl or "torch"
    else:
        os.environ.pop(ENV_ATTN, None)
        os.environ.pop(ENV_POD_IMPL, None)
    if name == "pod" and impl == "triton" and platform == "cpu":
        # Triton has no CPU backend, only its interpreter, which must be chosen before
        # Triton is first imported; vLLM imports it early in every process, so the
        # engine processes get it from their environment.
        _we_set_interpret = _INTERPRET not in os.environ or _we_set_interpret
        os.environ[_INTERPRET] = "1"
    elif _we_set_interpret:
        os.environ.pop(_INTERPRET, None)
        _we_set_interpret = False


def register_if_selected() -> bool:
    """In every vLLM process: put PodAttentionBackend in place of CPU_ATTN if chosen."""
    if os.environ.get(ENV_ATTN) != "pod":
        return False
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
    return True

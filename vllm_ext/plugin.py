"""The `vllm.general_plugins` entry point.

vLLM calls it in the CLI process, the engine process and every worker, possibly
more than once in each: everything here is idempotent and cheap, and it never
raises, so vLLM always starts (at worst without vllm-ext, saying why).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm_ext")

_done = False


def register() -> None:
    global _done
    if _done:
        return
    _done = True
    _share_vllm_log_handlers()

    from vllm_ext import _dist_alias, envs
    from vllm_ext.versions import UnsupportedVLLMError, check_supported

    _dist_alias.install()
    try:
        version = check_supported()
    except UnsupportedVLLMError as e:
        # Loud but harmless: vLLM keeps working unchanged, only our flags are absent.
        logger.warning("%s; vllm-ext stays off", e)
        return
    try:
        from vllm.platforms import current_platform

        from vllm_ext.engine.pod import backends as pod_backends
        from vllm_ext.patches import apply_all

        for name, why in apply_all(version, current_platform.device_type,
                                   envs.allow_any_vllm()).items():
            logger.warning("vllm-ext: patch %s refused (%s); the components that need it "
                           "are unavailable", name, why)
        owner = pod_backends.register()
        if owner is not None:
            logger.warning("vllm-ext: the CUSTOM attention backend is %s's; --attn pod is "
                           "unavailable", owner)
    except Exception:  # a bug of ours must not take vLLM down with it
        logger.exception("vllm-ext failed to load; vLLM runs without it")


def _share_vllm_log_handlers() -> None:
    """Log through vLLM's handlers so our lines look and filter like the engine's."""
    vllm_logger = logging.getLogger("vllm")
    if logger.handlers or not vllm_logger.handlers:
        return
    for handler in vllm_logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(vllm_logger.level or logging.INFO)
    logger.propagate = False

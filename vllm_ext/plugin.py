"""The `vllm.general_plugins` entry point.

vLLM calls it in the CLI process, the engine process and every worker, possibly
more than once in each: everything here is idempotent and cheap.
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

    from vllm_ext import _dist_alias
    from vllm_ext.versions import UnsupportedVLLMError, check_supported

    _dist_alias.install()
    try:
        version = check_supported()
    except UnsupportedVLLMError as e:
        # Loud but harmless: vLLM keeps working unchanged, only our flags are absent.
        logger.warning("%s; vllm-ext stays off", e)
        return

    from vllm_ext.attn_select import register_if_selected
    from vllm_ext.patches import apply_all

    apply_all(version)
    register_if_selected()


def _share_vllm_log_handlers() -> None:
    """Log through vLLM's handlers so our lines look and filter like the engine's."""
    vllm_logger = logging.getLogger("vllm")
    if logger.handlers or not vllm_logger.handlers:
        return
    for handler in vllm_logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(vllm_logger.level or logging.INFO)
    logger.propagate = False

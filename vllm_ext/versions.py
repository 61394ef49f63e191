"""The vLLM versions this release of vllm-ext supports, and the check that enforces them."""

from __future__ import annotations

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from vllm_ext import envs

SUPPORTED_VLLM = SpecifierSet(">=0.32,<0.35")


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM is outside what this vllm-ext release was written for."""


def installed_vllm_version() -> Version:
    import vllm

    # `+cpu` and similar local labels must not take a version out of range.
    return Version(Version(vllm.__version__).public)


def check_supported() -> Version:
    """Return the installed vLLM version; raise if vllm-ext does not support it."""
    found = installed_vllm_version()
    if found not in SUPPORTED_VLLM and not envs.allow_any_vllm():
        raise UnsupportedVLLMError(
            f"vllm-ext supports vLLM {SUPPORTED_VLLM}, found {found}; install a supported "
            f"vLLM or a vllm-ext release for {found} "
            f"({envs.ALLOW_ANY_VLLM}=1 skips this check at your own risk)")
    return found

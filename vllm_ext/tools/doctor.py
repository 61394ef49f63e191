"""`vllm-ext doctor`: what vllm-ext finds in the installed vLLM, before an engine starts.

For the installed vLLM and platform: the version and whether this release supports it,
how each feature was verified there (vllm_ext.tools.compat), every patch and declared
internal (`Reliance`) with each of its targets present, missing, or changed in signature,
attributes or method set, the attention platform and the
CUSTOM backend, Triton (compiled or only interpreted) and CUDA virtual memory management. Exit status 0 when everything a default install needs
(a supported vLLM and the command-line flags) is fine, 1 otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

Line = tuple[str, str]


def run(out: Callable[[str], None] = print) -> int:
    import vllm_ext
    from vllm_ext import envs
    from vllm_ext.versions import SUPPORTED_VLLM, installed_vllm_version

    version = installed_vllm_version()
    supported = version in SUPPORTED_VLLM
    override = envs.allow_any_vllm()
    out(f"vllm-ext {vllm_ext.__version__} doctor (Python {sys.version.split()[0]})")
    status = "supported" if supported else (
        f"not supported; {envs.ALLOW_ANY_VLLM}=1 is set, so patches that fit are applied"
        if override else f"not supported: vllm-ext stays off ({envs.ALLOW_ANY_VLLM}=1 overrides)")
    _rows(out, [("vLLM", f"{_vllm_label()}: {status} (this release: vLLM {SUPPORTED_VLLM})"),
                *_platform_lines(), ("Triton", _triton()), ("CUDA VMM", _cuda_vmm())])
    _support_lines(out, version)
    broken = _patch_lines(out, version, override)
    flags_ok = "cli_flags" not in broken
    healthy = (supported or override) and flags_ok
    out("")
    out("fine: a default install works" if healthy else
        "NOT fine: " + ("vLLM is outside the supported range" if not (supported or override)
                        else "the command-line flags patch does not fit"))
    return 0 if healthy else 1


def _rows(out: Callable[[str], None], rows: list[Line]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        out(f"{key:<{width}}  {value}")


def _vllm_label() -> str:
    import vllm

    return vllm.__version__


def _platform_lines() -> list[Line]:
    from vllm.platforms import current_platform

    from vllm_ext.engine.pod import backends as pod_backends

    owner = pod_backends.custom_owner()
    path = pod_backends.backend_path(current_platform.device_type)
    custom = (f"taken by {owner}: --attn pod unavailable" if owner else
              f"free for vllm-ext's POD backend ({path})" if path else
              f"--attn pod does not run on this platform (it runs on "
              f"{', '.join(pod_backends.BACKEND_PATHS)})")
    return [("platform", f"{current_platform.device_type} ({current_platform.device_name})"),
            ("attention", f"CUSTOM backend {custom}")]


def _triton() -> str:
    try:
        import triton
    except ImportError:
        return "not installed: --pod-impl triton unavailable"
    from vllm.triton_utils import HAS_TRITON

    if HAS_TRITON:
        return f"{triton.__version__}, compiles for this platform"
    return (f"{triton.__version__}, no backend for this platform: kernels run only under "
            f"its interpreter (--pod-impl triton turns it on; exact but slow)")


def _cuda_vmm() -> str:
    try:
        from cuda.bindings import driver
    except ImportError:
        return "unavailable: cuda-bindings not installed (pip install 'vllm-ext[vattention-cuda]')"
    err, = driver.cuInit(0)
    if err != driver.CUresult.CUDA_SUCCESS:
        return f"unavailable: cuInit failed ({err.name})"
    err, count = driver.cuDeviceGetCount()
    if err != driver.CUresult.CUDA_SUCCESS or count == 0:
        return "unavailable: no CUDA device"
    attr = driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
    supported = [i for i in range(count) if driver.cuDeviceGetAttribute(attr, i)[1]]
    return (f"available on {len(supported)} of {count} devices" if supported
            else f"not supported by the {count} devices")


def _support_lines(out: Callable[[str], None], version) -> None:
    from vllm.platforms import current_platform

    from vllm_ext.tools.compat import line_of, rows_for

    platform = current_platform.device_type
    out("")
    out(f"how this release verified vLLM {line_of(version)} on {platform} "
        f"(docs/compatibility.md):")
    for feature, how in rows_for(version, platform):
        out(f"  {feature}: {how}")


def _patch_lines(out: Callable[[str], None], version, override: bool) -> dict[str, str]:
    """Print each patch and its targets; return the patches that do not fit, with why."""
    from vllm.platforms import current_platform

    from vllm_ext.patches import PATCHES, PatchError

    out("")
    out("patches and declared internals (each acts only for engines whose selection needs it):")
    broken: dict[str, str] = {}
    platform = current_platform.device_type
    for patch in PATCHES:
        if patch.obsolete_in(version):
            out(f"  {patch.name}: {patch.summary}; not needed from vLLM {patch.obsolete_from} "
                f"on (vLLM does it itself)")
            continue
        where = "" if patch.applies_on(platform) else f" (not used on {platform})"
        versions = "" if version in patch.vllm_versions else \
            f"; written for vLLM {patch.vllm_versions}" + ("" if override else ", refused")
        out(f"  {patch.name}: {patch.summary}; needed by {', '.join(patch.components)}"
            f"{where}{versions}")
        if versions and not override and patch.applies_on(platform):
            broken[patch.name] = versions
        for target in patch.targets:
            if not target.exists_in(version):
                out(f"      {target.path}: the form of vLLM {target.versions}; not checked "
                    f"in {version}")
                continue
            try:
                target.check()
                state = ", ".join(("present", *(what for what, declared in (
                    ("signature as written", target.params),
                    (f"attributes {', '.join(target.attrs)} there", target.attrs),
                    ("methods exactly as mirrored", target.methods is not None)) if declared)))
            except PatchError as e:
                state = f"PROBLEM: {e}"
                if patch.applies_on(platform):
                    broken[patch.name] = str(e)
            out(f"      {target.path}: {state}")
    return broken

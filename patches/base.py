"""What every patch is: a named change to one vLLM symbol, for stated vLLM versions.

A patch that cannot apply raises; vllm-ext never runs on a half-patched engine.
"""

from __future__ import annotations

import importlib
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version


class PatchError(RuntimeError):
    """A patch does not fit the installed vLLM."""


class Patch:
    """Subclasses set `name`, `target` ("module:Qualified.name"), `vllm_versions`,
    write `_apply(owner, attr, original)`, and say in their docstring which engine
    invariant they bend and why that is safe."""

    name: str
    target: str
    vllm_versions: SpecifierSet

    def __init__(self) -> None:
        self.applied = False

    def resolve(self) -> tuple[Any, str, Any]:
        module_name, _, qualname = self.target.partition(":")
        owner: Any = importlib.import_module(module_name)
        *path, attr = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        if attr not in vars(owner):
            raise PatchError(f"patch {self.name}: {self.target} does not exist in this vLLM")
        return owner, attr, vars(owner)[attr]

    def apply(self, vllm_version: Version) -> None:
        """Apply once per process; refuse outside `vllm_versions`."""
        if self.applied:
            return
        if vllm_version not in self.vllm_versions:
            raise PatchError(
                f"patch {self.name} was written for vLLM {self.vllm_versions}, "
                f"found {vllm_version}")
        self._apply(*self.resolve())
        self.applied = True

    def _apply(self, owner: Any, attr: str, original: Any) -> None:
        raise NotImplementedError

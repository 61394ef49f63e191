"""The house rules, read from the sources: no import cycles, the engine-free folders never
reach vLLM, code inside the engine never reaches the front end or the tools, and only
`vllm_ext.config` reads an engine's choices.

Imports are read with `ast` (nothing is imported), at every depth: a deferred import
inside a function, or one under `if TYPE_CHECKING:`, is a dependency all the same.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "vllm_ext"

# The one cycle kept on purpose, and why. vLLM's parser reaches our flags only through a
# patch (no hook adds engine flags), and the front end asks the patch table which
# patches this vLLM refused before it accepts a component: the patch runs the front end,
# the front end reads the table that lists the patch. Deferred on both sides.
ALLOWED_EDGES = {
    ("vllm_ext.patches.cli_flags", "vllm_ext.frontend.flags"),
}

# Folders whose code must run without vLLM (the engine-agnostic cores and the A/B
# harness, which talks to servers over HTTP only).
ENGINE_FREE = ("vllm_ext.schedulers", "vllm_ext.kernels", "vllm_ext.allocators", "vllm_ext.ab")
GLUE = ("engine", "frontend", "patches", "plugin", "config")
# What runs inside vLLM's processes stays out of the front end and the tools.
LAYERS = {
    "vllm_ext.engine": ("vllm_ext.frontend", "vllm_ext.tools", "vllm_ext.ab",
                        "vllm_ext.simulate"),
    "vllm_ext.frontend": ("vllm_ext.tools", "vllm_ext.ab", "vllm_ext.simulate"),
    "vllm_ext.config": ("vllm_ext.frontend", "vllm_ext.engine", "vllm_ext.tools"),
}


def _modules() -> dict[str, Path]:
    found = {}
    # The component folders are symlinks into the package: follow them, as the wheel does.
    for dirpath, dirnames, filenames in os.walk(ROOT / PACKAGE, followlinks=True):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        parts = Path(dirpath).relative_to(ROOT).parts
        for f in filenames:
            if f.endswith(".py"):
                found[".".join(parts + (() if f == "__init__.py" else (f[:-3],)))] = \
                    Path(dirpath) / f
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports; `from pkg import mod` counts as `pkg.mod`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _internal(name: str) -> list[str]:
    return sorted(d for d in GRAPH[name] if d in GRAPH and (name, d) not in ALLOWED_EDGES)


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in _internal(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while component[-1:] != [v]:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def _reach(start: str) -> dict[str, str]:
    """Every module reachable from `start` (ours and external), each with one importer."""
    seen, todo = {start: ""}, [start]
    while todo:
        here = todo.pop()
        for dep in GRAPH.get(here, ()):
            if dep not in seen:
                seen[dep] = here
                if dep in GRAPH:
                    todo.append(dep)
    return seen


def _path(seen: dict[str, str], end: str) -> str:
    chain = [end]
    while seen[chain[-1]]:
        chain.append(seen[chain[-1]])
    return " -> ".join(reversed(chain))


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_package_is_read_whole():
    # A walk that missed the symlinked folders or a subpackage would pass vacuously.
    for expected in ("vllm_ext.config", "vllm_ext.frontend.selection",
                     "vllm_ext.engine.scheduling", "vllm_ext.engine.pod.cuda", "vllm_ext.tools.cli",
                     "vllm_ext.schedulers.sarathi", "vllm_ext.kernels.pod",
                     "vllm_ext.allocators.pool", "vllm_ext.patches.base", "vllm_ext.ab.runner"):
        assert expected in GRAPH
    assert "vllm_ext.engine.pod.support" in GRAPH["vllm_ext.engine.pod.cuda"]


def test_no_import_cycles():
    assert _cycles() == []


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    # ab.stats imports ab.metron; one deferred import back closes a cycle.
    assert "vllm_ext.ab.metron" in GRAPH["vllm_ext.ab.stats"]
    monkeypatch.setitem(GRAPH, "vllm_ext.ab.metron",
                        GRAPH["vllm_ext.ab.metron"] | {"vllm_ext.ab.stats"})
    assert _cycles() == [["vllm_ext.ab.metron", "vllm_ext.ab.stats"]]


def test_allowed_edges_still_exist():
    # An exception that no longer exists is deleted, not kept.
    for importer, imported in ALLOWED_EDGES:
        assert imported in GRAPH[importer]


def _engine_free_violations(folder: str) -> list[str]:
    found = []
    for name in [m for m in GRAPH if _under(m, folder)]:
        seen = _reach(name)
        found += [f"{_path(seen, dep)}: {folder} reaches vLLM or its glue" for dep in seen
                  if _under(dep, "vllm") or any(_under(dep, f"vllm_ext.{glue}") for glue in GLUE)]
    return found


def _layer_violations(layer: str) -> list[str]:
    return [f"{name} imports {dep}: {layer} is below {above}"
            for name in GRAPH if _under(name, layer)
            for dep in GRAPH[name] for above in LAYERS[layer] if _under(dep, above)]


@pytest.mark.parametrize("folder", ENGINE_FREE)
def test_engine_free_folders_never_reach_vllm(folder):
    assert _engine_free_violations(folder) == []


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layers_import_downward_only(layer):
    assert _layer_violations(layer) == []


def test_the_rules_find_what_breaks_them(monkeypatch):
    # One deferred import of the glue from a policy reaches vLLM through it.
    monkeypatch.setitem(GRAPH, "vllm_ext.schedulers.request",
                        GRAPH["vllm_ext.schedulers.request"] | {"vllm_ext.engine.scheduling"})
    assert any("vllm_ext.schedulers.request -> vllm_ext.engine.scheduling" in v
               for v in _engine_free_violations("vllm_ext.schedulers"))
    monkeypatch.setitem(GRAPH, "vllm_ext.engine.vattention",
                        GRAPH["vllm_ext.engine.vattention"] | {"vllm_ext.frontend.selection"})
    assert _layer_violations("vllm_ext.engine") == [
        "vllm_ext.engine.vattention imports vllm_ext.frontend.selection: vllm_ext.engine is "
        "below vllm_ext.frontend"]


def test_only_config_reads_an_engines_choices():
    # The record is written by the front end's selection and read by vllm_ext.config;
    # everything else asks ExtConfig.
    allowed = {"vllm_ext.config", "vllm_ext.frontend.selection"}
    readers = sorted(name for name, path in MODULES.items()
                     if "additional_config" in _code_words(path) and name not in allowed)
    assert readers == []


def _code_words(path: Path) -> set[str]:
    """The attribute names, names and string constants of a module's code (docstrings
    and comments, which may mention `additional_config`, left out)."""
    words = set()
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                    ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr)
                  and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            words.add(node.value)
    return words

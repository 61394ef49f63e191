"""What every patch is: a named change to vLLM, for stated vLLM versions, that proves it ran.

A patch declares
- `targets`: every vLLM symbol it replaces or relies on, each with the parameters it was
  written against, so that a symbol that moved or changed shape is found before use;
- `vllm_versions`: the releases it was written for;
- `components`: the selections that need it (`kind=name`, e.g. `kv_allocator=vattention`;
  `*` for any selection, `cli` for the command line);
- `platforms`: the vLLM platforms it is applied on (None: all).

Its code calls `reached()` whenever it takes the patched path; the first time in a
process this is recorded in the stats directory, so a test, or `vllm-ext doctor` on a
live deployment, can see that every patch a selection needs really ran (a target that
still exists but is no longer called otherwise goes unnoticed).

A patch that does not fit refuses with the reason (`PatchError`): the plugin then
refuses the components that need it, by name, and vLLM itself runs on unchanged.

A `Reliance` is the same declaration for vLLM internals a component reads or steers
without replacing anything (a scheduler that sets a request's decode-eligibility step,
a mirror of a class's methods): a vLLM that renamed or reshaped one refuses the
component by name before an engine starts, instead of failing mid-step.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

REACHED_FILE = "patches-reached.log"  # in the stats directory: "name pid" per first reach

# The vLLM process a patch runs in (patches/__init__.py lists them so grouped).
FRONT_END = "front end"  # the process that parses flags (vllm serve's API server)
ENGINE_CORE = "engine core"  # the scheduler's process
WORKER = "worker"  # the model runner's processes
PROCESSES = (FRONT_END, ENGINE_CORE, WORKER)


class PatchError(RuntimeError):
    """A patch does not fit the installed vLLM; the message says why."""


@dataclass(frozen=True, slots=True)
class Target:
    """A vLLM symbol a patch depends on, and the parameters it was written against
    (None: not checked, e.g. a class; a trailing "..." checks only the leading ones,
    for wrappers that pass the rest through)."""

    path: str  # "package.module:Qualified.name"
    params: tuple[str, ...] | None = None
    # The vLLM releases that have it (None: every release the patch was written for);
    # outside them the patch neither checks nor replaces it.
    versions: SpecifierSet | None = None
    # For a class: attributes of its instances that vllm-ext reads or writes (a class
    # attribute, property, dataclass field, or one its methods assign to `self`).
    attrs: tuple[str, ...] = ()
    # For a class whose behaviour vllm-ext mirrors: every method it defines itself, as
    # written against. A method added upstream could bypass the mirror, so any change
    # to the set refuses.
    methods: tuple[str, ...] | None = None

    def exists_in(self, vllm_version: Version) -> bool:
        return self.versions is None or vllm_version in self.versions

    def resolve(self) -> tuple[Any, str, Any]:
        """(owner, attribute name, current value); PatchError if it is not there."""
        module_name, _, qualname = self.path.partition(":")
        try:
            owner: Any = importlib.import_module(module_name)
            *path, attr = qualname.split(".")
            for part in path:
                owner = getattr(owner, part)
        except (ImportError, AttributeError) as e:
            raise PatchError(f"{self.path} does not exist in this vLLM ({e})") from None
        if attr not in vars(owner):
            raise PatchError(f"{self.path} does not exist in this vLLM")
        return owner, attr, vars(owner)[attr]

    def check(self) -> None:
        """Raise PatchError if the symbol is missing or its parameters, attributes or
        method set changed."""
        owner, attr, value = self.resolve()
        if self.attrs or self.methods is not None:
            self._check_class(value)
        if self.params is None:
            return
        value = getattr(owner, attr)
        # Triton kernels (and vLLM's stand-ins for them) list their arguments; functions
        # are read as callers see them (bound for classmethods), through our wrappers.
        names = getattr(value, "arg_names", None)
        found = tuple(names) if names is not None else tuple(
            inspect.signature(value).parameters)
        expected = self.params
        if expected[-1:] == ("...",):
            expected, found = expected[:-1], found[:len(expected) - 1]
        if found != expected:
            raise PatchError(f"{self.path} changed signature: it takes ({', '.join(found)}), "
                             f"the patch was written for ({', '.join(self.params)})")


    def _check_class(self, cls: Any) -> None:
        if not inspect.isclass(cls):
            raise PatchError(f"{self.path} is not a class in this vLLM")
        missing = missing_attributes(cls, self.attrs)
        if missing:
            raise PatchError(f"{self.path} has no attribute {', '.join(missing)} in this vLLM")
        if self.methods is not None:
            found = own_methods(cls)
            added, gone = sorted(found - set(self.methods)), sorted(set(self.methods) - found)
            if added or gone:
                change = "; ".join(part for part in (
                    f"added {', '.join(added)}" if added else "",
                    f"removed {', '.join(gone)}" if gone else "") if part)
                raise PatchError(f"{self.path} changed its methods ({change}); vllm-ext "
                                 f"mirrors exactly ({', '.join(sorted(self.methods))})")


def own_methods(cls: type) -> set[str]:
    """The methods (and properties) a class defines itself."""
    kinds = (staticmethod, classmethod, property, functools.cached_property)
    return {name for name, value in vars(cls).items()
            if inspect.isfunction(value) or isinstance(value, kinds)}


def missing_attributes(cls: type, names: tuple[str, ...]) -> list[str]:
    """Those of `names` an instance of `cls` does not have by its class's definition:
    not a class attribute, property, dataclass or msgspec field or annotation, nor a
    name a method of the class or its bases assigns to `self`. Sources are read only for
    names the class itself does not list, and only until all are found: every vLLM
    process checks these when the plugin loads."""
    listed = set(dir(cls)).union(getattr(cls, "__struct_fields__", ()))
    if dataclasses.is_dataclass(cls):
        listed.update(f.name for f in dataclasses.fields(cls))
    for klass in cls.__mro__:
        listed.update(getattr(klass, "__annotations__", {}))
    wanted = [n for n in names if n not in listed]
    for klass in cls.__mro__:
        if not wanted:
            break
        if klass.__module__ != "builtins":
            assigned = _assigned_to_self(klass)
            wanted = [n for n in wanted if n not in assigned]
    return wanted


@functools.cache
def _assigned_to_self(klass: type) -> frozenset[str]:
    """The names a class's own methods assign to `self`, from its module's source."""
    tree = _module_tree(klass.__module__)
    node = tree
    for part in klass.__qualname__.split("."):
        node = next((n for n in getattr(node, "body", ()) if isinstance(n, ast.ClassDef)
                     and n.name == part), None)
        if node is None:  # no source (a C type), or a class made at run time: dir() is all
            return frozenset()
    found = set()
    for sub in ast.walk(node):
        targets = (sub.targets if isinstance(sub, ast.Assign) else
                   [sub.target] if isinstance(sub, (ast.AnnAssign, ast.AugAssign)) else [])
        for target in targets:
            for leaf in ast.walk(target):
                if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) \
                        and leaf.value.id == "self":
                    found.add(leaf.attr)
    return frozenset(found)


@functools.cache
def _module_tree(module_name: str) -> ast.Module:
    """A module's syntax tree, parsed once for all its classes (an empty one without
    source)."""
    try:
        return ast.parse(inspect.getsource(sys.modules[module_name]))
    except (KeyError, OSError, TypeError, SyntaxError):
        return ast.Module(body=[], type_ignores=[])


class Patch:
    """Subclasses set `name`, `process`, `targets`, `vllm_versions`, `components`, optionally
    `platforms`, and either `wrap(original)` (the replacement for the first `replaces`
    targets, applied once per process) or nothing, when their code runs from another
    hook. Their
    docstring says which engine invariant they bend and why that is safe."""

    name: str
    process: str  # one of PROCESSES
    targets: tuple[Target, ...]
    vllm_versions: SpecifierSet
    components: tuple[str, ...]
    platforms: tuple[str, ...] | None = None
    replaces = 1  # how many leading targets `wrap` replaces
    # From this vLLM release on, vLLM itself does what the patch did: there it is
    # neither applied nor needed (None: still needed in every release).
    obsolete_from: str | None = None

    def __init__(self) -> None:
        self.applied = False
        self.calls = 0
        self._recorded: set[str] = set()  # stats directories told of a reach

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self) or "").split("\n", 1)[0]

    def applies_on(self, platform: str) -> bool:
        return self.platforms is None or platform in self.platforms

    def obsolete_in(self, vllm_version: Version) -> bool:
        return self.obsolete_from is not None and vllm_version >= Version(self.obsolete_from)

    def targets_in(self, vllm_version: Version) -> tuple[Target, ...]:
        """The targets this vLLM release has (see `Target.versions`)."""
        return tuple(t for t in self.targets if t.exists_in(vllm_version))

    def needed_for(self, kind: str, name: str, settings: dict[str, Any]) -> bool:
        """Whether component `name` of `kind`, with these settings, relies on this patch."""
        return f"{kind}={name}" in self.components

    def check(self, vllm_version: Version, any_version: bool = False) -> None:
        """Raise PatchError unless the patch fits: the version it was written for (unless
        `any_version`, the operator's override) and every target as written against."""
        if vllm_version not in self.vllm_versions and not any_version:
            raise PatchError(f"written for vLLM {self.vllm_versions}, found {vllm_version}")
        for target in self.targets_in(vllm_version):
            target.check()

    def apply(self, vllm_version: Version, any_version: bool = False) -> None:
        """Check, then apply once per process."""
        if self.applied:
            return
        self.check(vllm_version, any_version)
        for target in self.targets[:self.replaces]:
            if not target.exists_in(vllm_version):
                continue
            owner, attr, original = target.resolve()
            replacement = self.wrap(original)
            if replacement is not None:
                setattr(owner, attr, replacement)
        self.applied = True

    def wrap(self, original: Any) -> Any:
        """The replacement for each of the first `replaces` targets, or None when the
        patch wraps nothing (its code runs from another hook)."""
        return None

    def reached(self) -> None:
        """Called by the patch's code each time it takes the patched path; the first
        time for each engine (its stats directory) is written down there."""
        from vllm_ext import envs

        self.calls += 1
        directory = envs.stats_dir()
        if directory and directory not in self._recorded and os.path.isdir(directory):
            self._recorded.add(directory)
            # One short O_APPEND write: lines from several processes never interleave.
            with open(os.path.join(directory, REACHED_FILE), "a") as f:
                f.write(f"{self.name} {os.getpid()}\n")


class Reliance(Patch):
    """vLLM internals a component relies on without replacing them: declared, checked and
    refused exactly as a patch's targets are. The component calls `reached()` when an
    engine builds it, so a run shows the declaration was in force there."""

    replaces = 0


def reached_in(directory: str | None) -> dict[str, set[int]]:
    """Patch name -> the processes in which it was reached, from a stats directory."""
    found: dict[str, set[int]] = {}
    path = os.path.join(directory or "", REACHED_FILE)
    if directory and os.path.exists(path):
        with open(path) as f:
            for line in f:
                name, _, pid = line.strip().partition(" ")
                found.setdefault(name, set()).add(int(pid))
    return found

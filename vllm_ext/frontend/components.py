"""What a component is: a named, selectable piece with its own options.

A component describes itself; it does not import vLLM. `configure` turns the
operator's settings into engine-argument overrides, and is where a component
refuses settings it cannot honour.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# The selectable kinds, as (python keyword / CLI dest, CLI flag, hook name).
KINDS: dict[str, tuple[str, str]] = {
    "scheduler": ("--scheduler", "vllm_ext_schedulers"),
    "attn": ("--attn", "vllm_ext_attention_backends"),
    "kv_allocator": ("--kv-allocator", "vllm_ext_kv_allocators"),
}


class SelectionError(ValueError):
    """A component choice or option is invalid; the message names what is allowed."""


@dataclass(frozen=True, slots=True)
class Option:
    """One setting of a component, shown as `--<component>-<name>` on the CLI."""

    name: str
    type: type
    help: str
    default: Any = None  # None: the component picks (e.g. a per-platform default)
    choices: tuple[Any, ...] | None = None
    # Given several times, its values are collected into a list (argparse's "append"):
    # one flag per item, e.g. one SLO class per --mnemosyne-slo-class.
    repeat: bool = False

    def flag(self, component: str) -> str:
        return f"--{component}-{self.name}"

    def dest(self, component: str) -> str:
        return f"{component}_{self.name}".replace("-", "_")

    def check(self, component: str, value: Any) -> Any:
        if value is None:
            return None
        if self.repeat:  # from Python one value may stand alone
            items = value if isinstance(value, (list, tuple)) else [value]
            return [self._check_one(component, item) for item in items]
        return self._check_one(component, value)

    def _check_one(self, component: str, value: Any) -> Any:
        try:
            value = self.type(value)
        except (TypeError, ValueError):
            raise SelectionError(
                f"{self.flag(component)}: expected {self.type.__name__}, got {value!r}") from None
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(map(str, self.choices))
            raise SelectionError(f"{self.flag(component)}: {value!r} is not one of: {allowed}")
        return value


@dataclass(frozen=True, slots=True)
class ConfigureContext:
    """What a component may look at while configuring: the platform, the engine
    arguments the operator set explicitly (not vLLM's defaults), the other
    components chosen (kind -> name) and every component option given (by dest)."""

    platform: str
    user_engine_args: Mapping[str, Any]
    selected: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def require(self, who: str, needed: Mapping[str, Any]) -> dict[str, Any]:
        """Engine arguments a component needs: returned as overrides, and an error naming
        both when the operator explicitly gave a contradicting value (never a silent
        override)."""
        for key, value in needed.items():
            given = self.user_engine_args.get(key)
            if given is not None and given != value:
                raise SelectionError(f"{who} needs {key}={value!r}, but {key}={given!r} was given")
        return dict(needed)


@dataclass(frozen=True, slots=True)
class Component:
    """A selectable implementation of one kind (`scheduler`, `attn`, `kv_allocator`).

    `configure(settings, ctx)` returns `(resolved_settings, engine_overrides)`:
    the settings with defaults filled in (recorded in the engine's config and
    logged at start-up) and the engine arguments the component needs.
    """

    kind: str
    name: str
    summary: str
    configure: Callable[[dict[str, Any], ConfigureContext], tuple[dict[str, Any], dict[str, Any]]]
    options: tuple[Option, ...] = field(default=())
    # ASGI middleware, by import path, that `vllm serve`'s API server runs when this
    # component is chosen (added to vLLM's own --middleware list; other commands, which
    # serve no HTTP, ignore it).
    api_middleware: tuple[str, ...] = field(default=())

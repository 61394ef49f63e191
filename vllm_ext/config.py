"""One engine's vllm-ext choices, typed: `ExtConfig`, read from the engine's own config.

The front end (`vllm_ext.frontend.selection`) records each chosen component and its
resolved settings in `additional_config["vllm_ext"]`, the one thing that travels with an
engine into every vLLM process it starts. Everything that runs there reads them back
through `ExtConfig.of(vllm_config)` and nothing else, so two engines of one process never
share a choice, and a record that is not what this release writes (an unknown key, a
value of the wrong type) stops the engine with the key named instead of being half-read.

    {"scheduler": {"name": "sarathi", "token_budget": 256, "kv_admission": "full"},
     "attn": {"name": "pod", "impl": "torch", "kvp": 1}}

The built-in components' settings are the frozen dataclasses below (or the engine-free
cores' own: `SarathiConfig`, `VAttentionSettings`); a third-party component's settings
are kept as a read-only mapping for it to check.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_ext.allocators.settings import VAttentionSettings
from vllm_ext.schedulers.mnemosyne import (DEFAULT_MAX_DEFER_STEPS, DEFAULT_PREFILL_MS_PER_TOKEN,
                                           DEFAULT_TTFT_SLO_S, MnemosyneConfig)
from vllm_ext.schedulers.sarathi import SarathiConfig
from vllm_ext.schedulers.slo import SLO

CONFIG_KEY = "vllm_ext"  # the key of `additional_config` that holds the record
KINDS = ("scheduler", "attn", "kv_allocator")


class ConfigError(ValueError):
    """An engine's vllm-ext record does not fit this release; the message names the key."""


@dataclass(frozen=True, slots=True)
class NoSettings:
    """A component without settings (vLLM's own choices, prefill-first)."""


@dataclass(frozen=True, slots=True)
class MnemosyneSettings:
    """`--scheduler mnemosyne`: Sarathi's steps and the first-token deadlines, as recorded
    (one flat record: the `--mnemosyne-*` flags)."""

    token_budget: int
    kv_admission: str = "full"
    tbt_slo_ms: float | None = None
    # With tbt_slo_ms: adaptive chunking's model; without: it only predicts prefill times.
    latency_model: str | None = None
    sequence_pipeline: bool = True
    ttft_slo_s: float = DEFAULT_TTFT_SLO_S
    prefill_ms_per_token: float = DEFAULT_PREFILL_MS_PER_TOKEN
    starvation_s: float | None = None
    # --mnemosyne-slo-class, by name: {"ttft_ms": ..., "tbt_ms": ...} (either may be absent).
    slo_classes: dict | None = None
    max_defer_steps: int = DEFAULT_MAX_DEFER_STEPS

    def __post_init__(self) -> None:
        _ = (self.sarathi, self.deadlines)  # each half checks its own values

    @property
    def sarathi(self) -> SarathiConfig:
        chunking_model = self.latency_model if self.tbt_slo_ms is not None else None
        return SarathiConfig(self.token_budget, self.kv_admission, self.tbt_slo_ms,
                             chunking_model, self.sequence_pipeline)

    @property
    def deadlines(self) -> MnemosyneConfig:
        classes = tuple((name, _slo(name, record))
                        for name, record in (self.slo_classes or {}).items())
        tbt = None if self.tbt_slo_ms is None else self.tbt_slo_ms / 1e3
        return MnemosyneConfig(self.ttft_slo_s, self.prefill_ms_per_token, self.starvation_s,
                               tbt, classes, self.max_defer_steps)


def _slo(name: str, record: Any) -> SLO:
    if not isinstance(record, Mapping) or not set(record) <= {"ttft_ms", "tbt_ms"} or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
            for v in record.values()):
        raise ValueError(f"slo_classes[{name!r}] must map ttft_ms and/or tbt_ms to positive "
                         f"numbers, got {record!r}")
    return SLO.from_record(record)


POD_IMPLS = ("torch", "triton")


@dataclass(frozen=True, slots=True)
class PodSettings:
    """`--attn pod`: which implementation runs, and over how many KV-parallel ranks."""

    impl: str
    kvp: int = 1

    def __post_init__(self) -> None:
        if self.impl not in POD_IMPLS:
            raise ValueError(f"--pod-impl {self.impl!r}: choose from {', '.join(POD_IMPLS)}")
        if self.kvp < 1:
            raise ValueError(f"--kvp must be at least 1, got {self.kvp}")


# The settings type of each built-in component, by (kind, name).
SETTINGS: dict[tuple[str, str], type] = {
    ("scheduler", "vllm"): NoSettings,
    ("scheduler", "prefill-first"): NoSettings,
    ("scheduler", "sarathi"): SarathiConfig,
    ("scheduler", "mnemosyne"): MnemosyneSettings,
    ("attn", "vllm"): NoSettings,
    ("attn", "pod"): PodSettings,
    ("kv_allocator", "vllm"): NoSettings,
    ("kv_allocator", "vattention"): VAttentionSettings,
}


@dataclass(frozen=True, slots=True)
class Selected:
    """One chosen component: its name, its typed settings, and the record as written
    (key order kept, for the start-up line)."""

    name: str
    settings: Any  # SETTINGS[(kind, name)], or a read-only mapping for a third party's
    recorded: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.recorded)
        return self.name + (f"({args})" if args else "")


@dataclass(frozen=True, slots=True)
class ExtConfig:
    """What one engine chose; None for a kind it left to vLLM."""

    scheduler: Selected | None = None
    attn: Selected | None = None
    kv_allocator: Selected | None = None

    @staticmethod
    def of(vllm_config: Any) -> ExtConfig:
        """The choices of the engine `vllm_config` belongs to (None: no engine, none)."""
        if vllm_config is None:
            return ExtConfig()
        return ExtConfig.from_additional_config(vllm_config.additional_config)

    @staticmethod
    def from_additional_config(additional_config: Mapping[str, Any] | None) -> ExtConfig:
        record = (additional_config or {}).get(CONFIG_KEY) or {}
        # Built once per distinct record in a process: every step may ask. The key keeps
        # the record's order, which the start-up line shows.
        return _parse(json.dumps(record))

    @staticmethod
    def from_record(record: Mapping[str, Any]) -> ExtConfig:
        """Check and type a record (raises ConfigError naming the key)."""
        if not isinstance(record, Mapping):
            raise ConfigError(f"additional_config[{CONFIG_KEY!r}] must be a mapping, "
                              f"got {type(record).__name__}")
        unknown = sorted(set(record) - set(KINDS))
        if unknown:
            raise ConfigError(f"additional_config[{CONFIG_KEY!r}]: unknown key {unknown[0]!r}; "
                              f"allowed: {', '.join(KINDS)}")
        return ExtConfig(**{kind: _selected(kind, record[kind]) for kind in record})

    def is_empty(self) -> bool:
        return all(getattr(self, kind) is None for kind in KINDS)

    def settings(self, kind: str, name: str) -> Any:
        """The settings of `kind` when component `name` was chosen, else None."""
        chosen = getattr(self, kind)
        return chosen.settings if chosen is not None and chosen.name == name else None

    def describe(self) -> str:
        """`scheduler=sarathi(token_budget=256, kv_admission=full)`, for the start-up line."""
        return "; ".join(f"{kind}={chosen.describe()}" for kind in KINDS
                         if (chosen := getattr(self, kind)) is not None)


@functools.lru_cache(maxsize=64)
def _parse(record_json: str) -> ExtConfig:
    return ExtConfig.from_record(json.loads(record_json))


def _selected(kind: str, entry: Any) -> Selected:
    where = f"additional_config[{CONFIG_KEY!r}][{kind!r}]"
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise ConfigError(f"{where} must be a mapping with a 'name' string, got {entry!r}")
    name = entry["name"]
    given = {k: v for k, v in entry.items() if k != "name"}
    cls = SETTINGS.get((kind, name))
    if cls is None:  # a third party's component: its settings are its own to check
        return Selected(name, types.MappingProxyType(dict(given)), tuple(given.items()))
    return Selected(name, typed(cls, given, f"{where} ({name})"), tuple(given.items()))


def typed(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """`cls(**values)` for a dataclass, refusing unknown keys and values of the wrong type,
    each by name, and the dataclass's own checks as ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        if key not in hints:
            allowed = ", ".join(fields) or "none"
            raise ConfigError(f"{where}: unknown key {key!r}; allowed: {allowed}")
        if not _is(value, hints[key]):
            raise ConfigError(f"{where}: {key!r} must be {_name(hints[key])}, got {value!r}")
    try:
        return cls(**values)
    except TypeError as e:  # a required setting is missing
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _is(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_is(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:  # JSON writes 2.0 as 2.0 but a person writes 2
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _name(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_name(arg) for arg in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))

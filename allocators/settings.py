"""vAttention's settings, checked once: one frozen dataclass, recorded in the engine's config."""

from __future__ import annotations

import re
from dataclasses import dataclass

LAYOUTS = ("blocks", "slots")
BACKENDS = ("host", "cuda")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}


def size_in_bytes(text: str | int) -> int:
    """'2MiB', '64k', '1.5GiB' or a plain number of bytes."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"{text!r} is not a size; write e.g. 65536, 64KiB, 2MiB or 1.5GiB")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return value


@dataclass(frozen=True, slots=True)
class VAttentionSettings:
    backend: str = "host"
    layout: str = "blocks"
    page_size: int | None = None  # bytes per layer; None: the backend's default
    premap: int = 2  # idle pages kept mapped ahead of need
    watermark: int = 8  # further idle pages kept for reuse before they are unmapped
    physical_limit: int | None = None  # bytes of physical KV memory per rank, all its layers

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"vattention backend {self.backend!r}: choose from "
                             f"{', '.join(BACKENDS)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"--vattention-layout {self.layout!r}: choose from "
                             f"{', '.join(LAYOUTS)}")
        for name in ("premap", "watermark"):
            if getattr(self, name) < 0:
                raise ValueError(f"--vattention-{name} is a number of pages >= 0, "
                                 f"got {getattr(self, name)}")


def page_size_for(block_bytes: int, requested: int, granularity: int) -> int:
    """The page size actually used: a multiple of the backend's granularity that holds
    whole blocks, at least `requested` (so a block never straddles two pages)."""
    from math import lcm

    unit = lcm(block_bytes, granularity)
    return -(-max(requested, unit) // unit) * unit

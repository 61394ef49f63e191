"""What an A/B run is made of: its arms, its configuration and each arm's result. Data
only, shared by the runner, the report and the plots (and `vllm-ext simulate`)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from vllm_ext.ab import capacity as cap
from vllm_ext.ab import equivalence as eq
from vllm_ext.ab.client import RequestRecord
from vllm_ext.ab.progress import Progress
from vllm_ext.ab.summary import SLO
from vllm_ext.ab.traces import LengthDist, Trace

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class ABError(ValueError):
    """A bad A/B configuration, found before any server starts."""


@dataclass(frozen=True, slots=True)
class Arm:
    name: str
    serve_args: tuple[str, ...] = ()  # flags for `vllm serve MODEL ...`
    endpoint: str | None = None  # a running server instead

    @classmethod
    def parse(cls, spec: str, endpoint: bool = False) -> "Arm":
        name, sep, value = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            form = "NAME=URL" if endpoint else 'NAME="FLAGS"'
            raise ABError(f"{'--endpoint' if endpoint else '--arm'} {spec!r}: expected {form}")
        if not set(name) <= _NAME_CHARS:
            raise ABError(f"arm name {name!r}: use letters, digits, '_', '.', '-'")
        if endpoint:
            url = value.strip().rstrip("/").removesuffix("/v1")
            if not url.startswith(("http://", "https://")):
                raise ABError(f"--endpoint {spec!r}: URL must start with http:// or https://")
            return cls(name, endpoint=url)
        try:
            return cls(name, tuple(shlex.split(value)))
        except ValueError as e:
            raise ABError(f"--arm {spec!r}: cannot split its flags ({e})") from None

    def describe(self) -> str:
        return self.endpoint or ("vllm serve MODEL " + shlex.join(self.serve_args)).strip()


@dataclass(frozen=True, slots=True)
class CapacitySearch:
    target: cap.CapacityTarget
    low_qps: float
    high_qps: float
    iterations: int
    requests: int  # per probe


@dataclass
class ABConfig:
    model: str | None  # served by the arms that start a server; the endpoints' model name
    arms: list[Arm]
    traces: list[Trace]  # one per seed, replayed by every arm
    out: Path
    vocab_size: int
    slo: SLO = SLO()
    common_args: tuple[str, ...] = ()  # flags every started server gets, before its own
    prompts: list[eq.Prompt] | None = None  # equivalence prompt set; None skips it
    equivalence_tokens: int = 32
    top_k: int = 5
    capacity: CapacitySearch | None = None
    prompt_len: LengthDist | None = None  # for capacity probes' traces
    output_len: LengthDist | None = None
    max_prompt_tokens: int = 1 << 30
    max_output_tokens: int = 1 << 30
    bootstrap_iterations: int = 1000
    startup_timeout: float = 600.0
    warmup_requests: int = 2
    progress: Progress = field(default_factory=Progress)  # Progress(enabled=False): silent
    # Set by `vllm-ext simulate`: {"source": ..., "assumptions": [...], "sweep": ...};
    # the report then says everywhere that its figures are forecasts.
    simulation: dict | None = None

    def check(self) -> None:
        if not self.arms:
            raise ABError("no arms: give at least one --arm or --endpoint")
        names = [a.name for a in self.arms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ABError(f"arm names must differ; repeated: {', '.join(dupes)}")
        if self.model is None and any(a.endpoint is None for a in self.arms):
            raise ABError("--model is required to start servers for --arm")


@dataclass
class ArmResult:
    arm: Arm
    runs: list[list[RequestRecord]] = field(default_factory=list)
    summary: dict | None = None
    outputs: list[eq.Output] | None = None
    capacity: cap.Capacity | None = None
    error: str | None = None  # the arm failed: no latency figures
    problems: list[str] = field(default_factory=list)  # parts that failed after the figures
    log: str | None = None
    wall_s: float = 0.0

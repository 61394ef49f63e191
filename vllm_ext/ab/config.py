"""What an A/B run is made of: its arms, its configuration and each arm's result. Data
only, shared by the runner, the report and the plots (and `vllm-ext simulate`)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from vllm_ext.ab import capacity as cap
from vllm_ext.ab import equivalence as eq
from vllm_ext.ab.client import SEND_VALUES, RequestRecord, SLOSending
from vllm_ext.ab.progress import Progress
from vllm_ext.ab.summary import SLO
from vllm_ext.ab.traces import LengthDist, SLOClass, Trace, counted_class

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

    def serves_priority(self, common_args: tuple[str, ...] = ()) -> bool:
        """Whether its server schedules by request priority (`--scheduling-policy
        priority`, the last one given winning); never known for an endpoint."""
        policy = None
        args = [*common_args, *self.serve_args] if self.endpoint is None else []
        for i, arg in enumerate(args):
            if arg == "--scheduling-policy" and i + 1 < len(args):
                policy = args[i + 1]
            elif arg.startswith("--scheduling-policy="):
                policy = arg.partition("=")[2]
        return policy == "priority"


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
    slo_mix: tuple[SLOClass, ...] = ()  # --slo-mix, for capacity probes' traces too
    # How requests state their SLOs (priorities left out: `sending(arm)` adds them).
    slo_sending: SLOSending = SEND_VALUES
    # --slo-priority: class -> vLLM request priority, sent to the arms `slo_priority_arms`
    # names (None: the started arms served with --scheduling-policy priority).
    slo_priority: dict[str, int] | None = None
    slo_priority_arms: tuple[str, ...] | None = None

    def check(self) -> None:
        if not self.arms:
            raise ABError("no arms: give at least one --arm or --endpoint")
        names = [a.name for a in self.arms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ABError(f"arm names must differ; repeated: {', '.join(dupes)}")
        if self.model is None and any(a.endpoint is None for a in self.arms):
            raise ABError("--model is required to start servers for --arm")
        self._check_priorities(names)

    def _check_priorities(self, names: list[str]) -> None:
        if self.slo_priority is None:
            if self.slo_priority_arms is not None:
                raise ABError("--slo-priority-arms needs --slo-priority CLASS=N,...")
            return
        if self.slo_priority_arms is not None:
            unknown = sorted(set(self.slo_priority_arms) - set(names))
            if unknown:
                raise ABError(f"--slo-priority-arms: no arm named {', '.join(unknown)}")
        if not any(self.gets_priority(a) for a in self.arms):
            raise ABError("--slo-priority: no arm is served with --scheduling-policy priority "
                          "(stock vLLM refuses a priority other than 0 otherwise); add it to an "
                          "arm's flags or name the arms with --slo-priority-arms")
        classes = {counted_class(r) for t in self.traces for r in t.requests}
        missing = sorted(classes - set(self.slo_priority))
        if missing:
            raise ABError(f"--slo-priority gives no priority to the trace's class"
                          f"{'es' * (len(missing) > 1)} {', '.join(missing)} (requests without "
                          f"a class are counted as 'default', with deadlines of their own as "
                          f"'custom')")

    def gets_priority(self, arm: Arm) -> bool:
        """Whether requests to `arm` carry --slo-priority's priorities (an arm of a
        sweep, NAME@VALUE, as its NAME)."""
        if self.slo_priority is None:
            return False
        if self.slo_priority_arms is not None:
            return arm.name in self.slo_priority_arms or (
                arm.name.rpartition("@")[0] in self.slo_priority_arms)
        return arm.serves_priority(self.common_args)

    def sending(self, arm: Arm) -> SLOSending:
        """How requests to `arm` state their SLOs."""
        if not self.gets_priority(arm):
            return self.slo_sending
        return SLOSending(self.slo_sending.via, self.slo_sending.send_class,
                          dict(self.slo_priority))


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

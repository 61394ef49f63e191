"""Sarathi-Serve stall-free batching (Agrawal et al., OSDI'24).

Every step fills one token budget in a fixed order:

1. one token for every running decode;
2. the next chunk of each partially prefilled request, first come first served,
   each chunk as large as the budget left allows;
3. new requests, first come first served, while budget and KV memory remain.

A prefill therefore never displaces a running decode: a step leaves a decode out
only when the budget is smaller than the number of decodes, or when KV memory runs
out (then the latest-arrived request is preempted and recomputed later).

KV admission `full` admits a prompt only when the KV for all of it is free (the
paper's reservation); `chunk` admits on the first chunk and grows per chunk, which
packs more requests but preempts more under memory pressure. Under this order a
prompt is admitted only after every partial prefill ahead of it has been given its
last chunk, and so its blocks, so "free blocks cover the whole prompt" is the same
as reserving it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vllm_ext.schedulers.request import ReqState

KV_ADMISSION = ("full", "chunk")

# Token budget per platform when the operator gives none. 512 is the paper's choice
# for strict TBT SLOs on GPUs. On a CPU a 2048-token prefill takes seconds, so a
# smaller budget keeps mixed steps near the length of a few decode steps.
DEFAULT_TOKEN_BUDGET = {"cuda": 512, "rocm": 512, "xpu": 512, "cpu": 256}
FALLBACK_TOKEN_BUDGET = 512


@dataclass(frozen=True, slots=True)
class SarathiConfig:
    token_budget: int  # with tbt_slo_ms: the most tokens a step may take
    kv_admission: str = "full"
    tbt_slo_ms: float | None = None  # adaptive chunking (Mnemosyne) toward this step time
    latency_model: str | None = None  # its step-time model (vllm-ext profile)
    # With pipeline parallelism: let a prompt's next chunk enter the pipeline before
    # its previous chunk has left the last stage (Mnemosyne's SPP). Off: plain PP.
    sequence_pipeline: bool = True

    def __post_init__(self) -> None:
        if self.token_budget < 1:
            raise ValueError(f"sarathi token budget must be >= 1, got {self.token_budget}")
        if self.tbt_slo_ms is not None and self.tbt_slo_ms <= 0:
            raise ValueError(f"--sarathi-tbt-slo-ms must be > 0, got {self.tbt_slo_ms}")
        if self.latency_model is not None and self.tbt_slo_ms is None:
            raise ValueError("--sarathi-latency-model is used only with --sarathi-tbt-slo-ms")
        if self.kv_admission not in KV_ADMISSION:
            raise ValueError(
                f"sarathi kv admission must be one of {', '.join(KV_ADMISSION)}, "
                f"got {self.kv_admission!r}")

    @classmethod
    def for_platform(cls, platform: str, token_budget: int | None = None,
                     kv_admission: str | None = None, tbt_slo_ms: float | None = None,
                     latency_model: str | None = None,
                     sequence_pipeline: bool = True) -> "SarathiConfig":
        budget = (DEFAULT_TOKEN_BUDGET.get(platform, FALLBACK_TOKEN_BUDGET)
                  if token_budget is None else token_budget)
        return cls(budget, kv_admission or "full", tbt_slo_ms, latency_model, sequence_pipeline)


class SarathiPolicy:
    def __init__(self, config: SarathiConfig) -> None:
        self.config = config

    @staticmethod
    def order_key(req: ReqState) -> tuple[int, float, str]:
        """Decodes first, then partial prefills; each group by arrival (FCFS).

        The engine preempts from the end of this order, so the victim is the
        latest-arrived partial prefill, else the latest-arrived decode.
        """
        return SarathiPolicy.key(req.is_decode, req.arrival, req.req_id)

    @staticmethod
    def key(decode: bool, arrival: float, req_id: str) -> tuple[int, float, str]:
        """`order_key` from plain values (a scheduler sorts its whole batch every step)."""
        return (0 if decode else 1, arrival, req_id)

    def order(self, running: Iterable[ReqState]) -> list[ReqState]:
        return sorted(running, key=self.order_key)

    @property
    def reserve_full_prompt(self) -> bool:
        return self.config.kv_admission == "full"


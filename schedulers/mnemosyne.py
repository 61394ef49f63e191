"""Mnemosyne's deadline-aware prefill order: least remaining slack first, stall-free.

Every request has a first-token deadline, Metron's: arrival + TTFT SLO + an allowance
per prompt token. Every step still serves every running decode first (Sarathi's
stall-free rule); the rest of the token budget goes to prefills, partial and new alike,
in order of least remaining slack:

    slack = deadline - now - predicted time of the prompt tokens still to compute

with the prediction from the step-time model when there is one, else the allowance per
token. Under first come first served a short prompt queued behind long documents
waits for all of them; here it goes first when its deadline is nearer than theirs
allows.

No request starves: slack falls at the same rate for every waiting request, so a later
arrival overtakes an earlier one only within a bounded window, and a request already
past its deadline by more than `overdue_s` is served before every request that is not,
overdue ones in arrival order. With equal deadline offsets and predictions equal to the
allowance, the order is first come first served. Preemption takes victims from the end
of the same order: most slack first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vllm_ext.schedulers.request import ReqState
from vllm_ext.schedulers.sarathi import SarathiConfig

# Defaults, stated: a chat first token within 2 s of arrival (Metron's interactive
# SLO scale), plus 1 ms per prompt token, roughly a 7B model's prefill rate on one
# GPU, so that long documents get proportionally later deadlines.
DEFAULT_TTFT_SLO_S = 2.0
DEFAULT_PREFILL_MS_PER_TOKEN = 1.0
# Past its deadline by this much (in units of its own TTFT SLO), a request stops
# competing on slack and is served in arrival order before all that have not.
OVERDUE_SLOS = 2.0


@dataclass(frozen=True, slots=True)
class MnemosyneConfig:
    sarathi: SarathiConfig  # budget, KV admission, adaptive chunking: as Sarathi's
    ttft_slo_s: float = DEFAULT_TTFT_SLO_S
    prefill_ms_per_token: float = DEFAULT_PREFILL_MS_PER_TOKEN

    def __post_init__(self) -> None:
        if not self.ttft_slo_s > 0:
            raise ValueError(f"--mnemosyne-ttft-slo-s must be > 0, got {self.ttft_slo_s}")
        if not self.prefill_ms_per_token >= 0:
            raise ValueError(f"--mnemosyne-prefill-ms-per-token must be >= 0, got "
                             f"{self.prefill_ms_per_token}")

    @property
    def overdue_s(self) -> float:
        return OVERDUE_SLOS * self.ttft_slo_s


class MnemosynePolicy:
    """`remaining_s(req)`: predicted seconds to compute the prompt tokens `req` still
    needs (a step-time model's); None uses the allowance per token."""

    def __init__(self, config: MnemosyneConfig,
                 remaining_s: Callable[[ReqState], float] | None = None) -> None:
        self.config = config
        self._remaining = remaining_s

    def deadline(self, req: ReqState) -> float:
        c = self.config
        return req.arrival + c.ttft_slo_s + req.num_prompt_tokens * c.prefill_ms_per_token / 1e3

    def remaining_s(self, req: ReqState) -> float:
        left = max(0, req.num_prompt_tokens - req.num_computed)
        if left == 0:
            return 0.0
        if self._remaining is not None:
            return self._remaining(req)
        return left * self.config.prefill_ms_per_token / 1e3

    def slack(self, req: ReqState, now: float) -> float:
        return self.deadline(req) - now - self.remaining_s(req)

    def order_key(self, req: ReqState, now: float) -> tuple:
        """Decodes first (arrival order); then overdue prefills in arrival order; then
        the rest by least slack, ties by arrival."""
        if req.is_decode:
            return (0, req.arrival, 0.0, req.req_id)
        if now - self.deadline(req) > self.config.overdue_s:
            return (1, req.arrival, 0.0, req.req_id)
        return (2, self.slack(req, now), req.arrival, req.req_id)

    def order(self, reqs: Iterable[ReqState], now: float) -> list[ReqState]:
        return sorted(reqs, key=lambda r: self.order_key(r, now))

    def missed_first_token(self, req: ReqState, first_token_at: float) -> bool:
        return first_token_at > self.deadline(req)

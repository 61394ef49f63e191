"""Deadline-aware prefill order on Sarathi's stall-free steps (Mnemosyne's scheduler).

Every request has a first-token deadline, Metron's: arrival + TTFT SLO + an allowance
per prompt token (so a long document is owed its first token later than a chat turn).
Every step still serves every running decode first (Sarathi's stall-free rule); the
rest of the token budget goes to prefills, partial and new alike, earliest deadline
first, ties in arrival order. Under first come first served a short prompt queued
behind long documents waits for all of them; here it goes first whenever its deadline
is nearer than theirs.

Why deadlines and not least slack. Slack is the deadline less now less the predicted
time of the prompt tokens still to compute. On one stream of steps both orders meet
every deadline whenever any order can, but a prompt's slack grows as its chunks are
computed, so two prompts of equal slack take turns chunk by chunk and both first
tokens come late; a deadline never moves, so the earliest one is served to its end.
EDF needs no prediction either. Slack is still what the operator watches: the step
records and /metrics carry the least slack among each step's prefills (negative:
already too late), predicted by the step-time model when one is given, else by the
allowance per token.

No request starves, by construction: a request is overtaken only by requests with an
earlier deadline, that is, ones that arrive before its own deadline less the TTFT SLO,
so at most a bounded window of arrivals ever goes ahead of it. With equal deadline
offsets (no allowance) the order is first come first served. Preemption takes victims
from the end of the same order: the latest-deadline partial prefill first.
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


class MnemosynePolicy:
    """`remaining_s(req)`: predicted seconds to compute the prompt tokens `req` still
    needs (a step-time model's); None predicts the allowance per token."""

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

    def order_key(self, req: ReqState) -> tuple:
        """Decodes first, in arrival order; then prefills, earliest deadline first,
        ties in arrival order. The key never changes while a request waits."""
        if req.is_decode:
            return (0, req.arrival, req.req_id)
        return (1, self.deadline(req), req.arrival, req.req_id)

    def order(self, reqs: Iterable[ReqState]) -> list[ReqState]:
        return sorted(reqs, key=self.order_key)

    def overtaken_by(self, req: ReqState) -> float:
        """The latest arrival time that can still go ahead of `req` (the starvation
        bound): an arrival after it has a later deadline."""
        return self.deadline(req) - self.config.ttft_slo_s

    def missed_first_token(self, req: ReqState, first_token_at: float) -> bool:
        return first_token_at > self.deadline(req)

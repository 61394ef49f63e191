"""Deadline-aware prefill order on Sarathi's stall-free steps (Mnemosyne's scheduler).

Every request has a first-token deadline, Metron's: arrival + TTFT SLO + an allowance
per prompt token (so a long document is owed its first token later than a chat turn);
the TTFT SLO is the request's own where it states one (`vllm_ext.schedulers.slo`: its
values, or its class's), else the server's. Its slack is the deadline less now less the
predicted time of the prompt tokens still to compute (from the step-time model when one
is given, else the allowance per token).
Every step still serves every running decode first (Sarathi's stall-free rule); the
rest of the token budget goes to prefills, partial and new alike, in this order:

1. overdue requests: past their deadline by more than the starvation bound
   (`--mnemosyne-starvation-s`, default 8 TTFT SLOs), in arrival order;
2. requests that can still meet their deadline (slack >= 0), earliest deadline first;
3. requests that cannot (slack < 0), least predicted remaining prefill first.

Under first come first served a short prompt queued behind long documents waits for
all of them and misses its deadline; here it goes first whenever its deadline is nearer,
and a document already too late to be on time yields to requests that still can be.

Why earliest deadline among those that can be on time, not least slack: on one stream
of steps both meet every deadline whenever any order can, but a prompt's slack grows
as its chunks are computed, so two prompts of equal slack take turns chunk by chunk and
both first tokens come late; a deadline never moves, so the earliest is served to its
end. Why shortest first among the late: each is late already, and Metron counts a late
first token's misses by how late it is; serving the shortest first adds the least
lateness to the others (it minimises their summed lateness, as shortest-processing-time
minimises summed completion time). Slack decides only which group a request is in; a
request leaves group 2 for 3 when it falls behind, and 3 for 1 when it is overdue, and
does not come back, so the order does not flap.

No request starves: a late request is passed over only until it is overdue; from then on
only overdue requests that arrived before it go first. With per-request SLOs a decode of a
looser class may also give its slot to a stricter class's prefill that is due, within
its own next-token deadline and a bound of steps (`vllm_ext.schedulers.decode_deadlines`). When every deadline can still be
met and all deadlines are arrival + the same offset (no allowance), the order is first
come first served. Preemption takes victims from the end of the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vllm_ext.schedulers.request import ReqState
from vllm_ext.schedulers.slo import SLO, request_slo

# Defaults, stated: a chat first token within 2 s of arrival (Metron's interactive
# SLO scale), plus 1 ms per prompt token, roughly a 7B model's prefill rate on one
# GPU, so that long documents get proportionally later deadlines.
DEFAULT_TTFT_SLO_S = 2.0
DEFAULT_PREFILL_MS_PER_TOKEN = 1.0
# Past its deadline by this many TTFT SLOs (unless --mnemosyne-starvation-s says), a
# request is served before all that are not: long enough for the shortest-first order
# among late requests to work through a burst, short enough that a document passed
# over waits a bounded, stated time.
OVERDUE_SLOS = 8.0
# A decode of a looser class gives its slot to a stricter class's prefill for at most
# this many steps in a row (each within its own TBT deadline): its reader sees at most
# one gap of this many steps, however long its slack.
DEFAULT_MAX_DEFER_STEPS = 8


@dataclass(frozen=True, slots=True)
class MnemosyneConfig:
    """The deadlines; the steps' budget, KV admission and chunking are Sarathi's config."""

    ttft_slo_s: float = DEFAULT_TTFT_SLO_S
    prefill_ms_per_token: float = DEFAULT_PREFILL_MS_PER_TOKEN
    starvation_s: float | None = None  # None: OVERDUE_SLOS x each request's TTFT SLO
    # Each later token's deadline for requests that set none (None: no TBT deadline).
    tbt_slo_s: float | None = None
    # The operator's named classes (--mnemosyne-slo-class), in the order given.
    classes: tuple[tuple[str, SLO], ...] = ()
    max_defer_steps: int = DEFAULT_MAX_DEFER_STEPS

    def __post_init__(self) -> None:
        if not self.max_defer_steps >= 0:
            raise ValueError(f"--mnemosyne-max-defer-steps must be >= 0, got "
                             f"{self.max_defer_steps}")
        if self.starvation_s is not None and not self.starvation_s >= 0:
            raise ValueError(f"--mnemosyne-starvation-s must be >= 0, got {self.starvation_s}")
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
        self._classes = dict(config.classes)

    def request_slo(self, extra_args) -> tuple[str, SLO]:
        """The class a request is counted under and its deadlines, the server's defaults
        where it set none (raises SLOError naming a bad field)."""
        c = self.config
        name, own = request_slo(extra_args, self._classes)
        return name, own.over(SLO(c.ttft_slo_s, c.tbt_slo_s))

    def ttft_slo_s(self, req: ReqState) -> float:
        slo = req.slo
        return self.config.ttft_slo_s if slo is None or slo.ttft_s is None else slo.ttft_s

    def deadline(self, req: ReqState) -> float:
        c = self.config
        return req.arrival + self.ttft_slo_s(req) \
            + req.num_prompt_tokens * c.prefill_ms_per_token / 1e3

    def overdue_s(self, req: ReqState) -> float:
        """How far past its deadline `req` may be passed over (the starvation bound): the
        operator's, else OVERDUE_SLOS of the request's own TTFT SLO."""
        starvation = self.config.starvation_s
        return OVERDUE_SLOS * self.ttft_slo_s(req) if starvation is None else starvation

    def remaining_s(self, req: ReqState) -> float:
        left = max(0, req.num_prompt_tokens - req.num_computed)
        if left == 0:
            return 0.0
        if self._remaining is not None:
            return self._remaining(req)
        return left * self.config.prefill_ms_per_token / 1e3

    def slack(self, req: ReqState, now: float) -> float:
        return self.deadline(req) - now - self.remaining_s(req)

    def overdue(self, req: ReqState, now: float) -> bool:
        return now - self.deadline(req) > self.overdue_s(req)

    def order_key(self, req: ReqState, now: float) -> tuple:
        """Decodes first, in arrival order; then prefills by group (module docstring),
        overdue ones in arrival order, the others earliest deadline first."""
        return self.order_key_until(req, now)[0]

    def order_key_until(self, req: ReqState, now: float) -> tuple[tuple, float]:
        """`order_key`, and the time until which it holds if the request does not
        progress (up to rounding at that time). A deadline never moves, so a waiting
        request's key changes only twice, when it falls behind (slack < 0) and when it
        becomes overdue: a scheduler can keep keys until then instead of computing a
        long queue's every step."""
        if req.is_decode:
            return (0, req.arrival, 0.0, req.req_id), math.inf
        if self.overdue(req, now):
            return (1, req.arrival, 0.0, req.req_id), math.inf
        deadline, remaining = self.deadline(req), self.remaining_s(req)
        overdue_after = deadline + self.overdue_s(req)
        if deadline - now - remaining >= 0:  # slack >= 0
            return (2, deadline, req.arrival, req.req_id), \
                min(deadline - remaining, overdue_after)
        return (3, remaining, req.arrival, req.req_id), overdue_after

    def order(self, reqs: Iterable[ReqState], now: float) -> list[ReqState]:
        return sorted(reqs, key=lambda r: self.order_key(r, now))

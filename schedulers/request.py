"""The engine-neutral view of one request that the policies reason about."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_ext.schedulers.slo import SLO


@dataclass(frozen=True, slots=True)
class ReqState:
    """A request as a scheduler sees it between steps.

    `num_tokens` counts the prompt plus every token generated so far; the KV of the
    last one is not computed yet, so a decoding request has
    `num_computed == num_tokens - 1`.
    """

    req_id: str
    arrival: float
    num_prompt_tokens: int
    num_tokens: int
    num_computed: int
    # The request's own deadlines (a deadline-aware policy's defaults where None).
    slo: SLO | None = None

    @property
    def is_decode(self) -> bool:
        return is_decode(self.num_prompt_tokens, self.num_tokens, self.num_computed)

    @property
    def tokens_wanted(self) -> int:
        """Tokens this request would compute next step with an unlimited budget."""
        return self.num_tokens - self.num_computed


def is_decode(num_prompt_tokens: int, num_tokens: int, num_computed: int) -> bool:
    """Whether a request's next token is a decode: its prompt is done and only the last
    generated token's KV is missing. A function of plain numbers, so that a scheduler's
    per-step pass over hundreds of requests need not build a ReqState for each."""
    return num_tokens > num_prompt_tokens and num_computed == num_tokens - 1


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)

"""The engine-neutral view of one request that the policies reason about."""

from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def is_decode(self) -> bool:
        return self.num_tokens > self.num_prompt_tokens and self.num_computed == self.num_tokens - 1

    @property
    def tokens_wanted(self) -> int:
        """Tokens this request would compute next step with an unlimited budget."""
        return self.num_tokens - self.num_computed


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)

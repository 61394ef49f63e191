"""Adaptive chunking (Mnemosyne): each step's prefill chunks are the largest the latency
model predicts to fit in the TBT target together with the step's decodes.

Attention makes a chunk's cost grow with the context before it, so a long prompt's
chunks shrink as it progresses and every step stays near the target, instead of a
fixed token budget that is either too small early (slow prefill) or too large late
(TBT spikes). The budget handed to the engine is one token per decode plus the chosen
chunks, never more than the engine's own maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm_ext.schedulers.latency import LatencyModel, StepShape
from vllm_ext.schedulers.request import ReqState


@dataclass(frozen=True, slots=True)
class StepBudget:
    tokens: int  # the engine's token budget for this step
    chunks: tuple[tuple[int, int], ...]  # (tokens, earlier context) planned per prefill
    predicted_s: float  # the model's time for the planned step


class OnlineCorrection:
    """How much longer steps run than the profile predicts, learnt while serving.

    A profile is taken on one load and the engine runs another (other contexts, other
    neighbours on the machine), so a step's measured time drifts from the prediction by
    a few percent either way. The planner divides the target by this factor: an
    exponential average of measured / predicted over recent steps, kept within
    [1/limit, limit] so that one stalled step cannot swing it.
    """

    __slots__ = ("factor", "weight", "limit")

    def __init__(self, weight: float = 0.1, limit: float = 2.0) -> None:
        self.factor, self.weight, self.limit = 1.0, weight, limit

    def observe(self, predicted_s: float, measured_s: float) -> None:
        if predicted_s <= 0 or measured_s <= 0:
            return
        ratio = min(max(measured_s / predicted_s, 1 / self.limit), self.limit)
        self.factor += self.weight * (ratio - self.factor)


@dataclass(frozen=True, slots=True)
class AdaptiveChunking:
    model: LatencyModel
    tbt_slo_s: float
    max_tokens: int  # the engine's max_num_batched_tokens
    step: int = 32  # chunk sizes are multiples of this (kernel-friendly), except a prompt's last

    def plan(self, decodes: Sequence[ReqState], prefills: Sequence[ReqState],
             correction: float = 1.0) -> StepBudget:
        """`prefills` in the order the engine serves them (partial ones first, then waiting);
        `correction`: measured / predicted step time seen so far (OnlineCorrection)."""
        target = self.tbt_slo_s / correction  # in the model's (uncorrected) seconds
        contexts = tuple(d.num_computed + 1 for d in decodes)
        chunks: list[tuple[int, int]] = []
        room = self.max_tokens - len(contexts)
        for req in prefills:
            left = req.num_tokens - req.num_computed
            if room <= 0 or left <= 0:
                break
            if req.is_decode:
                # A preempted request whose KV the prefix cache gives back up to its last
                # token: admitted, it runs (and costs) as a decode.
                contexts += (req.num_computed + 1,)
                room -= 1
                continue
            n = self._chunk(target, req.num_computed, min(left, room), contexts, chunks)
            if n == 0:
                if chunks:
                    break
                n = min(self.step, left, room)  # progress: a prompt never starves
            chunks.append((n, req.num_computed))
            room -= n
            if n < left:  # this prompt takes what fits; later ones wait
                break
        planned = StepShape(tuple(chunks), contexts)
        return StepBudget(max(1, len(contexts) + sum(n for n, _ in chunks)), tuple(chunks),
                          correction * self.model.predict(planned))

    def _chunk(self, target: float, context: int, limit: int, contexts, chunks) -> int:
        fits = lambda n: self.model.predict(  # noqa: E731
            StepShape((*chunks, (n, context)), contexts)) <= target
        if fits(limit):
            return limit  # all that is left (or all that the engine allows)
        return self.model.largest_chunk(target, context, contexts, chunks, self.step, limit)

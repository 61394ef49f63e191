"""A toy iteration-level engine that runs the policies without vLLM.

It follows the rules of vLLM 0.32's scheduling loop that the policies rely on
(see `vllm_ext.scheduling`): running requests take min(wanted, budget left) in
list order; on KV exhaustion the end of the running list is preempted and goes
back to the front of the waiting queue to recompute; waiting requests are then
admitted FCFS while budget, sequence slots and KV blocks allow, and no admission
happens in a step that preempted.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from vllm_ext.schedulers import PrefillFirstPolicy, ReqState, SarathiPolicy
from vllm_ext.schedulers.request import blocks_for


@dataclass
class SimReq:
    req_id: str
    arrival: float
    prompt: int
    output: int
    generated: int = 0
    computed: int = 0
    blocks: int = 0

    @property
    def num_tokens(self) -> int:
        return self.prompt + self.generated

    def state(self) -> ReqState:
        return ReqState(self.req_id, self.arrival, self.prompt, self.num_tokens, self.computed)


@dataclass
class Step:
    scheduled: dict[str, int]
    before: dict[str, ReqState]  # running requests as the step began
    admitted: dict[str, int]  # admitted request -> tokens it wanted
    waiting_before: list[str]
    preempted: list[str]
    budget: int
    # For each preemption: the victim's arrival and the latest arrival left running.
    victims: list[tuple[float, float]] = field(default_factory=list)

    @property
    def running_decodes(self) -> list[str]:
        return [r for r, s in self.before.items() if s.is_decode]


@dataclass
class Sim:
    policy: SarathiPolicy | PrefillFirstPolicy
    budget: int
    num_blocks: int
    block_size: int = 16
    max_seqs: int = 64
    chunked: bool = True
    running: list[SimReq] = field(default_factory=list)
    waiting: collections.deque[SimReq] = field(default_factory=collections.deque)
    finished: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)

    @property
    def free(self) -> int:
        return self.num_blocks - sum(r.blocks for r in self.running)

    def run(self, arrivals: list[tuple[int, SimReq]], max_steps: int = 20_000) -> None:
        pending = collections.deque(sorted(arrivals, key=lambda a: (a[0], a[1].arrival)))
        for t in range(max_steps):
            while pending and pending[0][0] <= t:
                self.waiting.append(pending.popleft()[1])
            if not (pending or self.running or self.waiting):
                return
            self.step()
        raise AssertionError(f"not done after {max_steps} steps: {len(self.finished)} finished")

    def step(self) -> None:
        before = {r.req_id: r.state() for r in self.running}
        waiting_before = [r.req_id for r in self.waiting]
        left = self.budget
        scheduled: dict[str, int] = {}
        preempted: list[str] = []
        victims: list[tuple[float, float]] = []
        skip_decodes = False
        if isinstance(self.policy, SarathiPolicy):
            self.running.sort(key=lambda r: self.policy.order_key(r.state()))
        else:
            head = self.waiting[0] if self.waiting else None
            fits = head is not None and len(self.running) < self.max_seqs and (
                blocks_for(head.num_tokens, self.block_size) <= self.free)
            last_empty = bool(self.steps) and not self.steps[-1].scheduled
            skip_decodes = self.policy.prefill_only(head is not None, fits, last_empty)

        i = 0
        while i < len(self.running) and left > 0:
            req = self.running[i]
            if skip_decodes and req.state().is_decode:
                i += 1
                continue
            n = min(req.num_tokens - req.computed, left)
            need = blocks_for(req.computed + n, self.block_size) - req.blocks
            while need > self.free:
                victim = self.running.pop()
                victims.append((victim.arrival, max((r.arrival for r in self.running),
                                                    default=float("-inf"))))
                self._preempt(victim, scheduled)
                preempted.append(victim.req_id)
                if victim is req:
                    break
            if req.req_id in preempted:
                break
            req.blocks += need
            scheduled[req.req_id] = n
            left -= n
            i += 1

        admitted: dict[str, int] = {}
        while not preempted and left > 0 and self.waiting and len(self.running) < self.max_seqs:
            req = self.waiting[0]
            n = wanted = req.num_tokens - req.computed
            if not self.chunked and n > left:
                break
            n = min(n, left)
            gate = req.num_tokens if getattr(self.policy, "reserve_full_prompt", False) else n
            if blocks_for(gate, self.block_size) > self.free:
                break
            self.waiting.popleft()
            req.blocks = blocks_for(n, self.block_size)
            self.running.append(req)
            scheduled[req.req_id] = n
            admitted[req.req_id] = wanted
            left -= n

        self.steps.append(Step(scheduled, before, admitted, waiting_before, preempted, self.budget,
                               victims))
        for req in list(self.running):
            n = scheduled.get(req.req_id, 0)
            req.computed += n
            if n and req.computed == req.num_tokens:
                req.generated += 1
                if req.generated == req.output:
                    self.running.remove(req)
                    self.finished.append(req.req_id)

    def _preempt(self, victim: SimReq, scheduled: dict[str, int]) -> None:
        scheduled.pop(victim.req_id, None)
        victim.blocks = 0
        victim.computed = 0
        self.waiting.appendleft(victim)

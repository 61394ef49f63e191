"""Each decoding request's next-token deadline, and which decodes may sit a step out.

Stall-free scheduling (Sarathi) gives every running decode a slot in every step. With
per-request SLOs that is more than some readers need: a batch job reading at 2 s a
token is seconds ahead of its deadline while an interactive prompt waits for budget.
Here a decode may give its slot to a prefill when all of these hold:

- the prefill's request has a strictly tighter TBT SLO than the decode's (a stricter
  class). A decode never yields to its own class or a looser one: that would trade one
  reader's stall for another's start, which the stall-free rule refuses. So with uniform
  SLOs nothing is deferred and the steps are Mnemosyne's as before;
- the decode's next token is not due before the step after next (`earliest_due`): served
  next step instead, it still meets its deadline, on the step-time estimate given;
- the prefill's first token is due before that next token (it is the more urgent);
- it has sat out fewer than `max_defer_steps` steps in a row (a bound on any one gap,
  whatever the slack).

Deadlines follow Metron's walk: a request's first token at t, due at D, sets the next
one due at max(t, D) + TBT; a token on time moves the deadline on by TBT (time saved is banked), a late one
restarts it from that token (the bank is empty). Plain data, no engine import: the
scheduler calls `first_token`, `delivered` and `choose` with what vLLM tells it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class _Walk:
    tbt_s: float
    due: float  # when the next token not yet delivered is due
    slo_class: str = ""  # what its tokens are counted under
    deferred: int = 0  # steps in a row this decode has sat out, up to `last_deferred`
    last_deferred: int = -2  # the step it last sat out


class DecodeDeadlines:
    def __init__(self, max_defer_steps: int) -> None:
        self.max_defer_steps = max_defer_steps
        self._walks: dict[str, _Walk] = {}

    def __len__(self) -> int:
        return len(self._walks)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._walks

    def first_token(self, req_id: str, t: float, tbt_s: float | None,
                    deadline: float = -float("inf"), slo_class: str = "") -> None:
        """A request delivered its first token at `t`, due at `deadline`: the next is due a
        TBT after the later of the two (time saved on the first token is banked too);
        without a TBT SLO it is not walked."""
        if tbt_s is not None:
            self._walks[req_id] = _Walk(tbt_s, max(t, deadline) + tbt_s, slo_class)

    def delivered(self, outputs: Iterable[tuple[str, int]], t: float) -> dict[str, list[int]]:
        """A step's new output tokens, (req_id, how many), delivered at `t`: each walked,
        on time or late (several at once: speculative decoding). Returns [on time, late]
        per class. Once per step over the whole batch: one dict lookup per output, and the
        counts summed per class, not per request."""
        walks, per_class = self._walks, {}
        for req_id, n in outputs:
            walk = walks.get(req_id)
            if walk is None or not n:
                continue
            row = per_class.get(walk.slo_class)
            if row is None:
                row = per_class[walk.slo_class] = [0, 0]
            for _ in range(n):
                due = walk.due
                if t <= due:
                    row[0] += 1
                    walk.due = due + walk.tbt_s
                else:
                    row[1] += 1
                    walk.due = t + walk.tbt_s
        return per_class

    def forget(self, req_id: str) -> None:
        self._walks.pop(req_id, None)

    def due(self, req_id: str, ahead: int = 0) -> float | None:
        """When the request's next token to schedule is due: `ahead` tokens already in
        flight (vLLM's async loop) come first, each a TBT apart."""
        walk = self._walks.get(req_id)
        return None if walk is None else walk.due + ahead * walk.tbt_s

    def choose(self, step: int, decodes: Iterable[tuple[str, int]],
               prefill_tbt_s: float | None, prefill_due: float, earliest_due: float,
               want: int) -> list[str]:
        """Up to `want` of `decodes` (req_id, tokens in flight) to sit out step number
        `step` for a prefill whose request has TBT SLO `prefill_tbt_s` and whose first
        token is due at `prefill_due`; each may if its next token is due no earlier than
        `earliest_due` (module docstring). The latest due go first. A run of deferrals is
        of consecutive steps: one served in between ends it."""
        walks, bound = self._walks, self.max_defer_steps
        if want <= 0 or bound == 0 or prefill_tbt_s is None or not walks:
            return []
        picks: list[tuple[float, str]] = []
        for req_id, ahead in decodes:
            walk = walks.get(req_id)
            if walk is None or walk.tbt_s <= prefill_tbt_s or (
                    walk.last_deferred == step - 1 and walk.deferred >= bound):
                continue
            due = walk.due + ahead * walk.tbt_s
            if due >= earliest_due and due > prefill_due:
                picks.append((due, req_id))
        picks.sort(reverse=True)
        chosen = [req_id for _, req_id in picks[:want]]
        for req_id in chosen:
            walk = walks[req_id]
            walk.deferred = walk.deferred + 1 if walk.last_deferred == step - 1 else 1
            walk.last_deferred = step
        return chosen

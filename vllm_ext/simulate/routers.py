"""Which replica of a simulated fleet each request goes to.

A router sees the fleet only through what its real counterpart would see, fed to it
in time order by the fleet's loop (`vllm_ext.simulate.engine`): engines' published
request counts, KV usage read at step boundaries, and requests finishing. Each choice
is made at the request's arrival on the virtual clock.

`vllm-dp` is vLLM's own data-parallel front end, `vllm serve --data-parallel-size N`
with its default internal load balancing, as vLLM 0.32-0.34 code it for a dense
(non-MoE) model:

- Engines publish. Each engine core sends the DP coordinator its (waiting, running,
  KV usage) when its (running, waiting) counts have changed, checked after it takes new
  requests in and again after each step (`vllm/v1/engine/core.py`:
  `EngineCoreProc.run_busy_loop`, `_maybe_publish_request_counts`; the counts are
  `Scheduler.get_request_counts()`, waiting including KV-holding requests, and
  `get_kv_cache_usage()`). A KV change alone sends nothing. Here: the replica's scheduler
  read through those same methods at those two points of every simulated step.
- The coordinator batches. It forwards every engine's latest counts to all front ends
  at most every 100 ms while they change, and every 5 s when nothing has (`vllm/v1/
  engine/coordinator.py`: `DPCoordinatorProc.process_input_socket`,
  `min_stats_update_interval_ms=100`; dense models have no wave coordination, so
  `last_step_counts` stays unused). Here: a publish at max(last publish + 100 ms, first
  change since it), or 5 s after the last one, carrying the counts as of that moment.
- Each API server chooses (`vllm/v1/engine/core_client.py`:
  `DPLBAsyncMPClient.get_core_engine_for_request`). Its view is the last publish,
  overwritten whole by the next; score = max(API servers x its own unfinished requests
  on the engine, waiting + running), plus waiting x 6 x max(0, KV usage - 0.5) when
  anything waits; the lowest score wins, scanned from a start index that begins at
  engines x its index // API servers and moves on by one after every request, so the
  first engine scanned wins a tie. The winner's waiting count is raised by the number of
  API servers until the next publish, and its own unfinished count by one until the
  request's last output is back (`process_engine_outputs`).
- vLLM starts one API server per rank by default for internal balancing
  (`vllm/entrypoints/cli/serve.py`, `--api-server-count`); requests reach them in turn
  here. How the kernel really spreads connections over the processes is not modelled.

Not modelled: the time messages take between processes (ZMQ), the API servers' own
work, MoE wave coordination and prefill throttling, requests pinned to a rank
(`data_parallel_rank`), late-interaction pooling, streaming-input session affinity,
elastic EP, and the external and hybrid balancing modes (use an external policy).

The external routers' policies, each breaking ties in turn, from the replica after the
one chosen last: `round-robin` (by arrival order), `least-outstanding` (fewest requests
sent and not finished, as the router itself counts them, exact) and `least-kv` (lowest
KV cache usage, `vllm:kv_cache_usage_perc`, as of each replica's last step boundary: as
fresh as a scraping router can be; llm-d and the inference gateway read it this way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

ROUTERS = ("vllm-dp", "round-robin", "least-outstanding", "least-kv")

# DPCoordinatorProc's publishing cadence (vllm/v1/engine/coordinator.py).
PUBLISH_INTERVAL_S = 0.1
HEARTBEAT_S = 5.0
# DPLBAsyncMPClient's penalty per waiting request, per unit of KV usage above half.
KV_PENALTY = 6.0


class Router:
    """The base: a policy over `n` replicas; the fleet calls the observers the class
    lists in `observes`, in time order, before each `route` at a later or equal time."""

    observes: frozenset[str] = frozenset()  # of "counts", "kv", "finished"

    def __init__(self, n: int) -> None:
        self.n = n
        self.last = -1  # the replica chosen last: ties go to the next one after it

    def route(self, t: float, req: int) -> int:
        raise NotImplementedError

    def counts(self, t: float, replica: int, waiting: int, running: int, kv: float) -> None:
        """An engine's (waiting, running, KV usage), published because they changed."""

    def kv(self, t: float, replica: int, usage: float) -> None:
        """A replica's KV usage at a step boundary."""

    def finished(self, t: float, replica: int, req: int) -> None:
        """Request `req`'s last token reached the front end."""

    def _lowest(self, scores: Sequence[float]) -> int:
        best, low = 0, math.inf
        for i in range(self.n):
            idx = (self.last + 1 + i) % self.n
            if scores[idx] < low:
                best, low = idx, scores[idx]
        self.last = best
        return best

    def describe(self) -> str:
        raise NotImplementedError


class RoundRobin(Router):
    def route(self, t: float, req: int) -> int:
        self.last = (self.last + 1) % self.n
        return self.last

    def describe(self) -> str:
        return "round-robin: replicas in turn, by arrival order"


class LeastOutstanding(Router):
    observes = frozenset({"finished"})

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.outstanding = [0] * n

    def route(self, t: float, req: int) -> int:
        chosen = self._lowest(self.outstanding)
        self.outstanding[chosen] += 1
        return chosen

    def finished(self, t: float, replica: int, req: int) -> None:
        self.outstanding[replica] -= 1

    def describe(self) -> str:
        return ("least-outstanding: the replica with the fewest requests sent and not "
                "finished, as the router counts them; ties in turn")


class LeastKv(Router):
    observes = frozenset({"kv"})

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.usage = [0.0] * n

    def route(self, t: float, req: int) -> int:
        return self._lowest(self.usage)

    def kv(self, t: float, replica: int, usage: float) -> None:
        self.usage[replica] = usage

    def describe(self) -> str:
        return ("least-kv: the replica with the lowest KV cache usage as of its last step "
                "boundary (vllm:kv_cache_usage_perc, read with no scrape delay); ties in turn")


class _ApiServer:
    """One DPLBAsyncMPClient: its view of the engines and its own request counts."""

    def __init__(self, n: int, index: int, count: int) -> None:
        self.count = count
        self.view: list[list[float]] = [[0, 0, 0.0] for _ in range(n)]
        self.unfinished = [0] * n
        self.start = n * index // count

    def choose(self) -> int:
        n = len(self.view)
        best, low = 0, math.inf
        for i in range(n):
            idx = (self.start + i) % n
            waiting, running, usage = self.view[idx]
            score = max(self.count * self.unfinished[idx], waiting + running)
            if waiting:
                score += waiting * KV_PENALTY * max(0.0, usage - 0.5)
            if score < low:
                best, low = idx, score
        self.view[best][0] += self.count
        self.start = (self.start + 1) % n
        self.unfinished[best] += 1
        return best


class VllmDp(Router):
    """vLLM's internal data-parallel load balancing (see the module's docstring)."""

    observes = frozenset({"counts", "finished"})

    def __init__(self, n: int, api_servers: int | None = None) -> None:
        super().__init__(n)
        self.given = api_servers
        self.api_servers = api_servers or n
        self.engines: list[list[float]] = [[0, 0, 0.0] for _ in range(n)]
        self.servers = [_ApiServer(n, k, self.api_servers) for k in range(self.api_servers)]
        self.published = -math.inf  # the coordinator's last publish
        self.changed: float | None = None  # the first change since
        self.sent = 0
        self.server_of: dict[int, _ApiServer] = {}
        self.publishes = 0
        if n == 1:  # vLLM's front end for one engine (AsyncMPClient) has nothing to balance
            self.observes = frozenset()

    def _publish_until(self, t: float, inclusive: bool) -> None:
        while True:
            if self.changed is not None:
                due = max(self.published + PUBLISH_INTERVAL_S, self.changed)
            elif self.published > -math.inf:
                due = self.published + HEARTBEAT_S
            else:
                return
            if due > t or (due == t and not inclusive):
                return
            for server in self.servers:
                server.view = [list(e) for e in self.engines]
            self.published, self.changed = due, None
            self.publishes += 1

    def counts(self, t: float, replica: int, waiting: int, running: int, kv: float) -> None:
        self._publish_until(t, inclusive=False)
        self.engines[replica] = [waiting, running, kv]
        if self.changed is None:
            self.changed = t

    def finished(self, t: float, replica: int, req: int) -> None:
        self.server_of.pop(req).unfinished[replica] -= 1

    def route(self, t: float, req: int) -> int:
        if self.n == 1:
            return 0
        self._publish_until(t, inclusive=True)
        server = self.servers[self.sent % self.api_servers]
        self.sent += 1
        self.server_of[req] = server
        return server.choose()

    def describe(self) -> str:
        servers = ("one API server per replica (vLLM's default)" if self.given is None else
                   f"{self.given} API server{'s' * (self.given > 1)}")
        return (f"vllm-dp: vLLM's internal data-parallel load balancing, {servers} taking "
                f"requests in turn, each choosing by the DP coordinator's counts (published "
                f"at most every {PUBLISH_INTERVAL_S * 1e3:.0f} ms) and its own unfinished "
                f"requests (vllm/v1/engine/core_client.py: DPLBAsyncMPClient)")


def make_router(name: str, n: int, api_servers: int | None = None) -> Router:
    if name == "vllm-dp":
        return VllmDp(n, api_servers)
    routers = {"round-robin": RoundRobin, "least-outstanding": LeastOutstanding,
               "least-kv": LeastKv}
    if name not in routers:
        raise ValueError(f"router {name!r}: choose from {', '.join(ROUTERS)}")
    return routers[name](n)

"""The report's fleet sections: each replica's share of the work, so that imbalance
shows, and the replicas each arm needs for a target rate. Pieces in the form of the
A/B report's sections (`vllm_ext.ab.report`), which a simulated report appends."""

from __future__ import annotations

from vllm_ext.ab.config import ArmResult
from vllm_ext.ab.report import fmt
from vllm_ext.simulate.replica import ReplicaFigures


def replica_rows(figures: list[ReplicaFigures], duration_s: float) -> list[dict]:
    """Per replica, pooled over seeds; tokens/s over the arm's whole duration (every
    seed's span), so the replicas' rates add up to the arm's."""
    return [{"replica": i, "requests": f.requests, "output_tokens": f.output_tokens,
             "out_tok_per_s": f.output_tokens / duration_s if duration_s else None,
             "steps": f.steps, "busy_steps": f.busy_steps, "busy_s": f.busy_s,
             "mean_step_ms": 1e3 * f.busy_s / f.busy_steps if f.busy_steps else None,
             "busy_share": f.busy_s / duration_s if duration_s else None,
             "max_running": f.max_running}
            for i, f in enumerate(figures)]


def sections(results: list[ArmResult], target=None, gpus_per_replica: int | None = None
             ) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    per_replica = [(r.arm.name, r.summary["replicas"]) for r in results
                   if r.summary and "replicas" in r.summary]
    if per_replica:
        out += [("h2", "Replicas"),
                ("p", "Each replica's share, pooled over seeds: requests routed to it, its "
                      "generated tokens and their rate over the arm's run (the replicas' add "
                      "up to the arm's), the steps that scheduled work (what a served rank's "
                      "vllm_ext_steps counts), their mean time and their share of the run, "
                      "and the most requests it ran at once. Imbalance: the busiest "
                      "replica's requests over the mean, as `bench ab` reports per engine."),
                ("table", (["arm", "replica", "requests", "generated tokens", "output tok/s",
                            "steps", "mean step ms", "busy share", "max running", "imbalance"],
                           [[name, str(row["replica"]), str(row["requests"]),
                             str(row["output_tokens"]), fmt(row["out_tok_per_s"], "{:.1f}"),
                             str(row["busy_steps"]), fmt(row["mean_step_ms"], "{:.1f}"),
                             fmt(row["busy_share"], "{:.0%}"), str(row["max_running"]),
                             _imbalance(rows)]
                            for name, rows in per_replica for row in rows]))]
    planned = [(r.arm.name, r.summary["replicas_for_target"]) for r in results
               if r.summary and "replicas_for_target" in r.summary]
    if planned and target is not None:
        head, rows = target_table(planned, target.qps, gpus_per_replica)
        out += [("h2", f"Replicas for {target.qps:g} QPS"),
                ("p", f"The fewest replicas that carry {target.describe()}. Figures are "
                      f"those of the probe at that count; the count below it was probed "
                      f"and failed, for the reason given. One replica's rate, bisected "
                      f"first, is where the search of counts starts; probes counts both."),
                ("table", (head, rows))]
        odd = [f"{name}: {s} replicas passed, {b} failed" for name, plan in planned
               for s, b in plan["contradictions"]]
        if odd:
            out += [("p", "More replicas did worse on these probes (a router's luck with "
                          "one trace); the answer is still a count that passed with the "
                          "one below it failed:"), ("ul", odd)]
    return out


def _imbalance(rows: list[dict]) -> str:
    loads = [row["requests"] for row in rows]
    mean = sum(loads) / len(loads)
    return fmt(max(loads) / mean if mean else None, "{:.2f}")


def target_table(planned: list[tuple[str, dict]], qps: float,
                 gpus_per_replica: int | None = None) -> tuple[list[str], list[list[str]]]:
    gpus = ["GPUs"] if gpus_per_replica else []
    head = ["arm", "replicas", *gpus, "QPS per replica", "one replica carries", "TTFT P50 s",
            "TTFT P99 s", "TBT P50 ms", "TBT P99 ms", "one fewer", "probes"]
    rows = []
    for name, plan in planned:
        n, one = plan["needed"], plan["one_replica_qps"]
        probes = {p["replicas"]: p for p in plan["probes"]}
        carries = "n/a" if one is None else f"{one:.2f} QPS"
        count = len(plan["rates"]) + len(probes)
        if n is None:
            most = max(probes)
            rows.append([name, f"> {most}", *["n/a"] * len(gpus), "n/a", carries, "n/a", "n/a",
                         "n/a", "n/a", f"{most}: {probes[most]['missed']}", str(count)])
            continue
        p, below = probes[n], probes.get(n - 1)
        rows.append([name, str(n), *([str(n * gpus_per_replica)] if gpus else []),
                     f"{qps / n:.2f}",
                     carries, fmt(p["ttft_p50_s"], "{:.2f}"), fmt(p["ttft_p99_s"], "{:.2f}"),
                     fmt(p["tbt_p50_ms"], "{:.0f}"), fmt(p["tbt_p99_ms"], "{:.0f}"),
                     f"{n - 1}: {below['missed']}" if below else "n/a (1 is the least)",
                     str(count)])
    return head, rows

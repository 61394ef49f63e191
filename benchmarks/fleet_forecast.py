"""Forecast: how many replicas carry a chat workload at 10, 50 and 200 QPS, stock vLLM
against `--scheduler sarathi` and `--scheduler mnemosyne`, with `vllm-ext simulate
--target-qps` on GPU profiles.

    python benchmarks/fleet_forecast.py [--out benchmarks/results] [--work DIR] [--jobs 2]

One `vllm-ext simulate` per profile and rate, run `--jobs` at a time (each is one
process on one core). Replicas sit behind an external router sending each request to
the replica with the fewest in flight (`--router least-outstanding`): at tens of
replicas vLLM's own balancing, one API server per rank, herds (see docs/simulate.md).
The scheduler's host time is left out (`--host-time-scale 0`, about 0.1 ms a step
against steps of 10-50 ms), so that the counts do not move with this machine's load.
Writes OUT/fleet-forecast.md and .json; the reports stay in the work directory.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (GPU, model shape, tensor-parallel size): one replica is tp GPUs.
SETUPS = (("a100", "llama-3-8b", 1), ("h100", "llama-2-70b", 4))
RATES = (10, 50, 200)
ARMS = {"vllm": "--scheduler vllm", "sarathi": "--scheduler sarathi",
        "mnemosyne": "--scheduler mnemosyne"}
# Chat: prompts lognormal around 1024 tokens with a long tail (conversation history),
# replies around 256, both clipped to Llama-2's 4K context; SLOs TTFT P99 2 s and TBT
# P99 100 ms (10 tokens/s, faster than anyone reads), P50 scheduling delay 2 s.
TRAFFIC = ("--prompt-len", "lognormal:1024:0.9", "--max-prompt-tokens", "3000",
           "--output-len", "lognormal:256:0.5", "--max-output-tokens", "1024",
           "--serve-args", "--max-model-len 4096", "--ttft-slo-s", "2", "--tbt-slo-ms", "100")
ROUTER = "least-outstanding"


def command(gpu: str, model: str, tp: int, qps: float, out: Path, per_replica: int) -> list[str]:
    return ["vllm-ext", "simulate", "--gpu", gpu, "--model-shape", model,
            *(["--tp", str(tp)] if tp > 1 else []),
            *(a for name, flags in ARMS.items() for a in ("--arm", f"{name}={flags}")),
            *TRAFFIC, "--router", ROUTER, "--host-time-scale", "0",
            "--target-qps", f"{qps:g}", "--requests-per-replica", str(per_replica),
            "--num-requests", "32", "--bootstrap", "100", "--no-progress", "--out", str(out)]


def run(argv: list[str], log: Path) -> float:
    started = time.monotonic()
    exe = str(Path(sys.executable).with_name("vllm-ext"))
    with open(log, "w") as f:
        code = subprocess.run([exe, *argv[1:]], stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {code}; see {log}")
    return time.monotonic() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--work", default="fleet-forecast-work")
    ap.add_argument("--jobs", type=int, default=2, help="simulations at once (one core each)")
    ap.add_argument("--requests-per-replica", type=int, default=256)
    args = ap.parse_args()

    from vllm_ext.ab.report import machine

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    jobs = {(gpu, model, tp, qps): command(gpu, model, tp, qps, work / f"{gpu}-{model}-{qps}qps",
                                           args.requests_per_replica)
            for gpu, model, tp in SETUPS for qps in RATES}
    started = time.monotonic()
    # The largest first, so that the last to finish is a short one.
    order = sorted(jobs, key=lambda k: -k[3])
    with ThreadPoolExecutor(args.jobs) as pool:
        walls = dict(zip(order, pool.map(
            lambda k: run(jobs[k], work / f"{k[0]}-{k[1]}-{k[3]}qps.log"), order)))
    total = time.monotonic() - started

    results = []
    for key, argv in jobs.items():
        gpu, model, tp, qps = key
        report = json.loads((Path(argv[-1]) / "report.json").read_text())
        for arm in report["arms"]:
            plan = arm["summary"]["replicas_for_target"]
            n = plan["needed"]
            at = next((p for p in plan["probes"] if p["replicas"] == n), None)
            results.append({"gpu": gpu, "model": model, "tp": tp, "qps": qps, "arm": arm["name"],
                            "replicas": n, "gpus": n * tp if n else None,
                            "most_probed": max(p["replicas"] for p in plan["probes"]),
                            "one_replica_qps": plan["one_replica_qps"],
                            "at_count": at, "contradictions": plan["contradictions"],
                            "probes": len(plan["rates"]) + len(plan["probes"]),
                            "wall_s": walls[key]})
    text = markdown(results, jobs, walls, total, args.requests_per_replica, machine())
    out = Path(args.out)
    (out / "fleet-forecast.md").write_text(text)
    (out / "fleet-forecast.json").write_text(json.dumps(
        {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "total_wall_s": total,
         "requests_per_replica": args.requests_per_replica, "jobs": args.jobs,
         "commands": [shlex.join(a) for a in jobs.values()], "results": results}, indent=1))
    print(text)
    return 0


def _cell(r: dict) -> str:
    if r["replicas"] is None:
        return f"> {r['most_probed']}"
    return f"{r['replicas']}" + (f" ({r['gpus']} GPUs)" if r["tp"] > 1 else "")


def markdown(results: list[dict], jobs: dict, walls: dict, total: float, per_replica: int,
             machine: str) -> str:
    by = {(r["gpu"], r["model"], r["qps"], r["arm"]): r for r in results}
    setups = [f"{g.upper()}{f' x{tp} (TP {tp})' if tp > 1 else ''}, {m}" for g, m, tp in SETUPS]
    head = ["QPS", *(f"{s}: {a}" for s in setups for a in ARMS)]
    rows = [[f"{q:g}", *(_cell(by[(g, m, q, a)]) for g, m, _ in SETUPS for a in ARMS)]
            for q in RATES]
    detail = [["setup", "QPS", "arm", "replicas", "one replica carries", "TTFT P50 / P99 s",
               "TBT P50 / P99 ms", "probes", "minutes"]]
    for r in results:
        p = r["at_count"]
        detail.append([f"{r['gpu'].upper()} {r['model']}", f"{r['qps']:g}", r["arm"], _cell(r),
                       "n/a" if r["one_replica_qps"] is None else f"{r['one_replica_qps']:.2f}",
                       f"{p['ttft_p50_s']:.2f} / {p['ttft_p99_s']:.2f}" if p else "n/a",
                       f"{p['tbt_p50_ms']:.0f} / {p['tbt_p99_ms']:.0f}" if p else "n/a",
                       str(r["probes"]), f"{r['wall_s'] / 60:.1f} (the whole command)"])
    odd = [f"{r['gpu']} {r['model']} {r['qps']:g} QPS {r['arm']}: {r['contradictions']}"
           for r in results if r["contradictions"]]

    def table(head, rows):
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                          *("| " + " | ".join(row) + " |" for row in rows)])

    return (f"# Forecast: replicas for a chat workload\n\n"
            f"SIMULATED, not measured: `vllm-ext simulate --target-qps` on Vidur's GPU "
            f"profiles with the stated attention model (every assumption is in each "
            f"report's summary.md). {time.strftime('%Y-%m-%d')}; simulated on {machine}; "
            f"{total / 60:.0f} min for everything below.\n\n"
            f"Traffic: Poisson arrivals; prompts lognormal around 1024 tokens (sigma 0.9, at "
            f"most 3000), replies lognormal around 256 (sigma 0.5, at most 1024), a 4K "
            f"context. A count carries the rate when every request completes with TTFT P99 "
            f"<= 2 s, TBT P99 <= 100 ms and P50 scheduling delay <= 2 s, on a probe of "
            f"{per_replica} requests per replica. An external router sends each request "
            f"to the replica with the fewest in flight (`--router {ROUTER}`); the "
            f"scheduler's host time is left out (`--host-time-scale 0`). Arms: "
            f"`{ARMS['vllm']}` (stock "
            f"vLLM: a 2048-token budget on the A100, 8192 on the H100), `{ARMS['sarathi']}` "
            f"(512) and `{ARMS['mnemosyne']}` (Sarathi's steps, prefills ordered by "
            f"deadline: 2 s + 1 ms per prompt token, its defaults).\n\n"
            f"Replicas needed (> N: N replicas did not carry it, the search's bound):\n\n"
            + table(head, rows) + "\n\n" + table(detail[0], detail[1:]) + "\n\n"
            + ("More replicas did worse on some probes: " + "; ".join(odd) + "\n\n" if odd else
               "No probe had more replicas doing worse than fewer.\n\n")
            + "Commands (each writes a full report):\n\n"
            + "\n".join(f"    {shlex.join(a)}" for a in jobs.values()) + "\n")


if __name__ == "__main__":
    sys.exit(main())

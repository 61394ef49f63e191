"""Fidelity of `vllm-ext simulate` on this machine: the same arms on the same traces,
measured (`vllm-ext bench ab`, real `vllm serve` processes) and simulated (`vllm-ext
simulate --latency-model`, from `vllm-ext profile` of the same model), in one run.

    python benchmarks/simulate_fidelity.py [--out benchmarks/results] [--work DIR]

Workloads: the README demo's traffic (two seeds) and the scheduler benchmark's
(benchmarks/schedulers.py: 16 long decodes while five ~1K-token prompts arrive), each
through stock vLLM, prefill-first and Sarathi; and `budget256`, 40 chat-sized requests at
1 QPS through Sarathi and stock vLLM at the same 256-token budget, with vLLM's own class
unwrapped (no vllm-ext flag), wrapped (`--scheduler vllm`), and Sarathi run twice, first
and last, so that a drift of the machine shows as a gap between the two; and `dp2`, a
fleet: the same traffic at twice the rate into `vllm serve --data-parallel-size 2` (vLLM's
own load balancer, each rank on a core of its own), stock and Sarathi at budget 256,
against `simulate --replicas 2 --router vllm-dp` from a profile taken as the ranks run,
two at once on the two cores (issue 25's check: P50s and tok/s within 15%). Writes
OUT/simulate-fidelity-cpu.md (OUT/simulate-fleet-fidelity-cpu.md for `--workloads dp2`
alone); the reports it compares stay in the work directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SLOS = ("--ttft-slo-s", "5", "--tbt-slo-ms", "1000")
# Issue 22's case: Sarathi and stock vLLM making the same decisions at one budget.
BUDGET_ARMS = {"sarathi": "--scheduler sarathi --sarathi-token-budget 256",
               "stock": "--max-num-batched-tokens 256",
               "vllm": "--scheduler vllm --max-num-batched-tokens 256",
               "sarathi-again": "--scheduler sarathi --sarathi-token-budget 256"}
BUDGET_TRAFFIC = ("--num-requests", "40", "--qps", "1", "--prompt-len", "lognormal:330:0.6",
                  "--max-prompt-tokens", "1800", "--output-len", "uniform:24:96", *SLOS)
# A fleet of two: each rank gets budget256's load.
DP_ARMS = {"stock": "--scheduler vllm --max-num-batched-tokens 256",
           "sarathi": "--scheduler sarathi --sarathi-token-budget 256"}
DP_TRAFFIC = ("--num-requests", "80", "--qps", "2", *BUDGET_TRAFFIC[4:])
DP_SERVED = "--data-parallel-size 2"
DP_SIMULATED = ("--replicas", "2", "--router", "vllm-dp")
# One core per rank, as vLLM binds the ranks of one machine (`rank|rank`); the profile's
# single engine runs on one core too (vLLM's automatic binding keeps the other for the
# front end).
DP_BIND = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
DP_TARGETS = (("ttft_p50_s", "TTFT P50", 0.15), ("tbt_p50_ms", "TBT P50", 0.15),
              ("out_tok_per_s", "output tok/s", 0.15))


def scheduler_trace(path: Path) -> Path:
    from schedulers import workload

    rows = ["arrival,prompt_tokens,output_tokens"]
    rows += [f"{r.arrival},{r.prompt_len},{r.max_tokens}" for r in workload()]
    path.write_text("\n".join(rows) + "\n")
    return path


def shown(argv: list[str], env: dict[str, str] | None = None) -> str:
    """`argv` as the `vllm-ext` command line it stands for (its environment first),
    printed as it starts, and returned for the results' list of commands."""
    command = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items()) \
        + "vllm-ext " + shlex.join(argv)
    print("$ " + command, flush=True)
    return command


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--work", default="fidelity-work")
    ap.add_argument("--workloads", nargs="+", default=["demo", "schedulers", "budget256"],
                    choices=["demo", "schedulers", "budget256", "dp2"])
    ap.add_argument("--reuse", action="store_true",
                    help="compare the reports already in the work directory, running nothing")
    args = ap.parse_args()

    from vllm_ext.ab.report import machine
    from vllm_ext.tools.cli import main as cli
    from vllm_ext.tools.demo import ARMS, TRAFFIC
    from vllm_ext.tools.models import make_model
    from vllm_ext.tools.serve import CPU_SERVE_ARGS, CPU_SERVE_ENV
    from vllm_ext.simulate.fidelity import TARGETS, compare, markdown, where_time_goes

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = str(make_model(Path("models") / "small", preset="small"))
    serve = shlex.join([*CPU_SERVE_ARGS, "--max-model-len", "4096"])
    arms = [a for name, flags in ARMS.items() for a in ("--arm", f"{name}={flags}")]
    started = time.monotonic()
    # The profile an operator would take once, of the engine as it serves: budget 2048 for
    # the first two workloads' arms, 256 for the others. dp2's ranks share this machine's
    # two cores, each rank's steps slowed by the other's (and by both engine loops, which
    # spin while they wait): its profile is taken as it serves too, two profiles at once,
    # one per core, rank 0's used. On GPUs, a device per rank, a lone engine's is a rank's.
    profile_of = {"demo": "2048", "schedulers": "2048", "budget256": "256", "dp2": "256-dp2"}
    profiles, sections, commands = {}, [], []
    for key in sorted({profile_of[name] for name in args.workloads}):
        budget, _, colocated = key.partition("-")
        profiles[key] = latency = work / f"latency-small-{key}.json"
        if latency.exists():
            continue
        profile = ["profile", model, "--dtype", "float32", "--max-model-len", "4096",
                   "--budget", budget]
        if not colocated:
            commands.append(shown([*profile, "--out", str(latency)]))
            if cli([*profile, "--out", str(latency)]):
                return 1
            continue
        ranks = []
        for k in range(2):
            argv = [*profile, "--out", str(work / f"latency-small-{key}-rank{k}.json")]
            commands.append(shown(argv, {"VLLM_CPU_OMP_THREADS_BIND": str(k)}) + " &")
            ranks.append(subprocess.Popen([sys.executable, "-m", "vllm_ext", *argv],
                                          env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(k)}))
        if any([rank.wait() for rank in ranks]):  # every rank waited for, failed or not
            return 1
        shutil.copyfile(work / f"latency-small-{key}-rank0.json", latency)
    traffic = {"demo": [*TRAFFIC],
               "schedulers": ["--trace-csv", str(scheduler_trace(work / "schedulers.csv")),
                              *SLOS],
               "budget256": [*BUDGET_TRAFFIC], "dp2": [*DP_TRAFFIC]}
    arms_of = {"budget256": [a for name, flags in BUDGET_ARMS.items()
                             for a in ("--arm", f"{name}={flags}")],
               "dp2": [a for name, flags in DP_ARMS.items() for a in ("--arm", f"{name}={flags}")]}
    served_arms = {"dp2": [a for name, flags in DP_ARMS.items()
                           for a in ("--arm", f"{name}={flags} {DP_SERVED}")]}
    for name in args.workloads:
        common = ["--model", model, "--serve-args", serve, *traffic[name]]
        measured = ["bench", "ab", *common, *served_arms.get(name, arms_of.get(name, arms)),
                    "--no-equivalence", "--out", str(work / name / "measured")]
        simulated = ["simulate", *common, *arms_of.get(name, arms),
                     *(DP_SIMULATED if name == "dp2" else ()),
                     "--latency-model", str(profiles[profile_of[name]]), "--kv-memory",
                     CPU_SERVE_ENV["VLLM_CPU_KVCACHE_SPACE"], "--out", str(work / name / "simulated")]
        for argv, env in ((measured, DP_BIND if name == "dp2" else {}), (simulated, {})):
            commands.append(shown(argv, env))
            if not args.reuse:
                # The servers bench ab starts inherit it; restored afterwards.
                with mock.patch.dict(os.environ, env):
                    cli(argv)
        real = json.loads((work / name / "measured" / "report.json").read_text())
        sim = json.loads((work / name / "simulated" / "report.json").read_text())
        checks, order = compare(real, sim, DP_TARGETS if name == "dp2" else TARGETS)
        sections.append(markdown(f"{name}: {real['traces'][0]}", checks, order,
                                 where_time_goes(real, sim)))
        print(sections[-1], flush=True)
    fits = {b: json.loads(p.read_text())["fit"] for b, p in profiles.items()}
    text = (f"# `vllm-ext simulate` against `vllm-ext bench ab` on this machine\n\n"
            f"{time.strftime('%Y-%m-%d')}; {machine()}; small synthetic model, float32, eager. "
            f"One run of `python benchmarks/simulate_fidelity.py`"
            + ("" if args.reuse else f" ({(time.monotonic() - started) / 60:.0f} min)") + ".\n\n"
            "Step-time models: `vllm-ext profile` of the same model, "
            + "; ".join(f"budget {k.replace('-dp2', ' (two at once, one per core)')} for the "
                        f"workloads served at it ({f['steps']} steps; mean error "
                        f"{100 * f['holdout_mean_rel_error']:.1f}% on {f['holdout_points']} "
                        f"held-out steps)" for k, f in fits.items())
            + ".\n\n"
            "Targets: TTFT P50, TBT P50 and output tokens/s within 10%, TBT P99 within 20%, "
            "the arms in the same order (every pair of arms whose measured values differ by "
            "more than the target is ordered the same way by the simulation; closer pairs are "
            "ties); dp2 (a fleet of two): TTFT P50, TBT P50 and output tokens/s within 15%. "
            "Errors are (simulated - measured) / measured.\n\n"
            + "\n".join(sections)
            + "\nCommands:\n\n" + "\n".join(f"    {c}" for c in commands) + "\n")
    out = Path(args.out) / ("simulate-fleet-fidelity-cpu.md" if args.workloads == ["dp2"]
                            else "simulate-fidelity-cpu.md")
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

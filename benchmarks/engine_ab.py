"""What the engine A/B benchmarks share: their flags, one `vllm-ext bench ab` run of their
arms on the small model (or `vllm-ext simulate` of it, to plan a run), timed, and their
results written as Markdown, JSON and a plot.

Used by benchmarks/deadlines.py and benchmarks/slo_classes.py; each says its traffic and
arms and reads its own figures from the report.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parser(doc: str, work: str, qps: float, requests: int) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--work", default=work)
    ap.add_argument("--qps", type=float, default=qps)
    ap.add_argument("--requests", type=int, default=requests)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--latency-model", help="simulate the arms with this step-time model "
                    "(`vllm-ext profile`) instead of running them")
    ap.add_argument("--reuse", action="store_true", help="analyse the report in the work "
                    "directory, running nothing")
    return ap


def run(args: argparse.Namespace, traffic: Callable[[str, Path], Sequence[str]],
        arms: dict[str, str]) -> tuple[Path, float, str] | None:
    """The arms on `traffic(model, work)`'s trace flags, measured (or simulated with
    `--latency-model`): the report directory, the minutes the run took, and the command;
    None if it failed."""
    from vllm_ext.tools.cli import main as cli
    from vllm_ext.tools.models import make_model
    from vllm_ext.tools.serve import CPU_SERVE_ARGS, CPU_SERVE_ENV

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = str(make_model(Path("models") / "small", preset="small"))
    report = work / ("simulated" if args.latency_model else "measured")
    argv = ["--model", model, *traffic(model, work),
            *(a for n, flags in arms.items() for a in ("--arm", f"{n}={flags}")),
            "--out", str(report)]
    if args.latency_model:
        argv = ["simulate", *argv, "--latency-model", args.latency_model,
                "--kv-memory", CPU_SERVE_ENV["VLLM_CPU_KVCACHE_SPACE"]]
    else:
        argv = ["bench", "ab", *argv, "--no-equivalence",
                "--serve-args", shlex.join([*CPU_SERVE_ARGS, "--max-model-len", "4096"])]
    timing = work / f"{report.name}-minutes.txt"
    if not args.reuse:
        print("$ vllm-ext " + shlex.join(argv), flush=True)
        started = time.monotonic()
        if cli(argv):
            return None
        timing.write_text(f"{(time.monotonic() - started) / 60:.1f}")
    return report, float(timing.read_text()), "vllm-ext " + shlex.join(argv)


def command(script: str, args: argparse.Namespace, defaults: dict) -> str:
    """How the benchmark was invoked, naming only what differs from its defaults."""
    return f"python benchmarks/{script}" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (
            ("qps", args.qps), ("requests", args.requests),
            ("latency_model", args.latency_model))
        if v is not None and v != defaults.get(k))


def main(args: argparse.Namespace, traffic: Callable[[str, Path], Sequence[str]],
         arms: dict[str, str], *, script: str, stem: str, defaults: dict,
         analyse: Callable[[Path, int], dict], markdown: Callable[[dict, str, float, bool], str],
         plot: Callable[[dict, Path], None]) -> int:
    """Run (or simulate, or with --reuse only read) the arms, analyse the report and write
    OUT/<stem>-cpu.{md,json,png} (<stem>-simulated-cpu when simulated)."""
    ran = run(args, traffic, arms)
    if ran is None:
        return 1
    report, minutes, argv = ran
    result = analyse(report, args.bootstrap)
    result["command"] = argv
    simulated = args.latency_model is not None
    text = markdown(result, command(script, args, defaults), minutes, simulated)
    write(args.out, f"{stem}-simulated-cpu" if simulated else f"{stem}-cpu", text, result, plot)
    return 0


def write(out: str | Path, stem: str, text: str, result: dict,
          plot: Callable[[dict, Path], None]) -> None:
    print(text)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"{stem}.png")
    print(f"wrote {out / stem}.md, .json, .png")

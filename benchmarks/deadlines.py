"""Deadline order against first come first served, on the real engine, side by side in
one run: stock vLLM with the same token budget, `--scheduler sarathi` and
`--scheduler mnemosyne`, on a mixed trace near capacity (short chat prompts and long
documents, Poisson arrivals), through `vllm-ext bench ab` (real `vllm serve`
processes, one at a time, a real OpenAI client).

    python benchmarks/deadlines.py [--out benchmarks/results] [--work DIR] [--qps Q]
    python benchmarks/deadlines.py --latency-model FILE   # the same, simulated (to plan)

Every request's first token is due at Metron's deadline: arrival + TTFT SLO + an
allowance per prompt token; each later token a TBT SLO after the previous. Mnemosyne
is given the same deadlines as the measurement. Figures per arm, each against the stock
arm with a 95% paired-bootstrap interval on the ratio: Metron's deadline-miss rate,
short-prompt TTFT P50, long-prompt TTFT P99, output tokens/s, requests unfinished.
Writes OUT/deadlines-cpu.md, .json and .png; the `bench ab` report stays in the work
directory.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import engine_ab

from vllm_ext.ab.metron import Timeline

# Deadlines (Metron's): first token due TTFT slack + predicted prefill time. The
# prediction is this machine's: `vllm-ext profile` of the small model at a 256-token
# budget puts a 2K-token prompt alone at about 3.0 s (1.5 ms per token, attention
# included) and a 150-token one at 0.18 s (1.2 ms). The TBT deadline is above the
# longest stall-free step (a 256-token chunk at 2K context, about 0.5 s).
TTFT_SLO_S, PREFILL_MS_PER_TOKEN, TBT_SLO_MS = 1.0, 1.5, 500.0
BUDGET = 256  # vllm-ext's CPU default for Sarathi's budget, given to stock too
ARMS = {
    "stock-256": f"--max-num-batched-tokens {BUDGET}",
    "sarathi": "--scheduler sarathi",
    "mnemosyne": (f"--scheduler mnemosyne --mnemosyne-ttft-slo-s {TTFT_SLO_S:g} "
                  f"--mnemosyne-prefill-ms-per-token {PREFILL_MS_PER_TOKEN:g}"),
}
BASE = "stock-256"
# The traffic: chat turns, and one in five a long document.
LONG_SHARE = 0.2
SHORT_PROMPT, SHORT_OUTPUT = (32, 256), (32, 128)
LONG_PROMPT, LONG_OUTPUT = (1536, 2560), (16, 48)
LONG_FROM = 1024  # prompt tokens that make a request a "document" in the figures
QPS, REQUESTS = 0.75, 200

TARGETS = {  # figure -> (bound on mnemosyne / stock, at most?)
    "deadline_miss_rate": (0.5, True),
    "short_ttft_p50_s": (0.5, True),
    "long_ttft_p99_s": (1.5, True),
    "out_tok_per_s": (0.95, False),
}


def write_trace(path: Path, qps: float, n: int, seed: int) -> Path:
    """`arrival,prompt_tokens,output_tokens` rows: Poisson arrivals, mixed lengths."""
    rng = random.Random(seed)
    rows, t = ["arrival,prompt_tokens,output_tokens"], 0.0
    for _ in range(n):
        t += rng.expovariate(qps)
        prompt, output = (LONG_PROMPT, LONG_OUTPUT) if rng.random() < LONG_SHARE \
            else (SHORT_PROMPT, SHORT_OUTPUT)
        rows.append(f"{t:.4f},{rng.randint(*prompt)},{rng.randint(*output)}")
    path.write_text("\n".join(rows) + "\n")
    return path


class Request(NamedTuple):
    """What the figures read of one request record; its timeline built once, not on
    every bootstrap resample."""

    prompt_tokens: int
    timeline: Timeline
    completed: bool


# Figures of one arm's requests (`Request`s), as functions
# of any resample of them: key -> (label, function).
def _ttfts(records, keep: Callable[[int], bool]) -> list[float]:
    return [r.timeline.ttft for r in records
            if keep(r.prompt_tokens) and r.timeline.ttft is not None]


def _pct(values: Sequence[float], q: float) -> float:
    from vllm_ext.ab.metron import percentile

    return float(percentile(values, q)) if values else math.nan


def _misses(records, keep: Callable[[int], bool] = lambda p: True) -> tuple[int, int]:
    """Metron's (missed, total) token deadlines over the records whose prompt `keep`s."""
    from vllm_ext.ab.metron import deadline_misses

    missed = total = 0
    for r in records:
        if keep(r.prompt_tokens):
            m, t = deadline_misses(r.timeline, _first_deadline(r.prompt_tokens),
                                   TBT_SLO_MS / 1e3)
            missed, total = missed + m, total + t
    return missed, total


def _miss_rate(records) -> float:
    missed, total = _misses(records)
    return missed / total if total else math.nan


def _first_deadline(prompt_tokens: int) -> float:
    return TTFT_SLO_S + prompt_tokens * PREFILL_MS_PER_TOKEN / 1e3


def _late_first(records) -> float:
    late = [r.timeline.ttft is None or r.timeline.ttft > _first_deadline(r.prompt_tokens)
            for r in records]
    return sum(late) / len(late) if late else math.nan


def figures(span_s: float) -> dict[str, tuple[str, Callable]]:
    short, long = (lambda p: p < LONG_FROM), (lambda p: p >= LONG_FROM)
    return {
        "deadline_miss_rate": ("Metron deadline-miss rate", _miss_rate),
        "late_first_tokens": ("first tokens past deadline", _late_first),
        "short_misses": ("missed deadlines, short prompts", lambda rs: _misses(rs, short)[0]),
        "long_misses": ("missed deadlines, long prompts", lambda rs: _misses(rs, long)[0]),
        "short_ttft_p50_s": ("short-prompt TTFT P50 (s)", lambda rs: _pct(_ttfts(rs, short), 50)),
        "short_ttft_p99_s": ("short-prompt TTFT P99 (s)", lambda rs: _pct(_ttfts(rs, short), 99)),
        "long_ttft_p50_s": ("long-prompt TTFT P50 (s)", lambda rs: _pct(_ttfts(rs, long), 50)),
        "long_ttft_p99_s": ("long-prompt TTFT P99 (s)", lambda rs: _pct(_ttfts(rs, long), 99)),
        "tbt_p99_ms": ("TBT P99 (ms)", lambda rs: 1e3 * _pct(
            [g for r in rs for g in r.timeline.gaps], 99)),
        # Over the arm's own span: a resample changes the tokens, not the clock.
        "out_tok_per_s": ("output tokens/s", lambda rs: sum(
            r.timeline.num_tokens for r in rs) / span_s),
    }


def analyse(report_dir: Path, bootstrap: int) -> dict:
    """Every figure of every arm, and each arm's ratio to the base with its interval."""
    from vllm_ext.ab.client import RequestRecord
    from vllm_ext.ab.stats import paired_bootstrap

    report = json.loads((report_dir / "report.json").read_text())
    records, spans = {}, {}
    for arm in report["arms"]:
        runs = [json.loads((report_dir / path).read_text()) for path in arm["raw"]]
        records[arm["name"]] = [
            [Request(r.prompt_tokens, r.timeline(), r.completed)
             for r in map(RequestRecord.from_dict, run["requests"])] for run in runs]
        spans[arm["name"]] = arm["summary"]["duration_s"]
    out = {"machine": report["machine"], "traces": report["traces"], "arms": {}}
    for name, runs in records.items():
        flat = [r for run in runs for r in run]
        figs = figures(spans[name])
        arm = {"unfinished": sum(not r.completed for r in flat), "requests": len(flat),
               "short": sum(r.prompt_tokens < LONG_FROM for r in flat),
               "figures": {k: fn(flat) for k, (_, fn) in figs.items()}, "ratio": {}}
        if name != BASE:
            for key, (_, fn) in figures(1.0).items():
                # Throughput is over each arm's own span; a resample keeps both spans.
                scale = spans[BASE] / spans[name] if key == "out_tok_per_s" else 1.0
                arm["ratio"][key] = paired_bootstrap(
                    records[BASE], runs, fn, iterations=bootstrap,
                    compare=lambda a, b, s=scale: s * a / b if b else math.nan).to_dict()
        out["arms"][name] = arm
    return out


def verdicts(result: dict) -> list[str]:
    lines, arm = [], result["arms"]["mnemosyne"]
    for key, (bound, at_most) in TARGETS.items():
        r = arm["ratio"][key]
        ok = r["estimate"] <= bound if at_most else r["estimate"] >= bound
        lines.append(f"- {figures(1.0)[key][0]}: mnemosyne / stock = {r['estimate']:.2f} "
                     f"[{r['low']:.2f}, {r['high']:.2f}], target {'<=' if at_most else '>='} "
                     f"{bound:g}: {'met' if ok else 'MISSED'}")
    unfinished = arm["unfinished"]
    lines.append(f"- requests unfinished: {unfinished} of {arm['requests']}, target 0: "
                 f"{'met' if unfinished == 0 else 'MISSED'}")
    return lines


def markdown(result: dict, command: str, minutes: float, simulated: bool) -> str:
    names = list(result["arms"])
    figs = figures(1.0)
    head = "| figure | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    rows = []
    for key, (label, _) in figs.items():
        cells = []
        for n in names:
            arm = result["arms"][n]
            v = arm["figures"][key]
            cell = f"{v:.3g}"
            if n != BASE:
                r = arm["ratio"][key]
                cell += f" ({r['estimate']:.2f}x [{r['low']:.2f}, {r['high']:.2f}])"
            cells.append(cell)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    rows.append("| requests unfinished | " + " | ".join(
        str(result["arms"][n]["unfinished"]) for n in names) + " |")
    arms = "\n".join(f"- `{n}`: `vllm serve MODEL {ARMS[n]}`" for n in names)
    return (
        f"# Deadline order against first come first served{' (SIMULATED)' if simulated else ''}\n\n"
        f"{time.strftime('%Y-%m-%d')}; {result['machine']}; small synthetic model, float32, "
        f"eager. One run of `{command}` ({minutes:.0f} min).\n\n"
        f"Traffic: {result['traces'][0]}; Poisson arrivals; {100 * LONG_SHARE:.0f}% documents of "
        f"{LONG_PROMPT[0]}-{LONG_PROMPT[1]} prompt tokens ({LONG_OUTPUT[0]}-{LONG_OUTPUT[1]} out), "
        f"the rest chat turns of {SHORT_PROMPT[0]}-{SHORT_PROMPT[1]} ({SHORT_OUTPUT[0]}-"
        f"{SHORT_OUTPUT[1]} out). Deadlines (Metron): first token {TTFT_SLO_S:g} s + "
        f"{PREFILL_MS_PER_TOKEN:g} ms per prompt token after sending, each later token "
        f"{TBT_SLO_MS:g} ms after the previous. \"Long\" is a prompt of {LONG_FROM} tokens or "
        f"more.\n\n{arms}\n\n"
        f"Each figure of an arm is followed by its ratio to `{BASE}` and the 95% "
        f"paired-bootstrap interval of that ratio (the same requests resampled in both arms).\n\n"
        + head + "\n".join(rows) + "\n\nTargets (mnemosyne against stock):\n\n"
        + "\n".join(verdicts(result)) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["deadline_miss_rate", "short_ttft_p50_s", "long_ttft_p99_s", "out_tok_per_s"]
    names = list(result["arms"])
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    figs = figures(1.0)
    for ax, key in zip(axes, keys):
        values = [result["arms"][n]["figures"][key] for n in names]
        ax.bar(names, values, color=["#888", "#4a7fb5", "#d1762f"][:len(names)])
        for n, (x, v) in zip(names, enumerate(values)):
            r = result["arms"][n]["ratio"].get(key)
            if r:
                ax.text(x, v, f"{r['estimate']:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_title(figs[key][0], fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{result['traces'][0]} ({result['machine']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    args = engine_ab.parser(__doc__, "deadlines-work", QPS, REQUESTS)
    args.add_argument("--seed", type=int, default=0)
    args = args.parse_args()

    def traffic(model: str, work: Path) -> list[str]:
        trace = write_trace(work / f"mixed-{args.qps:g}qps.csv", args.qps, args.requests,
                            args.seed)
        return ["--trace-csv", str(trace), "--ttft-slo-s", f"{TTFT_SLO_S:g}",
                "--tbt-slo-ms", f"{TBT_SLO_MS:g}",
                "--prefill-ms-per-token", f"{PREFILL_MS_PER_TOKEN:g}"]

    return engine_ab.main(args, traffic, ARMS, script="deadlines.py", stem="deadlines",
                          defaults={"qps": QPS, "requests": REQUESTS}, analyse=analyse,
                          markdown=markdown, plot=plot)


if __name__ == "__main__":
    sys.exit(main())

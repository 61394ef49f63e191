"""How fast `vllm-ext simulate` runs on this machine, and where its time goes.

    python benchmarks/simulate_speed.py [--out benchmarks/results]

1. One arm (stock vLLM's scheduler), 2,000 Poisson requests on the A100 Llama-3-8B
   step-time source, the way `vllm-ext simulate` runs it: wall time.
2. Steps simulated per second with 64 and with 256 requests running (closed loops of
   that many long requests), and a profile of where a step's time goes.
Writes OUT/simulate-speed-cpu.md.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Where a simulated step's time goes, by the file its functions live in.
PARTS = (("vLLM's scheduler (schedule, update_from_output, KV cache manager)", ("vllm/v1/core",)),
         ("vLLM request/output objects", ("vllm/v1/request", "vllm/v1/engine", "vllm/v1/outputs",
                                          "vllm/sampling_params")),
         ("vllm-ext scheduler glue and step records", ("vllm_ext/engine/scheduling", "vllm_ext/schedulers",
                                                       "vllm_ext/patches")),
         ("driver and simulation loop", ("vllm_ext/tools/driver", "vllm_ext/simulate/engine")),
         ("step-time model", ("vllm_ext/simulate/gpu",)))


def _config(shape_dir: str, flags: list[str]):
    from vllm_ext.simulate.arms import Target, arm_config
    from vllm_ext.simulate.gpu import GPUS

    spec = GPUS["a100"]
    return arm_config(shape_dir, ["--max-model-len", "8192", *flags],
                      Target("cuda", spec.serve_max_num_batched_tokens, spec.serve_max_num_seqs, 16))


def _breakdown(profile: cProfile.Profile) -> list[tuple[str, float]]:
    stats = pstats.Stats(profile)
    total = sum(t for (_, _, _, t, _) in stats.stats.values())  # tottime
    parts = {name: 0.0 for name, _ in PARTS}
    other = 0.0
    for (path, _, _), (_, _, tottime, _, _) in stats.stats.items():
        name = next((n for n, keys in PARTS if any(k in path for k in keys)), None)
        if name is None:
            other += tottime
        else:
            parts[name] += tottime
    total = sum(parts.values()) + other
    return [(n, t / total) for n, t in parts.items()] + [("everything else (Python, stdlib)",
                                                          other / total)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()

    from vllm_ext.ab.report import machine
    from vllm_ext.ab.traces import LengthDist, synthesize
    from vllm_ext.simulate.cli import _shape_dir
    from vllm_ext.simulate.engine import simulate_trace
    from vllm_ext.simulate.gpu import SHAPES, GpuStepTime

    source = GpuStepTime("a100", "llama-3-8b")
    shape_dir = _shape_dir("llama-3-8b", SHAPES["llama-3-8b"])
    blocks = source.num_blocks(16)
    lines = [f"# `vllm-ext simulate` speed on this machine", "",
             f"{time.strftime('%Y-%m-%d')}; {machine()}. `python benchmarks/simulate_speed.py`; "
             f"step times from the A100 Llama-3-8B source, {blocks} KV blocks.", ""]

    trace = synthesize(2000, "poisson", LengthDist.parse("lognormal:1024:0.9"),
                       LengthDist.parse("lognormal:256:0.5"), seed=0, qps=8.0, max_prompt=6000)
    run = simulate_trace(_config(shape_dir, ["--scheduler", "vllm"]), blocks, trace, source)
    lines += ["## 2,000 requests, one arm", "",
              f"Stock vLLM's scheduler (`--scheduler vllm`), Poisson at 8 QPS, prompts lognormal "
              f"around 1024 tokens, outputs around 256: **{run.wall_s:.1f} s** for "
              f"{run.steps} steps ({run.steps_per_s:.0f} steps/s), {run.simulated_s:.0f} s "
              f"simulated, up to {run.max_running} requests running.", ""]
    print(lines[-2], flush=True)

    lines += ["## Steps per second by running requests", "",
              "| running requests | steps | wall s | steps/s | " + " | ".join(n for n, _ in PARTS)
              + " | other |", "|" + "---|" * (5 + len(PARTS))]
    for running in (64, 256):
        # A closed loop of `running` long requests: the batch stays that size.
        loop = synthesize(running * 2, "concurrency", LengthDist("fixed", 512),
                          LengthDist("fixed", 400), seed=1, concurrency=running)
        config = _config(shape_dir, ["--scheduler", "vllm", "--max-num-seqs", str(running)])
        profile = cProfile.Profile()
        profile.enable()
        r = simulate_trace(config, blocks, loop, source)
        profile.disable()
        plain = simulate_trace(config, blocks, loop, source)  # unprofiled, for the rate
        shares = _breakdown(profile)
        lines.append(f"| {running} (max {plain.max_running}) | {plain.steps} | {plain.wall_s:.1f} | "
                     f"{plain.steps_per_s:.0f} | " + " | ".join(f"{100 * s:.0f}%" for _, s in shares)
                     + " |")
        print(lines[-1], flush=True)
        del r
    lines += ["", "Shares are of profiled time (cProfile's own time per function, grouped by "
                  "file); the rate is from a second, unprofiled run."]
    out = Path(args.out) / "simulate-speed-cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

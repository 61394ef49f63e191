"""Scheduler A/B on the real engine: long prompts arriving while many requests decode.

    python benchmarks/schedulers.py [--model DIR] [--out benchmarks/results]

Runs each scheduler (vllm, prefill-first, sarathi) in its own process on the same
seeded workload, streams every request through vLLM's AsyncLLM, and prints P50/P99
time between tokens, P50/P99 TTFT and output throughput side by side, with the
engine's own longest step beside the clients' longest gap. Results go to
OUT/schedulers-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vllm_ext.ab.metron import Timeline, percentile, pooled_gaps
from vllm_ext.machine import cpu_model

ARMS = {
    "vllm": {"scheduler": "vllm"},
    "prefill-first": {"scheduler": "prefill-first"},
    "sarathi": {"scheduler": "sarathi"},
}


@dataclass(frozen=True)
class Req:
    arrival: float
    prompt_len: int
    max_tokens: int


DECODERS, DECODE_TOKENS, LONG_PROMPTS, LONG_LEN, LONG_EVERY_S = 16, 300, 5, 1024, 6.0


def workload() -> list[Req]:
    """Many short requests decode; long prompts arrive one by one while they do, spaced
    wider than one long prefill so that decodes run between them."""
    reqs = [Req(0.05 * i, 32 + 4 * i, DECODE_TOKENS) for i in range(DECODERS)]
    reqs += [Req(3.0 + LONG_EVERY_S * j, LONG_LEN - 32 * j, 16) for j in range(LONG_PROMPTS)]
    return reqs


async def _run_arm(model: str, arm: str, reqs: list[Req], choice: dict | None = None,
                   max_model_len: int = 4096) -> dict:
    """One engine on the workload; `choice`: vllm-ext selection and engine arguments
    (default: the scheduler arm's)."""
    import vllm_ext
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs = vllm_ext.engine_kwargs(model=model, dtype="float32", enforce_eager=True,
                                    max_model_len=max_model_len, seed=0,
                                    disable_log_stats=False, **(choice or ARMS[arm]))
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    vocab = engine.model_config.get_vocab_size()

    async def one(i: int, req: Req, t0: float) -> dict:
        await asyncio.sleep(max(0.0, t0 + req.arrival - time.monotonic()))
        sent = time.monotonic()
        ids = [(11 + 13 * i + 7 * j) % (vocab - 10) + 5 for j in range(req.prompt_len)]
        params = SamplingParams(temperature=0.0, max_tokens=req.max_tokens, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        events = []  # (time, tokens in this event)
        async for out in engine.generate({"prompt_token_ids": ids}, params, f"{arm}-{i}"):
            events.append((time.monotonic(), len(out.outputs[0].token_ids)))
        return {"sent": sent, "prompt_len": req.prompt_len, "events": events}

    await one(-1, Req(0.0, 16, 4), time.monotonic())  # warm-up, not measured
    before = vllm_ext.step_stats().steps
    t0 = time.monotonic()
    results = await asyncio.gather(*(one(i, r, t0) for i, r in enumerate(reqs)))
    stats = vllm_ext.step_stats()
    engine.shutdown()
    measured = stats.recent[-(stats.steps - before):] if stats.steps > before else ()
    budget = engine.vllm_config.scheduler_config.max_num_batched_tokens
    del engine  # shut down while the interpreter is whole, not in __del__ at exit
    return {"requests": results, "max_num_batched_tokens": budget,
            "engine_max_step_s": max((s.wall_s for s in measured), default=float("nan")),
            "engine_steps": len(measured), "steps": [dataclasses.asdict(s) for s in measured]}


def timelines(raw: dict) -> list[Timeline]:
    return [Timeline.of(r["sent"], r["events"]) for r in raw["requests"]]


def summarize(arm: str, raw: dict) -> dict:
    tls = timelines(raw)
    gaps, ttft = pooled_gaps(tls), [tl.ttft for tl in tls]
    tokens = sum(tl.num_tokens for tl in tls)
    span = max(tl.sent + tl.e2e for tl in tls) - min(tl.sent for tl in tls)
    return {
        "arm": arm, "budget": raw["max_num_batched_tokens"],
        "tbt_p50_ms": 1e3 * percentile(gaps, 50), "tbt_p99_ms": 1e3 * percentile(gaps, 99),
        "tbt_p999_ms": 1e3 * percentile(gaps, 99.9), "tbt_max_ms": 1e3 * max(gaps),
        "engine_max_step_ms": 1e3 * raw["engine_max_step_s"],
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "throughput_tok_s": tokens / span, "output_tokens": tokens,
    }


def plot(raws: dict[str, dict], title: str, path: Path) -> None:
    """TBT complementary CDF per scheduler: the tail is where schedulers differ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, raw in raws.items():
        gaps = sorted(g for g in pooled_gaps(timelines(raw)) if g > 0)
        n = len(gaps)
        ax.step(gaps, [1 - k / n for k in range(n)], where="post", label=arm)
    ax.set(xscale="log", yscale="log", xlabel="time between tokens (s)",
           ylabel="fraction of gaps longer", title=title)
    ax.axhline(0.01, color="grey", lw=0.5, ls=":")
    ax.text(ax.get_xlim()[0], 0.011, " P99", color="grey", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> str:
    cols = [("arm", "scheduler", "{}"), ("budget", "tokens/step", "{}"),
            ("tbt_p50_ms", "TBT P50 ms", "{:.0f}"), ("tbt_p99_ms", "TBT P99 ms", "{:.0f}"),
            ("tbt_p999_ms", "TBT P99.9 ms", "{:.0f}"), ("tbt_max_ms", "TBT max ms", "{:.0f}"),
            ("engine_max_step_ms", "engine max step ms", "{:.0f}"),
            ("ttft_p50_s", "TTFT P50 s", "{:.2f}"), ("ttft_p99_s", "TTFT P99 s", "{:.2f}"),
            ("throughput_tok_s", "output tok/s", "{:.1f}")]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[k]) for k, _, fmt in cols) + " |")
    return "\n".join(lines)


def machine() -> str:
    return f"{os.cpu_count()} cores, {cpu_model() or platform.processor()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir (default: build the small preset)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--_arm", help=argparse.SUPPRESS)
    ap.add_argument("--_raw", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    reqs = workload()

    if args._arm:  # child: one engine, one arm
        raw = asyncio.run(_run_arm(args.model, args._arm, reqs))
        Path(args._raw).write_text(json.dumps(raw))
        return

    from tqdm import tqdm

    from vllm_ext.tools.models import make_model

    model = args.model or str(make_model(Path("models") / "small", preset="small"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="vllm-ext-bench-"))
    rows, raws = [], {}
    for arm in tqdm(args.arms, desc="schedulers (engine logs in %s)" % logs, unit="arm"):
        raw_path, log_path = logs / f"{arm}.json", logs / f"{arm}.log"
        with open(log_path, "w") as log:
            code = subprocess.run([sys.executable, __file__, "--model", model, "--_arm", arm,
                                   "--_raw", str(raw_path)], stdout=log, stderr=subprocess.STDOUT)
        if code.returncode != 0:
            sys.exit(f"arm {arm} failed ({code.returncode}); end of {log_path}:\n"
                     + log_path.read_text()[-3000:])
        raws[arm] = json.loads(raw_path.read_text())
        rows.append(summarize(arm, raws[arm]))

    where = f"{machine()}; vLLM CPU, float32, eager; model {Path(model).name}"
    report(raws, rows, where, out)


def report(raws: dict[str, dict], rows: list[dict], where: str, out: Path) -> None:
    stamp = time.strftime("%Y-%m-%d")
    text = (f"Scheduler A/B, {stamp}, {where}\n"
            f"Workload: {DECODERS} requests decode {DECODE_TOKENS} tokens each; {LONG_PROMPTS} "
            f"prompts of ~{LONG_LEN} tokens arrive every {LONG_EVERY_S:.0f} s from 3 s. TBT pools "
            f"every gap between streamed tokens (Metron).\n\n{table(rows)}\n")
    print(text)
    (out / "schedulers-cpu.md").write_text(text)
    (out / "schedulers-cpu.json").write_text(json.dumps(
        {"date": stamp, "machine": where, "summary": rows, "raw": raws}))
    try:
        plot(raws, f"Scheduler A/B on {os.cpu_count()} CPU cores", out / "schedulers-cpu.png")
    except ImportError:
        print("matplotlib not installed (pip install 'vllm-ext[bench]'): no plot")


if __name__ == "__main__":
    main()

"""Mnemosyne on the real engine, each pair side by side in one run:

1. adaptive chunking (`--sarathi-tbt-slo-ms`, with a latency model profiled here) against
   fixed token budgets (256, and the largest predicted to stay within the target at the
   end of a long prompt): time between tokens, TTFT and throughput while long prompts
   prefill beside decodes (small model);
2. KV-cache parallelism: decode step time at long context, `--attn pod` (one worker)
   against `--kvp 2` (two ranks, the same attention code) (tiny model: KVP needs the
   KV heads replicated over the ranks, and only its one KV head allows that on 2 ranks);
3. sequence pipeline parallelism: TTFT of long prompts on 2 pipeline stages with
   `--sarathi-spp on` (vLLM's own behaviour) against `off` (plain PP) (small model).

    python benchmarks/mnemosyne.py [--out benchmarks/results] [--parts adaptive kvp spp]

Every arm runs in its own process, one engine at a time. Results: OUT/mnemosyne-cpu.md,
.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from schedulers import Req, _run_arm, machine, summarize, timelines

from vllm_ext.ab.metron import percentile, pooled_gaps

# 1. adaptive chunking: decodes running while two long prompts prefill
DECODERS, DECODE_TOKENS, LONG_LEN, FIXED_BUDGET = 16, 200, 3000, 256


def adaptive_workload() -> list[Req]:
    reqs = [Req(0.05 * i, 32 + 4 * i, DECODE_TOKENS) for i in range(DECODERS)]
    return reqs + [Req(2.0, LONG_LEN, 16), Req(14.0, LONG_LEN - 200, 16)]


# 2. KVP: a few long contexts decoding
KVP_CONTEXT, KVP_REQUESTS, KVP_TOKENS = 3500, 4, 48


def kvp_workload() -> list[Req]:
    return [Req(0.0, KVP_CONTEXT - 100 * i, KVP_TOKENS) for i in range(KVP_REQUESTS)]


# 3. SPP: long prompts one at a time on an idle pipeline
SPP_LEN, SPP_BUDGET, SPP_PROMPTS, SPP_EVERY_S = 2048, 256, 3, 12.0


def spp_workload() -> list[Req]:
    return [Req(SPP_EVERY_S * i, SPP_LEN - 64 * i, 4) for i in range(SPP_PROMPTS)]


WORKLOADS = {"adaptive": adaptive_workload, "kvp": kvp_workload, "spp": spp_workload}
TWO_RANKS = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # vLLM's auto binding wants a NUMA node per rank


def arms(part: str, latency_model: str | None = None, slo_ms: float | None = None
         ) -> dict[str, tuple[dict, dict]]:
    """name -> (vllm-ext selection and engine arguments, environment)."""
    if part == "adaptive":
        safe = safe_budget(latency_model, slo_ms)
        return {f"budget {FIXED_BUDGET}": ({"scheduler": "sarathi",
                                           "sarathi_token_budget": FIXED_BUDGET}, {}),
                f"budget {safe} (within target)": ({"scheduler": "sarathi",
                                                    "sarathi_token_budget": safe}, {}),
                f"tbt-slo {slo_ms:.0f} ms": ({"scheduler": "sarathi", "sarathi_token_budget": 2048,
                                              "sarathi_tbt_slo_ms": slo_ms,
                                              "sarathi_latency_model": latency_model}, {})}
    if part == "kvp":  # --scheduler vllm: stock scheduling, with step records
        return {"kvp 1 (--attn pod)": ({"scheduler": "vllm", "attn": "pod"}, {}),
                "kvp 2": ({"scheduler": "vllm", "kvp": 2}, TWO_RANKS)}
    pp = {"scheduler": "sarathi", "sarathi_token_budget": SPP_BUDGET, "pipeline_parallel_size": 2}
    return {"pp 2, spp on": (pp, TWO_RANKS),
            "pp 2, spp off": ({**pp, "sarathi_spp": "off"}, TWO_RANKS)}


def _decodes() -> tuple[int, ...]:
    return tuple(32 + 4 * i + DECODE_TOKENS // 2 for i in range(DECODERS))


def safe_budget(latency_model: str, slo_ms: float) -> int:
    """The largest fixed budget whose last chunk of a long prompt is predicted to stay
    within the target: what an operator must pick to meet it without adaptive chunking."""
    from vllm_ext.schedulers.latency import LatencyModel

    model = LatencyModel.from_json(Path(latency_model).read_text())
    chunk = model.largest_chunk(slo_ms / 1000, LONG_LEN - FIXED_BUDGET, _decodes(), step=16)
    return chunk + DECODERS


def slo_for(latency_model: str) -> float:
    """The target: the predicted time of a fixed-budget chunk halfway through a long
    prompt beside the decodes, so both arms take about the same time per prompt; the
    adaptive arm then takes larger chunks early and smaller ones late."""
    from vllm_ext.schedulers.latency import LatencyModel, StepShape

    model = LatencyModel.from_json(Path(latency_model).read_text())
    return 1000 * model.predict(StepShape(((FIXED_BUDGET, LONG_LEN // 2),), _decodes()))


def run_child(model: str, part: str, name: str, choice: dict, env: dict, logs: Path) -> dict:
    slug = "".join(c if c.isalnum() else "-" for c in name)
    raw, log = logs / f"{part}-{slug}.json", logs / f"{part}-{slug}.log"
    if raw.exists():  # --logs of an earlier run: its finished arms are kept
        return json.loads(raw.read_text())
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, __file__, "--_child", json.dumps(
            {"model": model, "part": part, "name": name, "choice": choice, "raw": str(raw)})],
            stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env})
    if code.returncode != 0:
        sys.exit(f"{part} / {name} failed ({code.returncode}); end of {log}:\n"
                 + log.read_text()[-3000:])
    return json.loads(raw.read_text())


def decode_step_ms(raw: dict) -> dict:
    """Engine steps that only decode (every request past its prompt)."""
    steps = [s["wall_s"] for s in raw["steps"]
             if s["decode_tokens"] == KVP_REQUESTS and not s["prefill_tokens"]]
    return {"decode_steps": len(steps), "decode_step_p50_ms": 1e3 * statistics.median(steps),
            "decode_step_p90_ms": 1e3 * percentile(steps, 90)}


def spp_ttft(raw: dict) -> dict:
    ttft = [tl.ttft for tl in timelines(raw)]
    pipelined = sum(s["pipelined_chunks"] for s in raw["steps"])
    return {"ttft_s": [round(t, 3) for t in ttft], "ttft_mean_s": statistics.mean(ttft),
            "pipelined_chunks": pipelined}


def adaptive_summary(name: str, raw: dict) -> dict:
    row = summarize(name, raw)
    steps = [s for s in raw["steps"] if s["predicted_s"] > 0]
    if steps:
        errs = [abs(s["predicted_s"] - s["wall_s"]) / s["wall_s"] for s in steps]
        row.update(prediction_median_error=statistics.median(errs),
                   chunk_max=max(s["prefill_tokens"] for s in raw["steps"]))
    else:
        row.update(prediction_median_error=float("nan"),
                   chunk_max=max(s["prefill_tokens"] for s in raw["steps"]))
    return row


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("adaptive", "spp") if p in results]
    fig, axes = plt.subplots(1, len(parts) + ("adaptive" in results), figsize=(5 * (
        len(parts) + ("adaptive" in results)), 4), squeeze=False)
    axes = list(axes[0])
    if "adaptive" in results:
        ax = axes.pop(0)
        for name, raw in results["adaptive"]["raw"].items():
            gaps = sorted(g for g in pooled_gaps(timelines(raw)) if g > 0)
            ax.step(gaps, [1 - k / len(gaps) for k in range(len(gaps))], where="post", label=name)
        ax.set(xscale="log", yscale="log", xlabel="time between tokens (s)",
               ylabel="fraction of gaps longer", title="adaptive chunking: TBT tail")
        ax.legend()
        ax = axes.pop(0)
        for name, raw in results["adaptive"]["raw"].items():
            steps = [s for s in raw["steps"] if s["predicted_s"] > 0]
            if steps:
                ax.scatter([s["predicted_s"] for s in steps], [s["wall_s"] for s in steps], s=6,
                           label=name)
                top = max(max(s["wall_s"], s["predicted_s"]) for s in steps)
                ax.plot([0, top], [0, top], color="grey", lw=0.5)
        ax.set(xlabel="predicted step time (s)", ylabel="measured step time (s)",
               title="latency model: predicted vs measured")
    if "spp" in results:
        ax = axes.pop(0)
        names = list(results["spp"]["summary"])
        for k, name in enumerate(names):
            ttft = results["spp"]["summary"][name]["ttft_s"]
            ax.bar([i + 0.4 * k for i in range(len(ttft))], ttft, width=0.4, label=name)
        ax.set_xticks([i + 0.2 for i in range(SPP_PROMPTS)], [str(i + 1) for i in range(SPP_PROMPTS)])
        ax.set(xlabel="prompt", ylabel="TTFT (s)", title=f"SPP: {SPP_LEN}-token prompts, 2 stages")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--parts", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--logs", default=None,
                    help="directory for engine logs and raw results; arms whose results are "
                         "already there are not run again (resume an interrupted run)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

    if args._child:  # one engine, one arm
        c = json.loads(args._child)
        raw = asyncio.run(_run_arm(c["model"], c["name"], WORKLOADS[c["part"]](), c["choice"],
                                   max_model_len=4096))
        Path(c["raw"]).write_text(json.dumps(raw))
        return

    from tqdm import tqdm

    from vllm_ext.tools.models import make_model

    small = str(make_model(Path("models") / "small", preset="small"))
    tiny = str(make_model(Path("models") / "tiny", preset="tiny"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="vllm-ext-mnemosyne-"))
    logs.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    stamp, where = time.strftime("%Y-%m-%d"), f"{machine()}; vLLM CPU, float32, eager"
    lines = [f"Mnemosyne on vLLM, {stamp}, {where}. Engine logs: {logs}\n"]
    for part in tqdm(args.parts, desc="parts", unit="part"):
        model = tiny if part == "kvp" else small
        latency, slo = None, None
        if part == "adaptive":
            latency = str(logs / "latency-small.json")
            if not Path(latency).exists():
                subprocess.run([sys.executable, "-m", "vllm_ext", "profile", small, "--out",
                                latency, "--dtype", "float32", "--max-model-len", "4096"],
                               check=True, stdout=subprocess.DEVNULL,
                               stderr=open(logs / "profile.log", "w"))
            slo = slo_for(latency)
        raws = {name: run_child(model, part, name, choice, env, logs)
                for name, (choice, env) in arms(part, latency, slo).items()}
        if part == "adaptive":
            fit = json.loads(Path(latency).read_text())["fit"]
            summary = {n: adaptive_summary(n, r) for n, r in raws.items()}
            lines += [f"## 1. Adaptive chunking (model small; {DECODERS} requests decode "
                      f"{DECODE_TOKENS} tokens; prompts of {LONG_LEN} and {LONG_LEN - 200} "
                      f"tokens arrive at 2 s and 14 s)\n",
                      f"Latency model (`vllm-ext profile`, {fit['steps']} steps): held-out "
                      f"error mean {100 * fit['holdout_mean_rel_error']:.0f}%, median "
                      f"{100 * fit['holdout_median_rel_error']:.0f}%, p90 "
                      f"{100 * fit['holdout_p90_rel_error']:.0f}%. Target {slo:.0f} ms = the "
                      f"predicted step of a {FIXED_BUDGET}-token chunk at context "
                      f"{LONG_LEN // 2} beside the decodes; `within target` is the largest "
                      f"fixed budget whose chunks at the end of a prompt are predicted to stay "
                      f"within it. Predictions are the model's times its online correction.\n",
                      "| arm | TBT P50 ms | TBT P99 ms | TBT max ms | TTFT P50 s | TTFT P99 s "
                      "| output tok/s | largest step tokens | prediction median error |",
                      "|---|---|---|---|---|---|---|---|---|"]
            lines += [f"| {n} | {r['tbt_p50_ms']:.0f} | {r['tbt_p99_ms']:.0f} | "
                      f"{r['tbt_max_ms']:.0f} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | "
                      f"{r['throughput_tok_s']:.1f} | {r['chunk_max']} | "
                      + (f"{100 * r['prediction_median_error']:.0f}% |"
                         if r["prediction_median_error"] == r["prediction_median_error"]
                         else "n/a |") for n, r in summary.items()]
        elif part == "kvp":
            summary = {n: decode_step_ms(r) for n, r in raws.items()}
            base, two = summary.values()
            lines += [f"\n## 2. KV-cache parallelism (model tiny; {KVP_REQUESTS} requests at "
                      f"~{KVP_CONTEXT} tokens of context decode {KVP_TOKENS} tokens)\n",
                      "| arm | decode steps | step P50 ms | step P90 ms |", "|---|---|---|---|"]
            lines += [f"| {n} | {r['decode_steps']} | {r['decode_step_p50_ms']:.1f} | "
                      f"{r['decode_step_p90_ms']:.1f} |" for n, r in summary.items()]
            lines.append(f"\nkvp 2 / kvp 1 decode step (P50): "
                         f"{two['decode_step_p50_ms'] / base['decode_step_p50_ms']:.2f}")
        else:
            summary = {n: spp_ttft(r) for n, r in raws.items()}
            on, off = summary.values()
            lines += [f"\n## 3. Sequence pipeline parallelism (model small, 2 stages, "
                      f"{SPP_BUDGET}-token chunks; {SPP_PROMPTS} prompts of ~{SPP_LEN} tokens, "
                      f"one every {SPP_EVERY_S:.0f} s)\n",
                      "| arm | TTFT per prompt s | mean TTFT s | chunks pipelined |",
                      "|---|---|---|---|"]
            lines += [f"| {n} | {', '.join(f'{t:.2f}' for t in r['ttft_s'])} | "
                      f"{r['ttft_mean_s']:.2f} | {r['pipelined_chunks']} |"
                      for n, r in summary.items()]
            lines.append(f"\nspp on / off mean TTFT: {on['ttft_mean_s'] / off['ttft_mean_s']:.2f}")
        results[part] = {"summary": summary, "raw": raws}
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "mnemosyne-cpu.md").write_text(text)
    (out / "mnemosyne-cpu.json").write_text(json.dumps({"date": stamp, "machine": where,
                                                        **results}))
    try:
        plot(results, out / "mnemosyne-cpu.png")
    except ImportError:
        print("matplotlib not installed (pip install 'vllm-ext[bench]'): no plot")


if __name__ == "__main__":
    main()

"""POD-Attention on a GPU: hybrid batches, fused against the same work in two launches.

    python benchmarks/pod.py [--out benchmarks/results] [--quick]

Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128, bf16, paged
blocks of 16). Each point is one prefill chunk (with or without earlier context) plus
a batch of decodes. Times, with CUDA events (warm-ups, then the median of repeats):

  pod         the whole batch in one POD launch
  serial      the prefill, then the decodes: two launches of the same kernel
  prefill     the prefill alone;  decode  the decodes alone
  flashinfer  FlashInfer's POD wrapper, where FlashInfer is installed

and reports pod's speedup over serial, its ratio to max(prefill, decode) (the ideal
overlap), the decodes' achieved share of memory bandwidth and the prefill's achieved
matrix throughput. Writes OUT/pod-<gpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from vllm_ext.kernels import pod_attention
from vllm_ext.kernels.pod import Workspace, plan, tile_for

HEADS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE = 32, 8, 128, 16, torch.bfloat16
# (prefill tokens, prefill prior context, decodes, decode context)
SWEEP = [
    (512, 0, 16, 1024), (512, 0, 64, 4096), (512, 4096, 128, 2048), (1024, 0, 256, 1024),
    (2048, 0, 64, 8192), (2048, 8192, 32, 16384), (4096, 0, 128, 4096), (4096, 0, 16, 32768),
    (8192, 0, 64, 8192), (8192, 8192, 256, 2048), (16384, 0, 32, 16384), (16384, 0, 128, 4096),
]
QUICK = [SWEEP[0], SWEEP[4], SWEEP[9]]


def batch(prefill: int, prior: int, decodes: int, dctx: int, device: str = "cuda"):
    """Decodes first (as vLLM orders them), then one prefill chunk."""
    seqs = [(1, dctx)] * decodes + [(prefill, prior + prefill)]
    need = [(c + BLOCK - 1) // BLOCK for _, c in seqs]
    cache = (sum(need), BLOCK, KV_HEADS, HEAD_DIM)
    k = torch.randn(cache, dtype=DTYPE, device=device)
    v = torch.randn(cache, dtype=DTYPE, device=device)
    perm = torch.randperm(sum(need), device=device, dtype=torch.int32)
    table = torch.zeros(len(seqs), max(need), dtype=torch.int32, device=device)
    used = 0
    for s, n in enumerate(need):
        table[s, :n] = perm[used:used + n]
        used += n
    qsl = torch.tensor([0] + [sum(q for q, _ in seqs[:i + 1]) for i in range(len(seqs))],
                       dtype=torch.int32, device=device)
    q = torch.randn(int(qsl[-1]), HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    lens = torch.tensor([c for _, c in seqs], dtype=torch.int32, device=device)
    return q, k, v, table, lens, qsl, decodes


def sub_batch(b, seqs: slice, num_decodes: int):
    q, k, v, table, lens, qsl, _ = b
    starts = qsl[seqs.start:seqs.stop + 1 if seqs.stop else None]
    lo, hi = int(starts[0]), int(starts[-1])
    return q[lo:hi], k, v, table[seqs], lens[seqs], (starts - lo).contiguous(), num_decodes


def timed(fn, warmup: int = 5, repeats: int = 20) -> float:
    """Median milliseconds of fn() over CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_point(point, peak_bw: float | None, peak_flops: float | None) -> dict:
    prefill, prior, decodes, dctx = point
    b = batch(*point)
    scale = HEAD_DIM ** -0.5
    n = len(b[4])
    pre, dec = sub_batch(b, slice(decodes, n), 0), sub_batch(b, slice(0, decodes), decodes)
    block_m = tile_for(HEAD_DIM, DTYPE).block_m
    plans = {name: plan(x[5], x[4], x[6], HEADS, KV_HEADS, block_m=block_m) for name, x in
             (("pod", b), ("prefill", pre), ("decode", dec))}
    # One workspace for every launch, as a served engine's builder keeps one: a launch
    # without one would time its allocation too.
    ws = Workspace.for_batches("cuda", n, len(b[0]), HEADS, KV_HEADS, HEAD_DIM, block_m)
    run = lambda x, p: pod_attention(*x, scale=scale, pod_plan=p, workspace=ws)
    r = {"prefill_tokens": prefill, "prior_context": prior, "decodes": decodes,
         "decode_context": dctx, "decode_splits": plans["pod"].splits}
    r["pod_ms"] = timed(lambda: run(b, plans["pod"]))
    r["prefill_ms"] = timed(lambda: run(pre, plans["prefill"]))
    r["decode_ms"] = timed(lambda: run(dec, plans["decode"]))
    r["serial_ms"] = timed(lambda: (run(pre, plans["prefill"]), run(dec, plans["decode"])))
    r["speedup_vs_serial"] = r["serial_ms"] / r["pod_ms"]
    r["vs_ideal_overlap"] = r["pod_ms"] / max(r["prefill_ms"], r["decode_ms"])
    kv_bytes = decodes * dctx * KV_HEADS * HEAD_DIM * 2 * DTYPE.itemsize
    # causal prefill: each query token attends to prior + its own position
    flops = 4 * HEADS * HEAD_DIM * prefill * (prior + (prefill + 1) / 2)
    r["decode_bw_frac"] = kv_bytes / (r["decode_ms"] * 1e-3) / peak_bw if peak_bw else None
    r["prefill_tflops"] = flops / (r["prefill_ms"] * 1e-3) / 1e12
    r["prefill_mma_frac"] = flops / (r["prefill_ms"] * 1e-3) / peak_flops if peak_flops else None
    r["flashinfer_ms"] = _flashinfer(b, scale)
    return r


def _flashinfer(b, scale) -> float | None:
    """FlashInfer's POD on the same batch: owed. The lent GPU image has no FlashInfer
    and no network to install it, so this column stays empty until one that has it."""
    return None


# Dense bf16 tensor-core peaks and HBM bandwidth from the vendor's data sheets (SXM).
PEAKS = {"H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--quick", action="store_true", help="three points only")
    opts = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/pod.py needs a CUDA GPU (tests/test_pod_kernel.py checks "
                         "the kernel on a CPU)")
    gpu = torch.cuda.get_device_name()
    peak_bw, peak_flops = next((v for k, v in PEAKS.items() if k in gpu), (None, None))
    rows = []
    for point in QUICK if opts.quick else SWEEP:
        rows.append(run_point(point, peak_bw, peak_flops))
        r = rows[-1]
        print(f"prefill {r['prefill_tokens']:>5} (+{r['prior_context']:>5} ctx), "
              f"{r['decodes']:>3} decodes x {r['decode_context']:>5}: pod {r['pod_ms']:.3f} ms, "
              f"serial {r['serial_ms']:.3f}, prefill {r['prefill_ms']:.3f}, decode "
              f"{r['decode_ms']:.3f}: {r['speedup_vs_serial']:.2f}x, "
              f"{r['vs_ideal_overlap']:.2f} of ideal", flush=True)
        # After every point: a run cut short by its time limit keeps what it measured.
        summary = write(Path(opts.out), gpu, rows)
    print(json.dumps(summary, indent=1))


def write(out: Path, gpu: str, rows: list[dict]) -> dict:
    speedups = [r["speedup_vs_serial"] for r in rows]
    summary = {"gpu": gpu, "torch": torch.__version__, "points": len(rows),
               "mean_speedup_vs_serial": statistics.mean(speedups),
               "min_speedup_vs_serial": min(speedups),
               "max_vs_ideal_overlap": max(r["vs_ideal_overlap"] for r in rows)}
    out.mkdir(parents=True, exist_ok=True)
    tag = gpu.replace(" ", "-")
    (out / f"pod-{tag}.json").write_text(json.dumps({"summary": summary, "points": rows}, indent=1))
    head = ["prefill", "prior", "decodes", "decode ctx", "pod ms", "serial ms", "prefill ms",
            "decode ms", "speedup", "vs ideal", "decode BW", "prefill TFLOP/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        bw = f"{r['decode_bw_frac']:.0%}" if r["decode_bw_frac"] else "n/a"
        lines.append(f"| {r['prefill_tokens']} | {r['prior_context']} | {r['decodes']} | "
                     f"{r['decode_context']} | {r['pod_ms']:.3f} | {r['serial_ms']:.3f} | "
                     f"{r['prefill_ms']:.3f} | {r['decode_ms']:.3f} | {r['speedup_vs_serial']:.2f}x | "
                     f"{r['vs_ideal_overlap']:.2f} | {bw} | {r['prefill_tflops']:.0f} |")
    (out / f"pod-{tag}.md").write_text(f"# POD-Attention on {gpu}\n\n" + "\n".join(lines) + "\n")
    return summary

if __name__ == "__main__":
    main()

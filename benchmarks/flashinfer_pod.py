"""FlashInfer's POD-Attention beside ours, on the POD sweep's batches (a GPU with FlashInfer).

    python benchmarks/flashinfer_pod.py [--out benchmarks/results] [--quick]

FlashInfer's `BatchPODWithPagedKVCacheWrapper` is the peer POD implementation in serving
use (its prefill and decode halves in one launch, CUDA C++, JIT-built here with the
image's nvcc). Each point is a batch of benchmarks/pod.py's sweep: decodes first, one
prefill chunk, bf16, Llama-3-8B attention shapes. Both run from the same paged caches
(FlashInfer's NHD layout is vLLM's [blocks, block_size, kv_heads, head_dim]); each is
planned once and timed over CUDA events, and their outputs are compared (the largest
difference, bf16). Writes OUT/pod-flashinfer-<gpu>.{json,md} after every point, so a run
cut short keeps what it measured. Without FlashInfer (benchmarks/gpu_wheels.sh fetches
it for the lent GPU) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from pod import BLOCK, DTYPE, HEAD_DIM, HEADS, KV_HEADS, QUICK, SWEEP, batch, timed

from vllm_ext.kernels import pod_attention
from vllm_ext.kernels.pod import plan, tile_for

WORKSPACE_BYTES = 128 << 20  # FlashInfer's documented float workspace size


def paged_indices(table: torch.Tensor, lens: torch.Tensor, rows: slice):
    """FlashInfer's page lists for `rows` of a block table: (kv_indptr, kv_indices,
    last_page_len)."""
    lens = lens[rows]
    pages = (lens + BLOCK - 1) // BLOCK
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32, device=lens.device)
    indptr[1:] = torch.cumsum(pages, 0)
    indices = torch.cat([table[rows][i, :int(n)] for i, n in enumerate(pages)])
    return indptr, indices.to(torch.int32), ((lens - 1) % BLOCK + 1).to(torch.int32)


def flashinfer_pod(b, scale: float, workspace: torch.Tensor):
    """A planned FlashInfer POD run of batch `b`: a callable giving (prefill, decode) out."""
    from flashinfer.pod import BatchPODWithPagedKVCacheWrapper

    q, k, v, table, lens, qsl, decodes = b
    n = len(lens)
    qo_d = qsl[:decodes + 1]
    qo_p = (qsl[decodes:] - qsl[decodes]).contiguous()
    wrapper = BatchPODWithPagedKVCacheWrapper(workspace, kv_layout="NHD")
    wrapper.plan(qo_p, *paged_indices(table, lens, slice(decodes, n)),
                 qo_d, *paged_indices(table, lens, slice(0, decodes)),
                 num_qo_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, page_size=BLOCK,
                 q_data_type=DTYPE, kv_data_type=DTYPE, sm_scale=scale)
    q_d, q_p = q[:decodes], q[decodes:]
    return lambda: wrapper.run(q_p, (k, v), q_d, (k, v), causal_p=True)


def run_point(point, workspace: torch.Tensor) -> dict:
    b = batch(*point)
    scale = HEAD_DIM ** -0.5
    ours_plan = plan(b[5], b[4], b[6], HEADS, KV_HEADS, block_m=tile_for(HEAD_DIM, DTYPE).block_m)
    ours = lambda: pod_attention(*b, scale=scale, pod_plan=ours_plan)
    theirs = flashinfer_pod(b, scale, workspace)
    out_p, out_d = theirs()
    expected = torch.cat([out_d, out_p])
    prefill, prior, decodes, dctx = point
    r = {"prefill_tokens": prefill, "prior_context": prior, "decodes": decodes,
         "decode_context": dctx,
         "max_abs_diff": float((ours().float() - expected.float()).abs().max())}
    r["ours_ms"] = timed(ours)
    r["flashinfer_ms"] = timed(theirs)
    r["ours_vs_flashinfer"] = r["ours_ms"] / r["flashinfer_ms"]
    return r


def write(out: Path, gpu: str, version: str, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tag = gpu.replace(" ", "-")
    (out / f"pod-flashinfer-{tag}.json").write_text(json.dumps(
        {"gpu": gpu, "flashinfer": version, "torch": torch.__version__, "points": rows},
        indent=1))
    head = ["prefill", "prior", "decodes", "decode ctx", "ours ms", "FlashInfer ms",
            "ours / FlashInfer", "max abs diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [f"| {r['prefill_tokens']} | {r['prior_context']} | {r['decodes']} | "
              f"{r['decode_context']} | {r['ours_ms']:.3f} | {r['flashinfer_ms']:.3f} | "
              f"{r['ours_vs_flashinfer']:.2f} | {r['max_abs_diff']:.3g} |" for r in rows]
    (out / f"pod-flashinfer-{tag}.md").write_text(
        f"# POD-Attention: ours against FlashInfer {version} on {gpu}\n\n"
        + "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--quick", action="store_true", help="three points only")
    opts = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/flashinfer_pod.py needs a CUDA GPU")
    try:
        import flashinfer
    except ImportError as e:
        print(f"FlashInfer is not installed ({e}): nothing compared "
              f"(benchmarks/gpu_wheels.sh fetches it for the lent GPU)")
        return
    gpu = torch.cuda.get_device_name()
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    rows = []
    for point in QUICK if opts.quick else SWEEP:
        rows.append(run_point(point, workspace))
        r = rows[-1]
        print(f"{point}: ours {r['ours_ms']:.3f} ms, FlashInfer {r['flashinfer_ms']:.3f} ms "
              f"({r['ours_vs_flashinfer']:.2f}x), max abs diff {r['max_abs_diff']:.3g}",
              flush=True)
        write(Path(opts.out), gpu, flashinfer.__version__, rows)


if __name__ == "__main__":
    main()

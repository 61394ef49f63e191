"""vAttention's KV pool: what mapping costs, what the pool costs attention, and what it saves.

    python benchmarks/vattention.py [--backend cuda|host] [--out benchmarks/results] [--quick]

Four measurements, all side by side in one run:

  latency    map and unmap time per page, for each page size: the first map of a page
             (on CUDA: cuMemCreate + cuMemMap + cuMemSetAccess) and a map that reuses a
             kept physical page (cuMemMap + cuMemSetAccess).
  attention  decode attention over KV tensors that live in the pool against the same
             tensors in a plain allocation, same kernel (POD-Attention's, decode-only, on
             CUDA; the PyTorch reference on a CPU), interleaved repeats, medians.
  memory     a batch that grows token by token: mapped bytes against the live tokens'
             bytes, as the planner maps pages (the plot shows vLLM's up-front reservation).
  overlap    the share of page maps a step had to wait for (the critical path), for
             look-ahead depths 0..32 pages, with each step's compute taken by a real decode
             attention launch (CUDA) or a fixed sleep (CPU stand-in, stated in the output).

Writes OUT/vattention-<device>.{json,md} and a plot where matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from vllm_ext.allocators.pages import PagePlanner
from vllm_ext.allocators.pool import VirtualKVPool
from vllm_ext.machine import cpu_model

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16  # Llama-3-8B attention, vLLM's GPU block


def device_name(backend: str) -> str:
    if backend == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model() or platform.machine()}, {os.cpu_count()} cores"


def _timer(backend: str):
    if backend == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return run

    def run(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


# -- latency -----------------------------------------------------------------------------
def latency(backend: str, page_sizes: list[int], pages: int) -> list[dict]:
    return [_latency_row(backend, page, pages) for page in page_sizes]


def _latency_row(backend: str, page: int, pages: int) -> dict:
    kwargs = {"keep_handles": pages} if backend == "cuda" else {}
    timed_pages = range(1, pages + 1)  # page 0 is mapped with the pool

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) / pages

    with VirtualKVPool(1, page * (pages + 1), page_size=page, backend=backend, **kwargs) as pool:
        first = timed(lambda: pool.map(timed_pages))
        # What the zero-fill inside every map costs (CUDA; host pages come zeroed).
        addrs = [pool._base + i * page for i in timed_pages]
        clear = timed(lambda: pool.backend.clear(addrs, page)) if backend == "cuda" else 0.0
        unmap = timed(lambda: pool.unmap(timed_pages).result())
        reuse = timed(lambda: pool.map(timed_pages))
        pool.unmap(timed_pages).result()
        pool.trim()
    return {"page_bytes": page, "first_map_us": 1e6 * first, "reuse_map_us": 1e6 * reuse,
            "clear_us": 1e6 * clear, "unmap_us": 1e6 * unmap, "first_map_GBps": page / first / 1e9}


# -- attention ---------------------------------------------------------------------------
def _decode_batch(decodes: int, ctx: int, kv_from, backend: str, dtype):
    blocks = decodes * -(-ctx // BLOCK) + 1
    shape = (blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k, v = kv_from(shape, dtype)
    k.copy_(torch.randn(shape, dtype=dtype, device=k.device))
    v.copy_(torch.randn(shape, dtype=dtype, device=v.device))
    per = -(-ctx // BLOCK)
    table = (1 + torch.randperm(blocks - 1, device=k.device, dtype=torch.int32))[:decodes * per]
    table = table.view(decodes, per).contiguous()
    q = torch.randn(decodes, HEADS, HEAD_DIM, dtype=dtype, device=k.device)
    lens = torch.full((decodes,), ctx, dtype=torch.int32, device=k.device)
    qsl = torch.arange(decodes + 1, dtype=torch.int32, device=k.device)
    return q, k, v, table, lens, qsl


def _attention_fn(backend: str):
    if backend == "cuda":
        from vllm_ext.kernels import pod_attention
        return pod_attention
    from vllm_ext.kernels.reference import pod_attention
    return pod_attention


def attention(backend: str, decodes: int, ctx: int, repeats: int) -> dict:
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    dev = "cuda" if backend == "cuda" else "cpu"
    elem = torch.tensor([], dtype=dtype).element_size()
    blocks = decodes * -(-ctx // BLOCK) + 1
    nbytes = blocks * BLOCK * KV_HEADS * HEAD_DIM * elem
    pool = VirtualKVPool(2, nbytes, backend=backend)  # layer 0: keys, layer 1: values
    pool.map(range(1, pool.num_pages))  # page 0 is mapped with the pool

    def from_pool(shape, dtype):
        return tuple(pool.layer(i).view(dtype).view(shape) for i in range(2))

    def plain(shape, dtype):
        return torch.empty(shape, dtype=dtype, device=dev), torch.empty(shape, dtype=dtype,
                                                                         device=dev)

    fn = _attention_fn(backend)
    scale = HEAD_DIM ** -0.5
    runs = {}
    for name, source in (("pool", from_pool), ("plain", plain)):
        q, k, v, table, lens, qsl = _decode_batch(decodes, ctx, source, backend, dtype)
        runs[name] = (q, k, v, table, lens, qsl)
    a, b = runs["pool"], runs["plain"]
    # Same data in both, so the outputs must match bit for bit (same kernel, same inputs).
    b[1].copy_(a[1]), b[2].copy_(a[2])
    args = dict(num_decodes=decodes, scale=scale)
    out_pool = fn(*a, **args)
    out_plain = fn(a[0], b[1], b[2], *a[3:], **args)
    identical = bool(torch.equal(out_pool, out_plain))
    timer = _timer(backend)
    times = {"pool": [], "plain": []}
    for _ in range(3):  # warm-up
        fn(*a, **args), fn(a[0], b[1], b[2], *a[3:], **args)
    for _ in range(repeats):  # interleaved, so drift hits both alike
        times["pool"].append(timer(lambda: fn(*a, **args)))
        times["plain"].append(timer(lambda: fn(a[0], b[1], b[2], *a[3:], **args)))
    med = {k: statistics.median(v) for k, v in times.items()}
    pool.close()  # the views above are not touched again
    return {"decodes": decodes, "context": ctx, "dtype": str(dtype).removeprefix("torch."),
            "pool_ms": 1e3 * med["pool"], "plain_ms": 1e3 * med["plain"],
            "pool_over_plain": med["pool"] / med["plain"], "identical_output": identical,
            "kernel": "pod_attention (Triton)" if backend == "cuda" else "torch reference"}


# -- memory and overlap --------------------------------------------------------------------
def grow(backend: str, batch: int, prompt: int, steps: int, block_bytes: int, page: int,
         premap: int, step_compute, record: bool) -> dict:
    """A batch of `batch` requests, each `prompt` tokens, decoding `steps` tokens together."""
    k = page // block_bytes
    blocks_needed = batch * -(-(prompt + steps) // BLOCK) + 1
    planner = PagePlanner(blocks_needed + k, k, premap=premap, watermark=0)
    kwargs = {"keep_handles": 0} if backend == "cuda" else {}
    pool = VirtualKVPool(1, planner.num_blocks * block_bytes, page_size=page, backend=backend,
                         **kwargs)  # page 0, the planner's first live block's, comes mapped
    held = [0] * batch  # blocks each request holds
    trace = []
    for step in range(steps + 1):
        tokens = prompt + step
        for r in range(batch):
            want = -(-tokens // BLOCK)
            if want > held[r]:
                planner.take(want - held[r])
                held[r] = want
        ops = planner.drain()
        pool.wait(ops.touched)  # look-ahead maps this step's new blocks need
        if ops.map_now:
            pool.map(ops.map_now)
        if ops.map_ahead:
            pool.map_async(ops.map_ahead)
        step_compute()
        if step == 0:  # the prompts' pages: needed at once, nothing could map them ahead
            prompt_stats = pool.stats()
        if record:
            trace.append({"tokens": batch * tokens, "live_bytes": batch * tokens * block_bytes // BLOCK,
                          "mapped_bytes": pool.mapped_bytes})
    pool.wait()
    s = pool.stats()
    pool.close()
    maps = s.maps - prompt_stats.maps
    critical = s.critical_maps - prompt_stats.critical_maps
    return {"premap": premap, "prompt_maps": prompt_stats.maps, "maps": maps,
            "critical_maps": critical, "critical_share": critical / max(maps, 1),
            "critical_wait_ms": 1e3 * (s.critical_wait_seconds - prompt_stats.critical_wait_seconds),
            "trace": trace}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--backend", choices=("cuda", "host"),
                    default="cuda" if torch.cuda.is_available() else "host")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    cuda = args.backend == "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = device_name(args.backend)
    result: dict = {"device": name, "backend": args.backend, "torch": torch.__version__}

    sizes = [2 << 20, 4 << 20, 8 << 20, 32 << 20] if cuda else [64 << 10, 256 << 10, 2 << 20]
    result["latency"] = latency(args.backend, sizes, pages=16 if args.quick else 64)
    print("latency", json.dumps(result["latency"], indent=1))

    shapes = [(64, 4096), (256, 2048), (16, 32768)] if cuda else [(8, 512)]
    if args.quick:
        shapes = shapes[:1]
    result["attention"] = [attention(args.backend, d, c, repeats=50 if cuda else 15)
                           for d, c in shapes]
    print("attention", json.dumps(result["attention"], indent=1))

    # A KV block of Llama-3-8B in one layer (bf16): 16 tokens x 8 heads x 128 x 2 (K,V) x 2 B.
    block_bytes = BLOCK * KV_HEADS * HEAD_DIM * 2 * 2
    page = sizes[0]
    batch, prompt, steps = (64, 1000, 300) if cuda else (16, 200, 120)
    if cuda:
        dq, dk, dv, dt, dl, ds = _decode_batch(batch, prompt, lambda s, d: (
            torch.empty(s, dtype=d, device="cuda"), torch.empty(s, dtype=d, device="cuda")),
            "cuda", torch.bfloat16)
        fn = _attention_fn("cuda")

        def compute():  # one decode step's attention for one layer, as the step's stand-in
            fn(dq, dk, dv, dt, dl, ds, num_decodes=batch, scale=HEAD_DIM ** -0.5)
            torch.cuda.synchronize()
        compute_note = "one decode attention launch per step (Llama-3-8B heads, 1 layer)"
    else:
        def compute():
            time.sleep(0.002)
        compute_note = "a 2 ms sleep per step (CPU stand-in for compute)"
    result["memory"] = grow(args.backend, batch, prompt, steps, block_bytes, page, 2, compute,
                            record=True)
    result["overlap"] = [{k: v for k, v in grow(args.backend, batch, prompt, steps, block_bytes,
                                                 page, d, compute, record=False).items()
                          if k != "trace"} for d in (0, 2, 8, 32)]
    result["overlap_compute"] = compute_note
    print("overlap", json.dumps(result["overlap"], indent=1))

    tag = name.replace(" ", "-").replace("/", "-") if cuda else "cpu"
    (out / f"vattention-{tag}.json").write_text(json.dumps(result, indent=1))
    (out / f"vattention-{tag}.md").write_text(report_md(result, page, block_bytes))
    plot(result, out / f"vattention-{tag}.png", page)
    print(f"wrote {out}/vattention-{tag}.*")


def report_md(r: dict, page: int, block_bytes: int) -> str:
    lines = [f"# vAttention KV pool on {r['device']} ({r['backend']} backend, torch {r['torch']})",
             "", "## Map and unmap latency per page", "",
             "Both maps include zeroing the page (its share is the zero-fill column).", "",
             "| page | first map (us) | map reusing a kept page (us) | zero-fill (us) | unmap (us) "
             "| first map GB/s |",
             "|---|---|---|---|---|---|"]
    for row in r["latency"]:
        lines.append(f"| {row['page_bytes'] >> 10} KiB | {row['first_map_us']:.1f} | "
                     f"{row['reuse_map_us']:.1f} | {row.get('clear_us', 0.0):.1f} | "
                     f"{row['unmap_us']:.1f} | {row['first_map_GBps']:.2f} |")
    if r["backend"] == "host":
        lines += ["", "On the host backend no physical pages are kept between maps: both map "
                  "columns fault fresh pages in (the second with warm caches)."]
    lines += ["", "## Decode attention: pool tensors vs a plain allocation (same kernel)", "",
              "| decodes | context | dtype | pool ms | plain ms | pool / plain | same output |",
              "|---|---|---|---|---|---|---|"]
    for row in r["attention"]:
        lines.append(f"| {row['decodes']} | {row['context']} | {row['dtype']} | "
                     f"{row['pool_ms']:.3f} | {row['plain_ms']:.3f} | "
                     f"{row['pool_over_plain']:.3f} | {row['identical_output']} |")
    trace = r["memory"]["trace"]
    last = trace[-1]
    lines += ["", f"## Memory against live tokens (pages of {page >> 10} KiB per layer, blocks of "
              f"{block_bytes >> 10} KiB, look-ahead 2)", "",
              f"At the end: {last['tokens']} tokens, live {last['live_bytes'] / 2**20:.1f} MiB, "
              f"mapped {last['mapped_bytes'] / 2**20:.1f} MiB "
              f"({last['mapped_bytes'] / max(last['live_bytes'], 1):.2f}x live); peak ratio "
              f"{max(t['mapped_bytes'] / max(t['live_bytes'], 1) for t in trace):.2f}x.", "",
              f"## Map calls on the critical path in the decode steps ({r['overlap_compute']})",
              "", "The prompts' pages are all needed in the first step and are left out "
              "(they are mapped synchronously whatever the look-ahead).", "",
              "| look-ahead pages | prompt pages | decode pages mapped | waited for | share | "
              "wait ms |", "|---|---|---|---|---|---|"]
    for row in r["overlap"]:
        lines.append(f"| {row['premap']} | {row['prompt_maps']} | {row['maps']} | "
                     f"{row['critical_maps']} | "
                     f"{100 * row['critical_share']:.1f}% | {row['critical_wait_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path, page: int) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    trace = r["memory"]["trace"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [t["tokens"] for t in trace]
    ax.plot(xs, [t["live_bytes"] / 2**20 for t in trace], label="live KV")
    ax.plot(xs, [t["mapped_bytes"] / 2**20 for t in trace], label="mapped (vattention)")
    ax.set_xlabel("tokens in the batch")
    ax.set_ylabel("MiB (one layer)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"KV memory follows tokens ({page >> 10} KiB pages)\n{r['device']}",
                 fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

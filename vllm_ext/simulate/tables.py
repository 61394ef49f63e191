"""GPU operator timings profiled by Vidur (MIT; see data/README.md), as this package ships them.

The source tables hold min/max/mean/median/std per operator for every (tokens, TP size)
point; the simulator needs only the medians, so `build` keeps those, one gzipped CSV
per GPU and model, plus the single-node all-reduce times. `load_*` read them back.

    python -m vllm_ext.simulate.tables /path/to/vidur-profiles   # rebuild data/
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import sys
from pathlib import Path

DATA = Path(__file__).parent / "data"

# One transformer layer's token-parallel operators, as the source names them.
OPERATORS = ("emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
             "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
SHAPE_COLUMNS = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size")

# (gpu, model) -> the source file under compute/; cluster -> the one under network/.
COMPUTE = {("a100", "llama-3-8b"): "a100/meta-llama/Meta-Llama-3-8B",
           ("a100", "llama-2-7b"): "a100/meta-llama/Llama-2-7b-hf",
           ("h100", "llama-2-7b"): "h100/meta-llama/Llama-2-7b-hf",
           ("h100", "llama-2-70b"): "h100/meta-llama/Llama-2-70b-hf"}
NETWORK = {"a100": "a100_dgx", "h100": "h100_dgx"}


def _write_gz(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    # mtime=0: rebuilding the same data gives the same bytes.
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(buf.getvalue().encode())


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _read_gz(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt") as f:
        return list(csv.DictReader(f))


def build(source: Path, out: Path = DATA) -> list[Path]:
    """Write the shipped tables from a copy of Vidur's `data/profiling/` files."""
    written = []
    for (gpu, model), rel in COMPUTE.items():
        rows = _read_csv(source / "compute" / rel / "mlp.csv")
        shape = [rows[0][c] for c in SHAPE_COLUMNS]
        table = sorted(
            [int(r["num_tokens"]), int(r["num_tensor_parallel_workers"]),
             *(f"{float(r[f'time_stats.{op}.median']):.5g}" for op in OPERATORS)] for r in rows)
        path = out / f"{gpu}-{model}.csv.gz"
        # The shape repeats on every row (gzip makes that free): one plain table.
        _write_gz(path, ["num_tokens", "tp", *(f"{op}_ms" for op in OPERATORS), *SHAPE_COLUMNS],
                  [[*t, *shape] for t in table])
        written.append(path)
    for gpu, cluster in NETWORK.items():
        rows = _read_csv(source / "network" / cluster / "all_reduce.csv")
        # One node: every worker on the same NVLink/NVSwitch fabric.
        table = sorted((int(r["num_workers"]), int(r["size"]),
                        f"{float(r['time_stats.all_reduce.median']):.5g}")
                       for r in rows if r["num_workers"] == r["devices_per_node"])
        path = out / f"{gpu}-all_reduce.csv.gz"
        _write_gz(path, ["workers", "bytes", "median_ms"], [list(t) for t in table])
        written.append(path)
    return written


@functools.cache
def load_compute(gpu: str, model: str) -> tuple[dict[str, int], dict[int, list[tuple[int, tuple[float, ...]]]]]:
    """(model shape columns, {tp: [(tokens, per-operator medians in ms)] by tokens})."""
    rows = _read_gz(DATA / f"{gpu}-{model}.csv.gz")
    shape = {c: int(rows[0][c]) for c in SHAPE_COLUMNS}
    by_tp: dict[int, list[tuple[int, tuple[float, ...]]]] = {}
    for r in rows:
        by_tp.setdefault(int(r["tp"]), []).append(
            (int(r["num_tokens"]), tuple(float(r[f"{op}_ms"]) for op in OPERATORS)))
    return shape, {tp: sorted(points) for tp, points in by_tp.items()}


@functools.cache
def load_all_reduce(gpu: str) -> dict[int, list[tuple[int, float]]]:
    """{workers: [(message bytes, median ms)] by size}."""
    out: dict[int, list[tuple[int, float]]] = {}
    for r in _read_gz(DATA / f"{gpu}-all_reduce.csv.gz"):
        out.setdefault(int(r["workers"]), []).append((int(r["bytes"]), float(r["median_ms"])))
    return {w: sorted(points) for w, points in out.items()}


if __name__ == "__main__":
    for p in build(Path(sys.argv[1])):
        print(p, p.stat().st_size)

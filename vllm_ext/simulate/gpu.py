"""A GPU's step time from profiled operator tables and a stated attention model.

A step of T tokens (prefill chunks and decodes together) costs

    overhead                                   a stated per-step cost (scheduling, input
                                               preparation, sampling), not profiled
  + embedding(T)                               profiled, once
  + L x [ token-parallel ops(T)                profiled: norms, QKV, rotary, output
                                               projection, MLP, two residual adds
        + attention(step)                      modelled, below
        + 2 all-reduces of T x d x 2 bytes ]   profiled, with tensor parallelism
  + LM head over the sampled tokens            modelled as a roofline

Profiled times are the median of Vidur's tables (see data/README.md), interpolated
linearly in T between profiled points. Attention, which those tables lack, is a
roofline per layer and rank:

  prefill: 4 x head_dim x heads x sum_i P_i (C_i + P_i / 2) FLOPs at a fraction of
           the GPU's peak (a chunk of P_i queries after C_i earlier tokens)
  decode:  the KV read, 2 x kv_heads x head_dim x 2 bytes per context token, at a
           fraction of the GPU's memory bandwidth

Every number that is assumed rather than profiled is in `assumptions()`, which the
simulator's report prints.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from vllm_ext.schedulers.latency import StepShape
from vllm_ext.simulate import tables

GiB = 1 << 30
BYTES = 2  # bf16/fp16 weights, activations and KV


@dataclass(frozen=True, slots=True)
class GpuSpec:
    name: str
    peak_tflops: float  # dense bf16 tensor-core peak
    bandwidth_gbs: float  # HBM
    memory_gib: float
    # What `vllm serve` picks on this GPU when no --max-num-batched-tokens or
    # --max-num-seqs is given (vLLM's EngineArgs.get_batch_defaults; A100s are kept
    # at the smaller pair on purpose there). tests/test_simulate_gpu.py checks them.
    serve_max_num_batched_tokens: int
    serve_max_num_seqs: int


# Datasheet peaks of the SXM 80 GB parts the tables were profiled on.
GPUS = {
    "a100": GpuSpec("A100-SXM4-80GB", 312.0, 2039.0, 80.0, 2048, 256),
    "h100": GpuSpec("H100-SXM5-80GB", 989.0, 3350.0, 80.0, 8192, 1024),
}


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    layers: int
    heads: int
    kv_heads: int
    hidden: int
    intermediate: int
    vocab: int
    max_position: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def weight_bytes(self) -> int:
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.hidden ** 2
        mlp = 3 * self.hidden * self.intermediate  # gated: up, gate, down
        return BYTES * (self.layers * (attn + mlp) + 2 * self.vocab * self.hidden)

    def kv_bytes_per_token(self, tp: int) -> int:
        """K and V of one token over every layer, on one tensor-parallel rank."""
        return 2 * self.layers * max(1, self.kv_heads // tp) * self.head_dim * BYTES


# From the models' published configs; the tables' own shape columns are checked on load.
SHAPES = {
    "llama-3-8b": ModelShape("Meta-Llama-3-8B", 32, 32, 8, 4096, 14336, 128256, 8192),
    "llama-2-7b": ModelShape("Llama-2-7b-hf", 32, 32, 32, 4096, 11008, 32000, 4096),
    "llama-2-70b": ModelShape("Llama-2-70b-hf", 80, 64, 8, 8192, 28672, 32000, 4096),
}
PROFILED = {gpu: sorted(m for g, m in tables.COMPUTE if g == gpu) for gpu in GPUS}


@dataclass(frozen=True, slots=True)
class GpuAssumptions:
    """What the tables do not say, with defaults a report states."""

    step_overhead_ms: float = 2.0
    attn_flops_fraction: float = 0.5  # FlashAttention-2's forward runs at ~50-70% of peak
    attn_bandwidth_fraction: float = 0.7  # paged KV reads of decodes
    kv_memory_gib: float | None = None  # None: what vLLM would leave (kv_memory_default)


class GpuError(ValueError):
    """A GPU, model shape or setting the profiled data cannot answer for."""


class _Curve:
    """A profiled time (ms) as a function of one size, linear between profiled points
    and beyond the last two. Repeated points are averaged, and a point below an
    earlier one (timing noise: more work never takes less time) is raised to it."""

    def __init__(self, points: Sequence[tuple[int, float]]) -> None:
        merged: dict[int, list[float]] = {}
        for x, y in points:
            merged.setdefault(x, []).append(y)
        self.xs = sorted(merged)
        self.ys = list(itertools.accumulate((sum(merged[x]) / len(merged[x]) for x in self.xs),
                                            max))
        if len(self.xs) < 2:
            raise GpuError("a profiled curve needs at least two points")

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


class GpuStepTime:
    """Step time of one model on one GPU (tensor-parallel over `tp` of them)."""

    def __init__(self, gpu: str, model: str, tp: int = 1,
                 assumptions: GpuAssumptions = GpuAssumptions()) -> None:
        if gpu not in GPUS:
            raise GpuError(f"--gpu {gpu!r}: profiled GPUs are {', '.join(sorted(GPUS))}")
        if model not in PROFILED[gpu]:
            raise GpuError(f"--model-shape {model!r} has no {gpu} profile; profiled on {gpu}: "
                           f"{', '.join(PROFILED[gpu])}")
        shape_cols, by_tp = tables.load_compute(gpu, model)
        if tp not in by_tp:
            raise GpuError(f"--tp {tp}: {gpu} {model} was profiled at TP {sorted(by_tp)}")
        self.gpu, self.spec, self.tp, self.a = gpu, GPUS[gpu], tp, assumptions
        self.shape = SHAPES[model]
        s = self.shape
        # The vocabulary is left out: the tables' runs padded it, and no profiled
        # operator but the embedding lookup depends on it.
        want = {"n_head": s.heads, "n_kv_head": s.kv_heads, "n_embd": s.hidden,
                "n_expanded_embd": s.intermediate}
        if any(shape_cols[k] != v for k, v in want.items()):
            raise GpuError(f"{model}: shape {want} differs from the profiled {shape_cols}")
        if s.kv_heads % tp and tp % s.kv_heads:
            raise GpuError(f"--tp {tp} does not divide {model}'s {s.kv_heads} KV heads")
        # Operator 0 is the embedding, counted once per step rather than per layer;
        # a layer has two norms (1, 5) and two residual adds (9).
        self._emb = _Curve([(t, ops[0]) for t, ops in by_tp[tp]])
        self._layer = _Curve([(t, sum(ops[1:]) + ops[9]) for t, ops in by_tp[tp]])
        self._all_reduce = None
        if tp > 1:
            reduce = tables.load_all_reduce(gpu).get(tp)
            if reduce is None:
                raise GpuError(f"--tp {tp}: no {gpu} all-reduce profile for {tp} workers")
            self._all_reduce = _Curve(reduce)
        self._flops = self.spec.peak_tflops * 1e12 * assumptions.attn_flops_fraction
        self._bw = self.spec.bandwidth_gbs * 1e9 * assumptions.attn_bandwidth_fraction
        heads = s.heads // tp
        self._prefill_flops_per_unit = 4 * s.head_dim * heads  # per query-key pair
        self._kv_bytes_per_token_layer = 2 * max(1, s.kv_heads // tp) * s.head_dim * BYTES

    @property
    def name(self) -> str:
        return f"{self.spec.name} x{self.tp}, {self.shape.name} (Vidur's tables + attention model)"

    def __call__(self, shape: StepShape) -> float:
        return self.breakdown(shape)["total"]

    def breakdown(self, shape: StepShape) -> dict[str, float]:
        """Seconds per part of the step."""
        s = self.shape
        tokens = sum(n for n, _ in shape.chunks) + len(shape.decode_contexts)
        if tokens == 0:
            return {"overhead": self.a.step_overhead_ms / 1e3, "total": self.a.step_overhead_ms / 1e3}
        linear = (self._emb(tokens) + s.layers * self._layer(tokens)) / 1e3
        pairs = sum(n * (c + n / 2) for n, c in shape.chunks)
        prefill_attn = s.layers * self._prefill_flops_per_unit * pairs / self._flops
        # Decodes read their whole context; prefill chunks their earlier context too.
        context = sum(shape.decode_contexts) + sum(c for _, c in shape.chunks)
        read_attn = s.layers * self._kv_bytes_per_token_layer * context / self._bw
        comm = 0.0
        if self._all_reduce is not None:
            size = tokens * s.hidden * BYTES
            comm = 2 * s.layers * self._all_reduce(size) / 1e3
        # Logits only for the rows sampled: every decode and every chunk (vLLM samples
        # the last row of each scheduled request, and drops a partial prefill's token).
        rows = len(shape.decode_contexts) + len(shape.chunks)
        head = max(2 * rows * s.hidden * s.vocab / self.tp / (self.spec.peak_tflops * 1e12 * 0.7),
                   s.hidden * s.vocab * BYTES / self.tp / (self.spec.bandwidth_gbs * 1e9 * 0.8))
        parts = {"overhead": self.a.step_overhead_ms / 1e3, "linear": linear,
                 "prefill_attention": prefill_attn, "kv_read": read_attn, "all_reduce": comm,
                 "lm_head": head}
        parts["total"] = sum(parts.values())
        return parts

    def kv_memory_default(self) -> float:
        """GiB per GPU left for KV, as vLLM would size it (assumed): 90% of memory
        (--gpu-memory-utilization 0.9), less this rank's weights and 2 GiB for
        activations and CUDA graphs."""
        weights = self.shape.weight_bytes() / self.tp / GiB
        return 0.9 * self.spec.memory_gib - weights - 2.0

    def kv_memory_note(self) -> str:
        if self.a.kv_memory_gib is not None:
            return f"{self.a.kv_memory_gib:g} GiB per GPU (--kv-memory)"
        return (f"{self.kv_memory_default():.1f} GiB per GPU: 90% of {self.spec.memory_gib:g} "
                f"GiB less {self.shape.weight_bytes() / self.tp / GiB:.1f} GiB of weights and "
                f"2 GiB for activations (assumed)")

    def num_blocks(self, block_size: int) -> int:
        gib = self.a.kv_memory_gib if self.a.kv_memory_gib is not None else self.kv_memory_default()
        if gib <= 0:
            raise GpuError(f"{self.shape.name} on {self.tp} x {self.spec.name} leaves no memory "
                           f"for KV ({gib:.1f} GiB); raise --tp or give --kv-memory")
        return int(gib * GiB // (block_size * self.shape.kv_bytes_per_token(self.tp)))

    def assumptions(self) -> list[str]:
        a, s = self.a, self.spec
        return [
            f"GPU: {self.tp} x {s.name}, {s.peak_tflops:g} TFLOPS dense bf16 peak, "
            f"{s.bandwidth_gbs:g} GB/s HBM (datasheet).",
            f"Token-parallel operators (embedding, norms, QKV, rotary, output projection, MLP, "
            f"residual adds) and all-reduces: medians of Vidur's {self.gpu.upper()} profile of "
            f"{self.shape.name} (MIT; vllm_ext/simulate/data), linear between profiled token "
            f"counts.",
            f"Attention (not profiled): prefill at {a.attn_flops_fraction:.0%} of peak FLOPs, "
            f"KV reads at {a.attn_bandwidth_fraction:.0%} of HBM bandwidth (assumed).",
            "LM head over the sampled rows: a roofline at 70% of peak FLOPs / 80% of bandwidth "
            "(assumed).",
            f"Per-step overhead on the device's side (input preparation, launches, "
            f"sampling): {a.step_overhead_ms:g} ms (assumed; --step-overhead-ms). The "
            f"scheduler's own host time is timed, not assumed (below).",
            f"vLLM's serve defaults on this GPU where an arm gives none: "
            f"--max-num-batched-tokens {s.serve_max_num_batched_tokens}, --max-num-seqs "
            f"{s.serve_max_num_seqs}.",
        ]

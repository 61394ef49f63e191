"""POD-Attention: one Triton launch for a hybrid batch of decodes and prefills over
vLLM's paged KV cache.

A prefill tile (one head, BLOCK_M query tokens of one prompt) is compute-bound; a
decode tile (one KV head's query group of one request, one split of its context) is
memory-bound. Every program of the launch takes a ticket and picks its kind of work
from it, so that work of both kinds runs side by side on every SM:

- on CUDA, the ticket comes from a per-SM counter (read %smid), so each SM gets
  prefill and decode tiles in the planned ratio whatever order the hardware
  dispatches programs in;
- elsewhere (TRITON_INTERPRET=1 on a CPU), the ticket is the program id.

The kind then hands out its next tile from a global counter; a program whose kind
has run out takes a tile of the other kind. Decodes too few to fill the GPU are split
along their context; the last split of a group to finish merges the splits by their
log-sum-exp. All counters are reset by the launch itself, so buffers are reused
across launches (and CUDA-graph captures) without zeroing.

plan() (per batch, the attention metadata builder's job) / pod_attention() (per layer).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_ext.kernels.limits import SUPPORTED_HEAD_DIMS

LOG2E = 1.4426950408889634
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # softmax runs in log2 units; LSE out in ln
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True, slots=True)
class Tile:
    block_m: int  # query rows of a prefill tile (the plan's work-list granularity)
    block_n: int  # keys per inner step, prefill and decode
    num_warps: int


def tile_for(head_dim: int, dtype: torch.dtype, sharded: bool = False) -> Tile:
    """Tile sizes that build without register spills for sm_80, sm_90 and sm_100
    (kernels/compile_check.py, benchmarks/results/kernels-compile.md). With 4 warps
    ptxas spills from head size 80 up (a 64-row fp32 accumulator of 128 columns alone
    takes 64 of a thread's 255 registers); with 8 warps it caps itself near 128
    registers on sm_100 and spills at 128 padded columns with 32-key steps, and at
    head size 256 or fp32 from 128 columns unless tiles shrink to 32 rows and 16-key
    steps. The KV-shard variant (`sharded`) needs smaller fp32 tiles still."""
    dim_p = _next_pow2(head_dim)
    fp32 = dtype == torch.float32
    if sharded and fp32:
        return Tile(16, 16, 8) if dim_p >= 256 else Tile(64 if dim_p <= 64 else 32, 16, 8)
    if dim_p >= 256 or (fp32 and dim_p >= 128):
        return Tile(32, 16, 8)
    if dim_p == 128:
        return Tile(64, 16, 8)
    return Tile(64, 32, 8)


@triton.jit
def _decode_tile(t, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, bt_ptr, seq_lens_ptr, qsl_ptr,
                 part_o_ptr, part_lse_ptr, merge_ptr, qk_scale, cp_size, cp_rank, cp_interleave,
                 s_qt, s_qh, s_kb, s_ks, s_kh, s_ot, s_oh, s_bt,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                 GROUP: tl.constexpr, GROUP_P: tl.constexpr, SPLITS: tl.constexpr,
                 BLOCK_N: tl.constexpr, DIM_P: tl.constexpr, IEEE: tl.constexpr,
                 SHARDED: tl.constexpr):
    # One request's query heads that share a KV head, over one split of its context:
    # the group's rows are padded to a tensor-core tile, so each K/V row is read once.
    seq = t // (NUM_KV_HEADS * SPLITS)
    kvh = (t // SPLITS) % NUM_KV_HEADS
    split = t % SPLITS
    ctx = tl.load(seq_lens_ptr + seq)
    if SHARDED:  # a decode sees its whole past: every key of the shard, in local indices
        ctx = _local_length(ctx, cp_size, cp_rank, cp_interleave)
    tok = tl.load(qsl_ptr + seq)
    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, DIM_P)
    gmask, dmask = g < GROUP, d < HEAD_DIM
    heads = kvh * GROUP + g
    out_mask = gmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + tok * s_qt + heads[:, None] * s_qh + d[None, :], mask=out_mask, other=0.0)
    chunk = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N  # whole steps per split
    lo = split * chunk
    hi = tl.minimum(lo + chunk, ctx)
    m = tl.full([GROUP_P], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, DIM_P], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < hi
        k, v = _load_kv(k_ptr, v_ptr, bt_ptr + seq * s_bt, n, nmask, kvh, d, dmask, s_kb, s_ks,
                        s_kh, BLOCK_SIZE)
        m, l, acc = _online_softmax_step(q, k, v, m, l, acc, nmask[None, :], qk_scale, IEEE,
                                         SHARDED)
    if SPLITS == 1:
        if SHARDED:  # a shard holding none of the past: output 0, LSE -inf
            l = tl.where(l > 0, l, 1.0)
        tl.store(o_ptr + tok * s_ot + heads[:, None] * s_oh + d[None, :],
                 (acc / l[:, None]).to(o_ptr.dtype.element_ty), mask=out_mask)
        tl.store(lse_ptr + tok * (NUM_KV_HEADS * GROUP) + heads, (m + tl.log2(l)) * LN2,
                 mask=gmask)
    else:
        # This split's normalised output and LSE (log2 units); the last split of the
        # group to finish merges them all.
        safe_l = tl.where(l > 0, l, 1.0)  # an empty split: LSE -inf, weight 0
        row = (seq * NUM_KV_HEADS * GROUP + heads) * SPLITS
        tl.store(part_lse_ptr + row + split, m + tl.log2(safe_l), mask=gmask)
        tl.store(part_o_ptr + (row + split)[:, None] * DIM_P + d[None, :], acc / safe_l[:, None],
                 mask=out_mask)
        # The counter's atomic is issued by one thread: the CTA barrier orders every
        # thread's partial stores before it, and its release (cumulative through the
        # barrier) publishes them to the program that finishes last, whose acquire and
        # L2-only (.cg) loads then see them all.
        tl.debug_barrier()
        done = tl.atomic_add(merge_ptr + seq * NUM_KV_HEADS + kvh, 1, sem="acq_rel", scope="gpu")
        if done == SPLITS - 1:
            top = tl.full([GROUP_P], float("-inf"), tl.float32)
            total = tl.zeros([GROUP_P], tl.float32)
            o = tl.zeros([GROUP_P, DIM_P], tl.float32)
            for sp in range(SPLITS):
                lse_sp = tl.load(part_lse_ptr + row + sp, mask=gmask, other=float("-inf"),
                                 cache_modifier=".cg")
                o_sp = tl.load(part_o_ptr + (row + sp)[:, None] * DIM_P + d[None, :],
                               mask=out_mask, other=0.0, cache_modifier=".cg")
                new_top = tl.maximum(top, lse_sp)
                new_top = tl.where(new_top == float("-inf"), 0.0, new_top)
                scale_old = tl.exp2(top - new_top)
                w = tl.exp2(lse_sp - new_top)
                o = o * scale_old[:, None] + w[:, None] * o_sp
                total = total * scale_old + w
                top = new_top
            if SHARDED:  # a shard holding none of the past: output 0, LSE -inf
                seen = total > 0
                total = tl.where(gmask & seen, total, 1.0)
                top = tl.where(seen, top, float("-inf"))
            else:
                total = tl.where(gmask, total, 1.0)  # padding rows: no warnings from 0/0
            tl.store(o_ptr + tok * s_ot + heads[:, None] * s_oh + d[None, :],
                     (o / total[:, None]).to(o_ptr.dtype.element_ty), mask=out_mask)
            tl.store(lse_ptr + tok * (NUM_KV_HEADS * GROUP) + heads,
                     (top + tl.log2(total)) * LN2, mask=gmask)
            tl.atomic_xchg(merge_ptr + seq * NUM_KV_HEADS + kvh, 0)  # ready for the next launch


@triton.jit
def _local_length(length, cp_size, cp_rank, cp_interleave):
    """How many of a sequence's positions 0..length-1 this KV shard holds (kernels/kvp.py;
    all of them without KV-cache parallelism: size 1, rank 0, interleave 1)."""
    span = cp_size * cp_interleave
    rest = length % span - cp_rank * cp_interleave
    return (length // span) * cp_interleave + tl.minimum(tl.maximum(rest, 0), cp_interleave)


@triton.jit
def _global_position(n, cp_size, cp_rank, cp_interleave):
    """The sequence position of the shard's local KV index n."""
    return ((n // cp_interleave) * cp_size + cp_rank) * cp_interleave + n % cp_interleave


@triton.jit
def _load_kv(k_ptr, v_ptr, table_ptr, n, nmask, kvh, d, dmask, s_kb, s_ks, s_kh,
             BLOCK_SIZE: tl.constexpr):
    """K and V rows of positions `n` of one sequence, through its block table."""
    blk = tl.load(table_ptr + n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
    off = blk[:, None] * s_kb + (n % BLOCK_SIZE)[:, None] * s_ks + kvh * s_kh + d[None, :]
    mask = nmask[:, None] & dmask[None, :]
    return tl.load(k_ptr + off, mask=mask, other=0.0), tl.load(v_ptr + off, mask=mask, other=0.0)


@triton.jit
def _online_softmax_step(q, k, v, m, l, acc, visible, qk_scale, IEEE: tl.constexpr,
                         UNSEEN_ROWS: tl.constexpr):
    """One K/V block of flash attention: scores, running max and sum, rescaled output.
    IEEE: exact float32 dots (float32 inputs, or bf16 under the interpreter, whose bf16
    dot is wrong in Triton 3.9); otherwise the input dtype's tensor-core dot."""
    if IEEE:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(visible, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_ref = m_new
    if UNSEEN_ROWS:
        # A row that has seen no key yet (a KV shard holding none of its past) keeps
        # m = -inf; subtracting 0 instead keeps its weights 0 rather than NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    if IEEE:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l, acc * alpha[:, None] + pv


@triton.jit
def _prefill_tile(t, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, work_ptr,
                  qk_scale, cp_size, cp_rank, cp_interleave,
                  s_qt, s_qh, s_kb, s_ks, s_kh, s_ot, s_oh, s_bt,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_HEADS: tl.constexpr,
                  GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  DIM_P: tl.constexpr, IEEE: tl.constexpr, SHARDED: tl.constexpr):
    entry = t // NUM_HEADS
    h = t % NUM_HEADS
    kvh = h // GROUP
    seq = tl.load(work_ptr + 2 * entry)
    q_off = tl.load(work_ptr + 2 * entry + 1)  # first query token of this tile, in its prompt
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    ctx = tl.load(seq_lens_ptr + seq)
    mi = q_off + tl.arange(0, BLOCK_M)
    mmask = mi < q_len
    pos = ctx - q_len + mi  # each query token's position in its sequence
    d = tl.arange(0, DIM_P)
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + mi)[:, None] * s_qt + h * s_qh + d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_P], tl.float32)
    # Causal: nothing past this tile's last query position is visible; the keys are the
    # shard's local indices below that, each at its own position in the sequence.
    kv_end = tl.minimum(ctx, ctx - q_len + q_off + BLOCK_M)
    if SHARDED:
        kv_end = _local_length(kv_end, cp_size, cp_rank, cp_interleave)
    for start in range(0, kv_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < kv_end
        k, v = _load_kv(k_ptr, v_ptr, bt_ptr + seq * s_bt, n, nmask, kvh, d, dmask, s_kb, s_ks,
                        s_kh, BLOCK_SIZE)
        key_pos = n
        if SHARDED:
            key_pos = _global_position(n, cp_size, cp_rank, cp_interleave)
        visible = (key_pos[None, :] <= pos[:, None]) & nmask[None, :]
        m, l, acc = _online_softmax_step(q, k, v, m, l, acc, visible, qk_scale, IEEE, SHARDED)
    if SHARDED:  # a shard holding none of a row's past: output 0, LSE -inf
        l = tl.where(l > 0, l, 1.0)
    tl.store(o_ptr + (q_start + mi)[:, None] * s_ot + h * s_oh + d[None, :],
             (acc / l[:, None]).to(o_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + (q_start + mi) * NUM_HEADS + h, (m + tl.log2(l)) * LN2, mask=mmask)


# The tile counts and the ticket ratio change with every batch's mix: runtime values,
# never specialized on, so that a new mix does not compile a new kernel.
@triton.jit(do_not_specialize=["num_prefill_tiles", "num_decode_tiles", "ratio_p", "ratio_d",
                               "cp_size", "cp_rank", "cp_interleave"])
def pod_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, bt_ptr, seq_lens_ptr, qsl_ptr,
                         work_ptr, part_o_ptr, part_lse_ptr, merge_ptr, counter_ptr, qk_scale,
                         num_prefill_tiles, num_decode_tiles, ratio_p, ratio_d,
                         cp_size, cp_rank, cp_interleave,
                         s_qt, s_qh, s_kb, s_ks, s_kh, s_ot, s_oh, s_bt,
                         HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                         GROUP: tl.constexpr, GROUP_P: tl.constexpr, SPLITS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         DECODE_BLOCK_N: tl.constexpr, DIM_P: tl.constexpr, IEEE: tl.constexpr,
                         USE_SMID: tl.constexpr, NUM_COUNTERS_P: tl.constexpr,
                         SHARDED: tl.constexpr):
    # SHARDED: the caches hold one rank's share of the KV (kv_shard); a variant of its own,
    # so that the unsharded kernel does none of the shard's index arithmetic.
    # counters: [0] next prefill tile, [1] next decode tile, [2] finished programs,
    # [3 + sm] tickets handed out on each SM.
    if USE_SMID:
        sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32,
                                       is_pure=True, pack=1)
        ticket = tl.atomic_add(counter_ptr + 3 + sm, 1)
    else:
        ticket = tl.program_id(0)
    want_prefill = (ticket % (ratio_p + ratio_d)) < ratio_p
    # Take a tile of the wanted kind; when that kind has run out, one of the other.
    if want_prefill:
        t = tl.atomic_add(counter_ptr + 0, 1)
        is_prefill = t < num_prefill_tiles
        if t >= num_prefill_tiles:
            t = tl.atomic_add(counter_ptr + 1, 1)
    else:
        t = tl.atomic_add(counter_ptr + 1, 1)
        is_prefill = t >= num_decode_tiles
        if t >= num_decode_tiles:
            t = tl.atomic_add(counter_ptr + 0, 1)
    if is_prefill:
        _prefill_tile(t, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, bt_ptr, seq_lens_ptr, qsl_ptr,
                      work_ptr, qk_scale, cp_size, cp_rank, cp_interleave,
                      s_qt, s_qh, s_kb, s_ks, s_kh, s_ot, s_oh, s_bt,
                      HEAD_DIM, BLOCK_SIZE, NUM_HEADS, GROUP, BLOCK_M, BLOCK_N, DIM_P, IEEE,
                      SHARDED)
    else:
        _decode_tile(t, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, bt_ptr, seq_lens_ptr, qsl_ptr,
                     part_o_ptr, part_lse_ptr, merge_ptr, qk_scale, cp_size, cp_rank,
                     cp_interleave, s_qt, s_qh, s_kb, s_ks, s_kh, s_ot, s_oh, s_bt,
                     HEAD_DIM, BLOCK_SIZE, NUM_KV_HEADS, GROUP, GROUP_P, SPLITS,
                     DECODE_BLOCK_N, DIM_P, IEEE, SHARDED)
    # The last program to finish resets every counter for the next launch.
    finished = tl.atomic_add(counter_ptr + 2, 1, sem="acq_rel")
    if finished == num_prefill_tiles + num_decode_tiles - 1:
        c = tl.arange(0, NUM_COUNTERS_P)
        tl.store(counter_ptr + c, tl.zeros([NUM_COUNTERS_P], tl.int32))


@dataclass(frozen=True)
class PodPlan:
    """Per-batch work list and launch shape, shared by every layer of a step."""

    num_prefill_tiles: int
    num_decode_tiles: int
    prefill_work: torch.Tensor  # int32 [entries, 2]: (sequence, first query token of the tile)
    splits: int
    ratio: tuple[int, int]  # prefill : decode tickets
    block_m: int


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _num_sms(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_decodes: int,
         num_heads: int, num_kv_heads: int, block_m: int = 64,
         decode_splits: int | None = None, device: torch.device | str | None = None) -> PodPlan:
    """Tiles and splits for a batch. Decode splits fill one wave of the GPU when the
    decodes alone would not (none on a CPU unless asked for).

    Pass the host copies of `query_start_loc` and `seq_lens` (vLLM's metadata keeps
    both) and the kernel's `device`: then planning reads no device memory, and the work
    list goes to the device with one copy that does not wait for it."""
    device = torch.device(device) if device is not None else query_start_loc.device
    qsl = query_start_loc.tolist()
    num_seqs = len(qsl) - 1
    if not 0 <= num_decodes <= num_seqs:
        raise ValueError(f"num_decodes={num_decodes} must be within 0..{num_seqs} sequences")
    q_lens = [b - a for a, b in zip(qsl, qsl[1:])]
    if any(n != 1 for n in q_lens[:num_decodes]):
        raise ValueError("the first num_decodes sequences must have exactly one query token each")
    work = [(s, off) for s in range(num_decodes, num_seqs) for off in range(0, q_lens[s], block_m)]
    if decode_splits is None:
        sms = _num_sms(device)
        groups = num_decodes * num_kv_heads
        decode_splits = 1
        if sms and groups and groups < sms:
            longest = max(seq_lens[:num_decodes].tolist())
            decode_splits = max(1, min(sms // groups, longest // 256))
    num_prefill = len(work) * num_heads
    num_decode = num_decodes * num_kv_heads * decode_splits
    # Tickets in proportion to the work, in small whole numbers, so both kinds of
    # tile run from the start of the launch to its end.
    if num_prefill and num_decode:
        g = math.gcd(num_prefill, num_decode)
        rp, rd = num_prefill // g, num_decode // g
        while rp + rd > 16:
            rp, rd = max(1, round(rp / 2)), max(1, round(rd / 2))
    else:
        rp, rd = (1, 0) if num_prefill else (0, 1)
    prefill_work = torch.tensor(work or [(0, 0)], dtype=torch.int32)
    if device.type == "cuda":
        prefill_work = prefill_work.pin_memory().to(device, non_blocking=True)
    else:
        prefill_work = prefill_work.to(device)
    return PodPlan(num_prefill, num_decode, prefill_work, decode_splits, (rp, rd), block_m)


def _interpreted() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class _Workspace:
    """The launch's scratch memory, one per (device, stream), grown as needed and never
    freed: the counters (zero between launches, because the launch that uses them
    leaves them zero) and the split-merge partials. Per stream, because two launches
    in flight on two streams must not share counters; reused, because a launch that
    allocates cannot be captured in a CUDA graph with stable addresses."""

    _all: dict[tuple, "_Workspace"] = {}

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    @classmethod
    def get(cls, device: torch.device) -> "_Workspace":
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        key = (device, stream)
        if key not in cls._all:
            cls._all[key] = cls(device)
        return cls._all[key]

    @classmethod
    def discard(cls, device: torch.device) -> None:
        """After a launch that raised: its counters may be left part-counted. (A CUDA
        fault inside a running kernel is sticky, the context unusable; what can fail and
        leave the process usable is a launch refused before it ran, or the
        interpreter, which runs programs one by one on the host.)"""
        for key in [k for k in cls._all if k[0] == device]:
            del cls._all[key]

    def buffer(self, name: str, n: int, dtype: torch.dtype, zeroed: bool = False) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n:
            make = torch.zeros if zeroed else torch.empty
            buf = make(max(n, 1), dtype=dtype, device=self.device)
            self._buffers[name] = buf
        return buf[:max(n, 1)]


def _check(query, key_cache, value_cache, block_table, seq_lens, query_start_loc, out):
    if query.dim() != 3 or key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError("query must be [tokens, heads, head_dim] and key/value caches "
                         "[blocks, block_size, kv_heads, head_dim] of the same shape")
    head_dim = query.shape[2]
    if head_dim not in SUPPORTED_HEAD_DIMS or key_cache.shape[3] != head_dim:
        raise ValueError(f"head_dim {head_dim} (cache {key_cache.shape[3]}): supported are "
                         f"{SUPPORTED_HEAD_DIMS}")
    if query.dtype not in SUPPORTED_DTYPES or key_cache.dtype != query.dtype:
        raise ValueError(f"dtypes {query.dtype}/{key_cache.dtype}: both one of "
                         f"{[str(d) for d in SUPPORTED_DTYPES]}")
    if query.shape[1] % key_cache.shape[2]:
        raise ValueError(f"{query.shape[1]} query heads is not a multiple of "
                         f"{key_cache.shape[2]} KV heads")
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens),
                    ("query_start_loc", query_start_loc)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if query.stride(2) != 1 or key_cache.stride(3) != 1 or value_cache.stride() != key_cache.stride():
        raise ValueError("head_dim must be contiguous, and the two caches laid out alike")
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype
                            or out.stride(2) != 1):
        raise ValueError("out must match query's shape and dtype")


def pod_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  block_table: torch.Tensor, seq_lens: torch.Tensor,
                  query_start_loc: torch.Tensor, num_decodes: int, scale: float,
                  out: torch.Tensor | None = None, return_lse: bool = False,
                  pod_plan: PodPlan | None = None, kv_shard: tuple[int, int, int] | None = None):
    """Causal attention of a hybrid batch (decodes first) in one launch; see
    vllm_ext.kernels.reference.pod_attention for the exact contract.

    kv_shard=(shards, rank, interleave): the caches hold one rank's share of the KV
    (KV-cache parallelism, vllm_ext.kernels.kvp's layout; seq_lens stay whole-sequence
    lengths); the result is attention over that share, as `kvp.shard_attention`
    computes it: zeros and LSE -inf for a query that sees none of it."""
    _check(query, key_cache, value_cache, block_table, seq_lens, query_start_loc, out)
    shards, rank, interleave = kv_shard or (1, 0, 1)
    if not (shards >= 1 and 0 <= rank < shards and interleave >= 1):
        raise ValueError(f"kv_shard={kv_shard}: needs shards >= 1, 0 <= rank < shards and "
                         f"interleave >= 1")
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    tile = tile_for(head_dim, query.dtype, sharded=shards > 1)
    p = pod_plan or plan(query_start_loc, seq_lens, num_decodes, num_heads, num_kv_heads,
                         block_m=tile.block_m)
    if p.block_m != tile.block_m:
        raise ValueError(f"the plan has {p.block_m}-row prefill tiles; head size {head_dim} in "
                         f"{query.dtype} runs {tile.block_m}-row tiles: make it with "
                         f"plan(..., block_m=tile_for(head_dim, dtype).block_m)")
    out = torch.empty_like(query) if out is None else out
    total = p.num_prefill_tiles + p.num_decode_tiles
    device = query.device
    ws = _Workspace.get(device)
    lse = (torch.empty(num_tokens, num_heads, dtype=torch.float32, device=device) if return_lse
           else ws.buffer("lse", num_tokens * num_heads, torch.float32))
    if total == 0:
        return (out, lse.view(num_tokens, num_heads)) if return_lse else out
    dim_p = _next_pow2(head_dim)
    sms = _num_sms(device)
    counters = ws.buffer("counters", _next_pow2(3 + (sms or 0)), torch.int32, zeroed=True)
    merge = ws.buffer("merge", num_decodes * num_kv_heads, torch.int32, zeroed=True)
    rows = num_decodes * num_heads * p.splits
    part_lse = ws.buffer("part_lse", rows, torch.float32) if p.splits > 1 else lse
    part_o = ws.buffer("part_o", rows * dim_p, torch.float32) if p.splits > 1 else lse
    constants, options = launch_constants(
        head_dim, block_size, num_heads, num_kv_heads, p.splits, query.dtype,
        ieee=query.dtype == torch.float32 or (_interpreted() and query.dtype == torch.bfloat16),
        num_sms=sms, sharded=shards > 1)
    try:
        pod_attention_kernel[(total,)](
            query, key_cache, value_cache, out, lse, block_table, seq_lens, query_start_loc,
            p.prefill_work, part_o, part_lse, merge, counters, scale * LOG2E,
            p.num_prefill_tiles, p.num_decode_tiles, p.ratio[0], p.ratio[1],
            shards, rank, interleave, query.stride(0), query.stride(1), key_cache.stride(0),
            key_cache.stride(1), key_cache.stride(2), out.stride(0), out.stride(1),
            block_table.stride(0),
            **constants, **options)
    except BaseException:
        _Workspace.discard(device)
        raise
    return (out, lse) if return_lse else out


def launch_constants(head_dim: int, block_size: int, num_heads: int, num_kv_heads: int,
                     splits: int, dtype: torch.dtype, ieee: bool,
                     num_sms: int | None, sharded: bool = False) -> tuple[dict, dict]:
    """The kernel's constexprs and launch options for a batch: one place, shared by the
    launcher and the compile check (kernels/compile_check.py), so that what is checked
    is what runs."""
    group = num_heads // num_kv_heads
    tile = tile_for(head_dim, dtype, sharded)
    constants = dict(
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        GROUP=group, GROUP_P=max(16, _next_pow2(group)), SPLITS=splits,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, DECODE_BLOCK_N=tile.block_n,
        DIM_P=_next_pow2(head_dim), IEEE=ieee,
        USE_SMID=num_sms is not None, NUM_COUNTERS_P=_next_pow2(3 + (num_sms or 0)),
        SHARDED=sharded)
    return constants, {"num_warps": tile.num_warps}

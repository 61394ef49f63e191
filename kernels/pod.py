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
across launches without zeroing.

plan() (per batch, the attention metadata builder's job) / pod_attention() (per layer),
over a Workspace that the caller allocates once.

CUDA graphs: a launch reads only the caller's metadata tensors and its Workspace, both
allocated once, and the values it is passed per batch (tile counts, ticket ratio, split
count) depend, for a batch of decodes alone, on nothing but its size, padding included.
So a graph captured for one decode batch size replays every decode batch padded to it:
the kernel reads each request's context length and query span from device memory, splits
a short context fewer ways, and skips the padding requests (they have no query token).

Builds: the constexprs are the model's shape, the dtype, the tiles and the GPU's SM count;
whatever changes from batch to batch is a runtime argument Triton does not specialize on
(RUNTIME_ARGS). One build per model and GPU, a second with KV sharding.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from vllm_ext.kernels.limits import SUPPORTED_HEAD_DIMS

LOG2E = 1.4426950408889634
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # softmax runs in log2 units; LSE out in ln
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The most ways a decode's context is split: bounds the merge loop and the partials a
# Workspace holds. A split takes SPLIT_KEYS keys at least, so a context shorter than
# SPLIT_KEYS * splits uses fewer (the kernel decides, per request, on the device).
MAX_SPLITS = 32
SPLIT_KEYS = 256
# The kernel's arguments that change from batch to batch (or rank to rank), which Triton
# must not specialize on, lest a new value build a new kernel: the tile counts, the
# ticket ratio, the decode split count and the KV shard; and the block table's row
# stride, the engine's longest context in blocks, which no load's alignment depends on.
RUNTIME_ARGS = ("num_prefill_tiles", "num_decode_tiles", "ratio_p", "ratio_d", "splits",
                "split_keys", "cp_size", "cp_rank", "cp_interleave", "s_bt")


@dataclass(frozen=True, slots=True)
class Tile:
    block_m: int  # query rows of a prefill tile (the plan's work-list granularity)
    block_n: int  # keys per inner step, prefill and decode
    num_warps: int


def tile_for(head_dim: int, dtype: torch.dtype, sharded: bool = False) -> Tile:
    """Tile sizes that build without register spills for sm_80, sm_90 and sm_100, as a
    launch builds them (kernels/compile_check.py, benchmarks/results/kernels-compile.md).
    With 4 warps ptxas spills from head size 80 up (a 64-row fp32 accumulator of 128
    columns alone takes 64 of a thread's 255 registers); with 8 warps it caps itself near
    128 registers on sm_100 and spills at 128 padded columns with 32-key steps, and at
    head size 256 or fp32 from 128 columns unless tiles shrink to 32 rows and 16-key
    steps. The KV-shard variant (`sharded`) needs smaller fp32 tiles still. In fp32 with
    masked columns (head size 80 or 96, padded to 128) ptxas on sm_80 keeps 64 or 80
    registers for 16-key steps and spills; 32-key steps it builds in 101."""
    dim_p = _next_pow2(head_dim)
    fp32 = dtype == torch.float32
    if fp32 and dim_p == 128 and head_dim != dim_p:
        return Tile(32, 32, 8)
    if sharded and fp32:
        return Tile(16, 16, 8) if dim_p >= 256 else Tile(64 if dim_p <= 64 else 32, 16, 8)
    if dim_p >= 256 or (fp32 and dim_p >= 128):
        return Tile(32, 16, 8)
    if dim_p == 128:
        return Tile(64, 16, 8)
    return Tile(64, 32, 8)


@triton.jit
def _decode_tile(t, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, bt_ptr, seq_lens_ptr, qsl_ptr,
                 part_o_ptr, part_lse_ptr, merge_ptr, qk_scale, splits, split_keys, cp_size,
                 cp_rank, cp_interleave, s_qt, s_qh, s_kb, s_ks, s_kh, s_ot, s_oh, s_bt,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                 GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_N: tl.constexpr,
                 DIM_P: tl.constexpr, IEEE: tl.constexpr, SHARDED: tl.constexpr):
    # One request's query heads that share a KV head, over one split of its context:
    # the group's rows are padded to a tensor-core tile, so each K/V row is read once.
    seq = t // (NUM_KV_HEADS * splits)
    kvh = (t // splits) % NUM_KV_HEADS
    split = t % splits
    tok = tl.load(qsl_ptr + seq)
    has_query = tl.load(qsl_ptr + seq + 1) > tok  # a CUDA graph's padding request has none
    ctx = tl.load(seq_lens_ptr + seq)
    if SHARDED:  # a decode sees its whole past: every key of the shard, in local indices
        ctx = _local_length(ctx, cp_size, cp_rank, cp_interleave)
    # The plan's split count depends on the batch's size alone (what a graph captured
    # for that size replays); a context too short to give each split `split_keys` keys
    # uses fewer splits, and the programs of the others do nothing.
    used = tl.minimum(tl.maximum(ctx // split_keys, 1), splits)
    if has_query & (split < used):
        g = tl.arange(0, GROUP_P)
        d = tl.arange(0, DIM_P)
        gmask, dmask = g < GROUP, d < HEAD_DIM
        heads = kvh * GROUP + g
        out_mask = gmask[:, None] & dmask[None, :]
        q = tl.load(q_ptr + tok * s_qt + heads[:, None] * s_qh + d[None, :], mask=out_mask,
                    other=0.0)
        chunk = tl.cdiv(tl.cdiv(ctx, used), BLOCK_N) * BLOCK_N  # whole steps per split
        lo = split * chunk
        hi = tl.minimum(lo + chunk, ctx)
        m = tl.full([GROUP_P], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_P], tl.float32)
        acc = tl.zeros([GROUP_P, DIM_P], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            nmask = n < hi
            k, v = _load_kv(k_ptr, v_ptr, bt_ptr + seq * s_bt, n, nmask, kvh, d, dmask, s_kb,
                            s_ks, s_kh, BLOCK_SIZE)
            m, l, acc = _online_softmax_step(q, k, v, m, l, acc, nmask[None, :], qk_scale, IEEE,
                                             SHARDED)
        if used == 1:  # the whole context in this split: its result is the output
            done = 0
            o, total, top = acc, l, m
        else:
            done = _publish(acc, m, l, seq, kvh, split, splits, heads, d, gmask, out_mask,
                            part_o_ptr, part_lse_ptr, merge_ptr, NUM_KV_HEADS, GROUP, DIM_P)
            o, total, top = _merge(seq, kvh, used, splits, heads, d, gmask, out_mask,
                                   part_o_ptr, part_lse_ptr, done == used - 1, NUM_KV_HEADS,
                                   GROUP, GROUP_P, DIM_P)
        if done == used - 1:
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
            if used > 1:
                tl.atomic_xchg(merge_ptr + seq * NUM_KV_HEADS + kvh, 0)  # for the next launch


@triton.jit
def _publish(acc, m, l, seq, kvh, split, splits, heads, d, gmask, out_mask, part_o_ptr,
             part_lse_ptr, merge_ptr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
             DIM_P: tl.constexpr):
    """Store one split's normalised output and LSE (log2 units) and count it done:
    returns how many of its group's splits were done before it."""
    safe_l = tl.where(l > 0, l, 1.0)  # an empty split: LSE -inf, weight 0
    row = (seq * NUM_KV_HEADS * GROUP + heads) * splits + split
    tl.store(part_lse_ptr + row, m + tl.log2(safe_l), mask=gmask)
    tl.store(part_o_ptr + row[:, None] * DIM_P + d[None, :], acc / safe_l[:, None],
             mask=out_mask)
    # The counter's atomic is issued by one thread: the CTA barrier orders every
    # thread's partial stores before it, and its release (cumulative through the
    # barrier) publishes them to the program that finishes last, whose acquire and
    # L2-only (.cg) loads then see them all.
    tl.debug_barrier()
    return tl.atomic_add(merge_ptr + seq * NUM_KV_HEADS + kvh, 1, sem="acq_rel", scope="gpu")


@triton.jit
def _merge(seq, kvh, used, splits, heads, d, gmask, out_mask, part_o_ptr, part_lse_ptr, last,
           NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
           DIM_P: tl.constexpr):
    """The group's `used` splits merged by their LSE, read by the `last` to finish only:
    unnormalised output, its sum of weights and the top LSE (log2 units)."""
    top = tl.full([GROUP_P], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_P], tl.float32)
    o = tl.zeros([GROUP_P, DIM_P], tl.float32)
    if last:
        row = (seq * NUM_KV_HEADS * GROUP + heads) * splits
        for sp in range(used):
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
    return o, total, top


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


@triton.jit
def _ticket_counter(smid, SM_SLOTS: tl.constexpr):
    """The counter that hands out SM `smid`'s tickets: counters 3 .. 3 + SM_SLOTS, one
    per SM (SM_SLOTS, the SM count rounded up to a power of two). PTX promises only
    %smid < %nsmid, and %nsmid may exceed the SM count (ids need not be contiguous), so
    the id is taken modulo SM_SLOTS (a mask): an id past them shares a lower id's
    counter, which interleaves the two SMs' tickets (their ratio holds over the pair)
    and never reaches past the counters."""
    return 3 + (smid & (SM_SLOTS - 1))


@triton.jit(do_not_specialize=RUNTIME_ARGS)
def pod_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, bt_ptr, seq_lens_ptr, qsl_ptr,
                         work_ptr, part_o_ptr, part_lse_ptr, merge_ptr, counter_ptr, qk_scale,
                         num_prefill_tiles, num_decode_tiles, ratio_p, ratio_d, splits,
                         split_keys, cp_size, cp_rank, cp_interleave,
                         s_qt, s_qh, s_kb, s_ks, s_kh, s_ot, s_oh, s_bt,
                         HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                         GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         DECODE_BLOCK_N: tl.constexpr, DIM_P: tl.constexpr, IEEE: tl.constexpr,
                         USE_SMID: tl.constexpr, SM_SLOTS: tl.constexpr,
                         NUM_COUNTERS_P: tl.constexpr, SHARDED: tl.constexpr):
    # SHARDED: the caches hold one rank's share of the KV (kv_shard); a variant of its own,
    # so that the unsharded kernel does none of the shard's index arithmetic.
    # `splits` is a runtime value, not a constexpr: one build serves every split count,
    # where a constexpr would build one kernel per count a batch asks for (up to
    # MAX_SPLITS builds of seconds each, while serving). Its cost: a division and a
    # modulo by it once per program, a merge loop that is not unrolled (at most
    # MAX_SPLITS steps of two loads, once per split group), and both the direct and the
    # merging epilogue in one binary (kernels/compile_check.py: no spills).
    # counters: [0] next prefill tile, [1] next decode tile, [2] finished programs,
    # [3 + slot] tickets handed out on each SM.
    if USE_SMID:
        sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32,
                                       is_pure=True, pack=1)
        ticket = tl.atomic_add(counter_ptr + _ticket_counter(sm, SM_SLOTS), 1)
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
                     part_o_ptr, part_lse_ptr, merge_ptr, qk_scale, splits, split_keys, cp_size,
                     cp_rank, cp_interleave, s_qt, s_qh, s_kb, s_ks, s_kh, s_ot, s_oh, s_bt,
                     HEAD_DIM, BLOCK_SIZE, NUM_KV_HEADS, GROUP, GROUP_P, DECODE_BLOCK_N, DIM_P,
                     IEEE, SHARDED)
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
    decodes: int  # the leading decodes, and the CUDA-graph padding after them
    splits: int  # the most ways a decode's context splits
    split_keys: int  # the fewest keys a split takes: a shorter context splits fewer ways
    ratio: tuple[int, int]  # prefill : decode tickets
    block_m: int


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _num_sms(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _sm_slots(num_sms: int | None) -> int:
    """Per-SM ticket counters: a power of two, so that `_ticket_counter` masks."""
    return _next_pow2(num_sms) if num_sms else 0


def _num_counters(num_sms: int | None) -> int:
    return _next_pow2(3 + _sm_slots(num_sms))


def splits_for(num_decodes: int, num_kv_heads: int, num_sms: int | None) -> int:
    """The most ways each decode's context splits: enough for the decodes' query groups
    to fill one wave of the GPU's SMs, at most MAX_SPLITS; 1 on a CPU or once they fill
    it unsplit. A function of the batch's size alone, never of its contexts, so that a
    graph captured for a batch size holds the split count of every batch it replays."""
    groups = num_decodes * num_kv_heads
    if not num_sms or not groups or groups >= num_sms:
        return 1
    return min(MAX_SPLITS, num_sms // groups)


def plan(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_decodes: int,
         num_heads: int, num_kv_heads: int, block_m: int = 64,
         decode_splits: int | None = None, device: torch.device | str | None = None,
         workspace: Workspace | None = None) -> PodPlan:
    """Tiles and splits for a batch.

    Requests after the first `num_decodes` that have no query token, when nothing else
    follows them, are a CUDA graph's padding (vLLM pads a decode batch up to a captured
    size with such requests, of context 0 and the null block): they are planned as
    decodes, whose tiles do nothing, so that a padded batch plans exactly as the batch
    its graph was captured for. Decodes split by `splits_for` (each split at least SPLIT_KEYS keys), or every
    one `decode_splits` ways where asked (down to one key a split).

    Pass the host copy of `query_start_loc` and the kernel's `device` (by default the
    workspace's): then planning reads no device memory (of `seq_lens`, only their count
    is checked). With a `workspace` the work list goes into its device buffer, through
    its one pinned staging buffer, by a copy that does not wait for the device; the plan
    is then valid until the next plan into that workspace (in the stream's order)."""
    if device is None:
        device = workspace.device if workspace is not None else query_start_loc.device
    device = torch.device(device)
    q_lens = np.diff(np.asarray(query_start_loc.cpu(), dtype=np.int64))
    num_seqs = len(q_lens)
    if len(seq_lens) != num_seqs:
        raise ValueError(f"{len(seq_lens)} seq_lens for {num_seqs} requests in query_start_loc")
    if not 0 <= num_decodes <= num_seqs:
        raise ValueError(f"num_decodes={num_decodes} must be within 0..{num_seqs} sequences")
    if (q_lens[:num_decodes] != 1).any():
        raise ValueError("the first num_decodes sequences must have exactly one query token each")
    decodes = num_decodes
    if num_decodes and not q_lens[num_decodes:].any():
        decodes = num_seqs
    work = _work_list(q_lens, decodes, block_m)
    if decode_splits is None:
        splits, split_keys = splits_for(decodes, num_kv_heads, _num_sms(device)), SPLIT_KEYS
    else:
        splits, split_keys = decode_splits, 1
    num_prefill = len(work) * num_heads
    num_decode = decodes * num_kv_heads * splits
    if workspace is not None:
        prefill_work = workspace.upload_work(work)
    else:
        prefill_work = torch.from_numpy(work if len(work) else np.zeros((1, 2), np.int32))
        prefill_work = prefill_work.to(device)
    return PodPlan(num_prefill, num_decode, prefill_work, decodes, splits, split_keys,
                   _ticket_ratio(num_prefill, num_decode), block_m)


def _work_list(q_lens: np.ndarray, first: int, block_m: int) -> np.ndarray:
    """int32 [tiles, 2]: (sequence, first query token) of each prefill tile of block_m
    query rows, for the sequences from `first` on."""
    tiles = -(-q_lens[first:] // block_m)
    seqs = np.repeat(np.arange(first, len(q_lens)), tiles)
    first_tile = np.repeat(np.cumsum(tiles) - tiles, tiles)
    offsets = (np.arange(len(seqs)) - first_tile) * block_m
    return np.stack([seqs, offsets], axis=1).astype(np.int32)


def _ticket_ratio(num_prefill: int, num_decode: int) -> tuple[int, int]:
    """Tickets in proportion to the work, in small whole numbers, so both kinds of
    tile run from the start of the launch to its end."""
    if not (num_prefill and num_decode):
        return (1, 0) if num_prefill else (0, 1)
    g = math.gcd(num_prefill, num_decode)
    rp, rd = num_prefill // g, num_decode // g
    while rp + rd > 16:
        rp, rd = max(1, round(rp / 2)), max(1, round(rd / 2))
    return rp, rd


def _interpreted() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class Workspace:
    """The memory a launch uses besides its inputs, allocated once for the largest batch
    its owner will plan and never grown, so that every launch finds it at the same
    addresses (what a CUDA graph replays): the ticket counters and the split decodes'
    merge counters (zero between launches: each launch leaves them so), the split
    decodes' partial outputs, the LSE of a launch that returns none, and the prefill
    work list with the pinned host buffer it is copied from.

    Its owner, the attention metadata builder (one per builder), runs one launch at a
    time on it: launches in flight on two streams at once need a workspace each."""

    def __init__(self, device: torch.device, *, decode_groups: int, partial_rows: int,
                 lse_rows: int, dim_p: int, work_entries: int) -> None:
        self.device = torch.device(device)
        i32, f32 = torch.int32, torch.float32
        self.counters = torch.zeros(_num_counters(_num_sms(self.device)), dtype=i32,
                                    device=self.device)
        self.merge = torch.zeros(max(1, decode_groups), dtype=i32, device=self.device)
        self.part_lse = torch.empty(max(1, partial_rows), dtype=f32, device=self.device)
        self.part_o = torch.empty(max(1, partial_rows) * dim_p, dtype=f32, device=self.device)
        self.lse = torch.empty(max(1, lse_rows), dtype=f32, device=self.device)
        self.work = torch.zeros(max(1, work_entries), 2, dtype=i32, device=self.device)
        cuda = self.device.type == "cuda"
        self._staging = torch.empty(self.work.shape, dtype=i32, pin_memory=cuda)
        self._copied = torch.cuda.Event() if cuda else None

    @classmethod
    def for_batches(cls, device: torch.device | str, max_seqs: int, max_tokens: int,
                    num_heads: int, num_kv_heads: int, head_dim: int,
                    block_m: int) -> Workspace:
        """Room for every batch of up to `max_seqs` requests and `max_tokens` tokens that
        plan() splits by itself (`splits_for`) on `device`."""
        device = torch.device(device)
        sms = _num_sms(device)
        # Splits only while the decodes' groups leave SMs idle: then at most one row per
        # query head and SM, whatever the batch (a few hundred KiB).
        partial_rows = max((d * num_heads * s for d in range(1, min(max_seqs, sms or 0) + 1)
                            if (s := splits_for(d, num_kv_heads, sms)) > 1), default=0)
        return cls(device, decode_groups=max_seqs * num_kv_heads, partial_rows=partial_rows,
                   lse_rows=max_tokens * num_heads, dim_p=_next_pow2(head_dim),
                   work_entries=max_tokens // block_m + min(max_seqs, max_tokens))

    @classmethod
    def for_plan(cls, p: PodPlan, num_tokens: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, device: torch.device) -> Workspace:
        """Exactly what one launch of `p` needs (a standalone call's, in tests and
        benchmarks; its plan keeps its own work list)."""
        return cls(device, decode_groups=p.decodes * num_kv_heads,
                   partial_rows=_partial_rows(p, num_heads), lse_rows=num_tokens * num_heads,
                   dim_p=_next_pow2(head_dim), work_entries=0)

    def upload_work(self, work: np.ndarray) -> torch.Tensor:
        """The work list in this workspace's device buffer (from its first entry, so at
        the same address for every plan)."""
        n = len(work)
        if n > len(self.work):
            raise ValueError(f"{n} prefill tiles: the workspace holds {len(self.work)}")
        if n:
            if self._copied is not None:
                self._copied.synchronize()  # the last plan's copy has left the staging buffer
            self._staging[:n] = torch.from_numpy(work)
            self.work[:n].copy_(self._staging[:n], non_blocking=True)
            if self._copied is not None:
                self._copied.record()
        return self.work[:max(n, 1)]

    def check(self, p: PodPlan, num_tokens: int, num_heads: int, num_kv_heads: int,
              head_dim: int) -> None:
        """Raise unless a launch of `p` fits: a workspace never grows while serving."""
        short = [f"{name} ({need} > {have})" for name, need, have in (
            ("merge counters", p.decodes * num_kv_heads, len(self.merge)),
            ("partial rows", _partial_rows(p, num_heads), len(self.part_lse)),
            ("partial columns", _next_pow2(head_dim), len(self.part_o) // len(self.part_lse)),
            ("LSE rows", num_tokens * num_heads, len(self.lse)),
            ("ticket counters", _num_counters(_num_sms(self.device)), len(self.counters)))
            if need > have]
        if short:
            raise ValueError(f"the workspace is too small for this launch: {', '.join(short)}")

    def reset(self) -> None:
        """After a launch that raised: its counters may be left part-counted. (A CUDA
        fault inside a running kernel is sticky, the context unusable; what can fail and
        leave the process usable is a launch refused before it ran, or the
        interpreter, which runs programs one by one on the host.)"""
        self.counters.zero_()
        self.merge.zero_()


def _partial_rows(p: PodPlan, num_heads: int) -> int:
    return p.decodes * num_heads * p.splits if p.splits > 1 else 0


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
                  pod_plan: PodPlan | None = None, kv_shard: tuple[int, int, int] | None = None,
                  workspace: Workspace | None = None):
    """Causal attention of a hybrid batch (decodes first) in one launch; see
    vllm_ext.kernels.reference.pod_attention for the exact contract.

    kv_shard=(shards, rank, interleave): the caches hold one rank's share of the KV
    (KV-cache parallelism, vllm_ext.kernels.kvp's layout; seq_lens stay whole-sequence
    lengths); the result is attention over that share, as `kvp.shard_attention`
    computes it: zeros and LSE -inf for a query that sees none of it.

    workspace: the caller's, allocated once (a served engine's builder owns one); without
    one, this call allocates its own."""
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
    device = query.device
    ws = workspace or Workspace.for_plan(p, num_tokens, num_heads, num_kv_heads, head_dim, device)
    ws.check(p, num_tokens, num_heads, num_kv_heads, head_dim)
    out = torch.empty_like(query) if out is None else out
    lse = (torch.empty(num_tokens, num_heads, dtype=torch.float32, device=device) if return_lse
           else ws.lse[:num_tokens * num_heads])
    total = p.num_prefill_tiles + p.num_decode_tiles
    if total == 0:
        return (out, lse.view(num_tokens, num_heads)) if return_lse else out
    constants, options = launch_constants(
        head_dim, block_size, num_heads, num_kv_heads, query.dtype,
        ieee=query.dtype == torch.float32 or (_interpreted() and query.dtype == torch.bfloat16),
        num_sms=_num_sms(device), sharded=shards > 1)
    args = launch_arguments(query, key_cache, value_cache, out, lse, block_table, seq_lens,
                            query_start_loc, p, ws, scale, (shards, rank, interleave))
    try:
        pod_attention_kernel[(total,)](**args, **constants, **options)
    except BaseException:
        ws.reset()
        raise
    return (out, lse) if return_lse else out


def launch_constants(head_dim: int, block_size: int, num_heads: int, num_kv_heads: int,
                     dtype: torch.dtype, ieee: bool, num_sms: int | None,
                     sharded: bool = False) -> tuple[dict, dict]:
    """The kernel's constexprs and launch options for a model on a device: one place,
    shared by the launcher and the compile check (kernels/compile_check.py), so that what
    is checked is what runs. Nothing here depends on the batch."""
    group = num_heads // num_kv_heads
    tile = tile_for(head_dim, dtype, sharded)
    constants = {
        "HEAD_DIM": head_dim, "BLOCK_SIZE": block_size, "NUM_HEADS": num_heads,
        "NUM_KV_HEADS": num_kv_heads, "GROUP": group, "GROUP_P": max(16, _next_pow2(group)),
        "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "DECODE_BLOCK_N": tile.block_n,
        "DIM_P": _next_pow2(head_dim), "IEEE": ieee, "USE_SMID": num_sms is not None,
        "SM_SLOTS": _sm_slots(num_sms), "NUM_COUNTERS_P": _num_counters(num_sms),
        "SHARDED": sharded}
    return constants, {"num_warps": tile.num_warps}


def launch_arguments(query, key_cache, value_cache, out, lse, block_table, seq_lens,
                     query_start_loc, p: PodPlan, ws: Workspace, scale: float,
                     kv_shard: tuple[int, int, int]) -> dict:
    """The kernel's runtime arguments, by name: one place, shared by the launcher and the
    compile check, which reads from them what Triton specializes a build on."""
    shards, rank, interleave = kv_shard
    return {
        "q_ptr": query, "k_ptr": key_cache, "v_ptr": value_cache, "o_ptr": out, "lse_ptr": lse,
        "bt_ptr": block_table, "seq_lens_ptr": seq_lens, "qsl_ptr": query_start_loc,
        "work_ptr": p.prefill_work, "part_o_ptr": ws.part_o, "part_lse_ptr": ws.part_lse,
        "merge_ptr": ws.merge, "counter_ptr": ws.counters, "qk_scale": scale * LOG2E,
        "num_prefill_tiles": p.num_prefill_tiles, "num_decode_tiles": p.num_decode_tiles,
        "ratio_p": p.ratio[0], "ratio_d": p.ratio[1], "splits": p.splits,
        "split_keys": p.split_keys, "cp_size": shards, "cp_rank": rank,
        "cp_interleave": interleave, "s_qt": query.stride(0), "s_qh": query.stride(1),
        "s_kb": key_cache.stride(0), "s_ks": key_cache.stride(1), "s_kh": key_cache.stride(2),
        "s_ot": out.stride(0), "s_oh": out.stride(1), "s_bt": block_table.stride(0)}

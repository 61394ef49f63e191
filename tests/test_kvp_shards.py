"""KVP's per-rank attention (no engine): a hybrid batch's KV dealt to N ranks in vLLM's
decode-context-parallel layout, attention computed rank by rank over its share and
merged by LSE, equals attention over the whole KV (the POD reference)."""

from __future__ import annotations

import pytest
import torch

from vllm_ext.kernels.kvp import global_positions, local_length, shard_attention, slot_mapping
from vllm_ext.kernels.merge import merge_attention
from vllm_ext.kernels.reference import pod_attention


def _layout(seq_lens, shards, interleave, block, gen):
    """Per-request block tables over virtual blocks of block * shards tokens, as vLLM's
    scheduler hands them to every rank, with block ids shuffled."""
    need = [-(-n // (block * shards)) for n in seq_lens]
    ids = (torch.randperm(sum(need), generator=gen) + 1).tolist()
    table = torch.zeros(len(seq_lens), max(need), dtype=torch.int32)
    for s, n in enumerate(need):
        table[s, :n] = torch.tensor([ids.pop() for _ in range(n)])
    return table, sum(need) + 1


@pytest.mark.parametrize("shards,interleave,block", [(2, 1, 16), (2, 16, 16), (3, 4, 16),
                                                     (4, 8, 32), (2, 32, 32)])
@pytest.mark.parametrize("seed", range(3))
def test_ranks_merged_equal_whole_attention(shards, interleave, block, seed):
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads, dim = [(4, 1, 64), (8, 2, 64), (2, 2, 128)][seed]
    # decodes, then prefill chunks with and without earlier context (one shorter than a run)
    q_lens = [1, 1, 1, 37, 5, 64][: 3 + seed + 1]
    seq_lens = [int(torch.randint(q + 1, 300, (1,), generator=g)) for q in q_lens]
    seq_lens[-1] = q_lens[-1] if seed == 2 else seq_lens[-1]  # a prompt's first chunk
    table, num_blocks = _layout(seq_lens, shards, interleave, block, g)
    kv = [(torch.randn(n, kv_heads, dim, generator=g), torch.randn(n, kv_heads, dim, generator=g))
           for n in seq_lens]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(int(qsl[-1]), heads, dim, generator=g)
    lens = torch.tensor(seq_lens, dtype=torch.int32)

    # Whole: one cache, plain paging by block of `block` tokens (its own table).
    whole_table = torch.arange(1, 1 + len(seq_lens) * 32, dtype=torch.int32).view(-1, 32)
    kc = torch.zeros(len(seq_lens) * 32 + 1, block, kv_heads, dim)
    vc = torch.zeros_like(kc)
    for s, (k, v) in enumerate(kv):
        for p in range(len(k)):
            b = whole_table[s, p // block]
            kc[b, p % block], vc[b, p % block] = k[p], v[p]
    want, want_lse = pod_attention(query, kc, vc, whole_table, lens, qsl, 3, dim ** -0.5,
                                   return_lse=True)

    outs, lses = [], []
    for rank in range(shards):
        rk = torch.full((num_blocks, block, kv_heads, dim), float("nan"))  # untouched slots
        rv = rk.clone()
        for s, (k, v) in enumerate(kv):  # written through the slot mapping, as the engine does
            pos = torch.arange(len(k))
            slots = slot_mapping(pos, torch.full_like(pos, s), table, block, shards, rank,
                                 interleave)
            assert ((slots >= 0) == ((pos // interleave) % shards == rank)).all()
            keep = slots >= 0
            rk.view(-1, kv_heads, dim)[slots[keep]] = k[keep]
            rv.view(-1, kv_heads, dim)[slots[keep]] = v[keep]
        o, l = shard_attention(query, rk, rv, table, lens, qsl, dim ** -0.5, shards, rank,
                               interleave)
        outs.append(o), lses.append(l)
    got, got_lse = merge_attention(outs, lses)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-5, atol=1e-5)


def test_every_position_has_exactly_one_rank():
    for shards, interleave in [(2, 1), (3, 4), (4, 16)]:
        for length in [0, 1, 5, 63, 64, 65, 1000]:
            got = sorted(p for r in range(shards)
                         for p in global_positions(local_length(length, shards, r, interleave),
                                                   shards, r, interleave).tolist())
            assert got == list(range(length)), (shards, interleave, length)


def test_a_rank_with_none_of_a_short_sequence_gives_minus_infinity():
    q = torch.randn(1, 2, 64)
    cache = torch.zeros(2, 16, 1, 64)
    out, lse = shard_attention(q, cache, cache, torch.tensor([[1]], dtype=torch.int32),
                               torch.tensor([3], dtype=torch.int32),
                               torch.tensor([0, 1], dtype=torch.int32), 0.125, 2, 1, 16)
    assert torch.isneginf(lse).all() and (out == 0).all()


@pytest.mark.parametrize("shards,interleave,splits", [(2, 1, None), (3, 4, 3), (2, 16, None),
                                                      (4, 8, 2)])
def test_the_kernel_attends_one_shard_as_the_reference_does(shards, interleave, splits):
    """The Triton kernel with kv_shard, against shard_attention, rank by rank: outputs,
    LSEs, and the zeros / -inf of queries that see none of a rank's keys."""
    import os

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is decorated
    from vllm_ext.kernels.pod import plan, pod_attention as pod_kernel, tile_for

    g = torch.Generator().manual_seed(shards * interleave)
    heads, kv_heads, dim, block = 4, 2, 64, 16
    q_lens = [1, 1, 1, 20, 3]  # decodes (one with a 2-token past), then prefill chunks
    seq_lens = [2, 90, 33, 20, 75]  # a prompt's first chunk; a chunk after earlier context
    table, num_blocks = _layout(seq_lens, shards, interleave, block, g)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(int(qsl[-1]), heads, dim, generator=g)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    unseen = 0
    for rank in range(shards):
        rk = torch.randn(num_blocks, block, kv_heads, dim, generator=g)
        rv = torch.randn(num_blocks, block, kv_heads, dim, generator=g)
        want, want_lse = shard_attention(query, rk, rv, table, lens, qsl, dim ** -0.5, shards,
                                         rank, interleave)
        p = plan(qsl, lens, 3, heads, kv_heads,
                 block_m=tile_for(dim, query.dtype, sharded=shards > 1).block_m,
                 decode_splits=splits, device=device)
        args = [t.to(device) for t in (query, rk, rv, table, lens, qsl)]
        out = torch.full_like(args[0], float("nan"))
        got, got_lse = pod_kernel(*args, 3, dim ** -0.5, out=out, return_lse=True, pod_plan=p,
                                  kv_shard=(shards, rank, interleave))
        got, got_lse = got.cpu(), got_lse.cpu()
        unseen += int(torch.isinf(want_lse).sum())
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(got_lse, want_lse, rtol=2e-5, atol=2e-5)
    assert unseen  # the first prompt's first tokens: on rank 0 only

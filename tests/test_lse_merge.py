"""KVP's LSE merge (no engine): attention computed shard by shard and merged equals
attention over the whole KV, for random shapes; decode queries through the POD
reference with its LSE output, and causal prefill chunks through a plain masked softmax."""

from __future__ import annotations

import pytest
import torch

from vllm_ext.kernels.merge import merge_attention
from vllm_ext.kernels.reference import pod_attention


def _attention(q, k, v, mask, scale):
    """q [T, H, D], k/v [N, H, D], mask [T, N] (True: visible) -> out, lse (float32)."""
    s = torch.einsum("thd,nhd->thn", q.float(), k.float()) * scale
    s = s.masked_fill(~mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(torch.isfinite(lse)[..., None], torch.exp(s - lse[..., None]), 0.0)
    return torch.einsum("thn,nhd->thd", p, v.float()), lse


@pytest.mark.parametrize("seed", range(6))
def test_decodes_sharded_through_the_pod_reference_equal_one_shard(seed):
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads, dim, block = [(8, 2, 64, 16), (4, 4, 128, 32), (16, 4, 80, 16)][seed % 3]
    decodes = int(torch.randint(1, 5, (1,), generator=g))
    ctx = torch.randint(40, 400, (decodes,), generator=g).tolist()
    shards = int(torch.randint(2, 5, (1,), generator=g))
    q = torch.randn(decodes, heads, dim, generator=g)
    keys = [torch.randn(c, kv_heads, dim, generator=g) for c in ctx]
    vals = [torch.randn(c, kv_heads, dim, generator=g) for c in ctx]

    def run(parts_k, parts_v):
        """One POD-reference call over per-request KV pieces, laid out in paged blocks."""
        lens = [len(k) for k in parts_k]
        need = [-(-n // block) for n in lens]
        kc = torch.zeros(sum(need) + 1, block, kv_heads, dim)
        vc = torch.zeros_like(kc)
        table = torch.zeros(len(lens), max(need), dtype=torch.int32)
        at = 1
        for s, (k, v) in enumerate(zip(parts_k, parts_v)):
            for b in range(need[s]):
                kc[at, :len(k[b * block:(b + 1) * block])] = k[b * block:(b + 1) * block]
                vc[at, :len(v[b * block:(b + 1) * block])] = v[b * block:(b + 1) * block]
                table[s, b] = at
                at += 1
        return pod_attention(q, kc, vc, table, torch.tensor(lens, dtype=torch.int32),
                             torch.arange(len(lens) + 1, dtype=torch.int32), len(lens),
                             dim ** -0.5, return_lse=True)

    whole, whole_lse = run(keys, vals)
    outs, lses = [], []
    for i in range(shards):  # contiguous shards by sequence position; the last holds the rest
        cut = [(c * i // shards, c * (i + 1) // shards) for c in ctx]
        o, l = run([k[a:b] if b > a else k[:1] for k, (a, b) in zip(keys, cut)],
                   [v[a:b] if b > a else v[:1] for v, (a, b) in zip(vals, cut)])
        empty = torch.tensor([b <= a for a, b in cut])[:, None]
        outs.append(o), lses.append(l.masked_fill(empty, float("-inf")))
    out, lse = merge_attention(outs, lses)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, whole_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens,context,shard", [(1, 7, 3), (17, 100, 40), (64, 513, 128),
                                                  (5, 0, 8)])
def test_causal_chunk_after_sharded_context_equals_one_shard(tokens, context, shard):
    g = torch.Generator().manual_seed(tokens + context)
    h, d = 4, 32
    n = context + tokens
    q = torch.randn(tokens, h, d, generator=g, dtype=torch.float64).float()
    k = torch.randn(n, h, d, generator=g)
    v = torch.randn(n, h, d, generator=g)
    pos = torch.arange(context, n)
    full = pos[:, None] >= torch.arange(n)[None, :]
    whole, whole_lse = _attention(q, k, v, full, d ** -0.5)
    outs, lses = [], []
    for start in range(0, n, shard):  # the last shard also holds the chunk's own KV
        keys = torch.arange(start, min(n, start + shard))
        o, l = _attention(q, k[keys], v[keys], full[:, keys], d ** -0.5)
        outs.append(o), lses.append(l)
    out, lse = merge_attention(outs, lses)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, whole_lse, rtol=1e-5, atol=1e-5)


def test_bad_shards_are_refused_and_unseen_queries_give_zeros():
    o = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="one LSE per output"):
        merge_attention([o], [])
    with pytest.raises(ValueError, match="disagree on shapes"):
        merge_attention([o, torch.randn(2, 2, 8)], [torch.zeros(3, 2), torch.zeros(2, 2)])
    none = torch.full((3, 2), float("-inf"))
    out, lse = merge_attention([o, o], [none, none])
    assert not out.any() and torch.isinf(lse).all()

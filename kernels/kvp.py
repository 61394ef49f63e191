"""One rank's part of KV-cache-parallel attention (Mnemosyne's KVP), in vLLM's layout.

With KV sharded over N ranks, every rank stores only its share of each request's
tokens and computes attention of all the step's queries over that share, with the
share's LSE; `merge.merge_attention` then combines the N results exactly.

vLLM 0.32 shards by sequence in runs of `interleave` tokens dealt round-robin
(its decode-context-parallel layout, `cp_kv_cache_interleave_size`): position p
lives on rank (p // interleave) % N, at local index

    l = (p // (N * interleave)) * interleave + p % interleave

and a rank's block table maps l // block_size to a block of its own cache. So a
rank's tokens are a compacted sequence, and causality is decided on the global
position each local index stands for.
"""

from __future__ import annotations

import torch


def local_length(length: int, shards: int, rank: int, interleave: int) -> int:
    """How many of positions 0..length-1 the rank holds."""
    full, rest = divmod(length, shards * interleave)
    return full * interleave + min(max(rest - rank * interleave, 0), interleave)


def global_positions(local_len: int, shards: int, rank: int, interleave: int,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """The positions in the sequence of the rank's local indices 0..local_len-1."""
    l = torch.arange(local_len, device=device)
    return (l // interleave) * shards * interleave + rank * interleave + l % interleave


def slot_mapping(positions: torch.Tensor, request: torch.Tensor, block_table: torch.Tensor,
                 block_size: int, shards: int, rank: int, interleave: int,
                 pad: int = -1) -> torch.Tensor:
    """The rank's cache slot of each token (`pad` for tokens other ranks hold):
    positions and request indices per token, block_table [requests, blocks] indexed by
    virtual block (block_size * shards tokens of the sequence)."""
    virtual = block_size * shards
    vblock, offset = positions // virtual, positions % virtual
    mine = (offset // interleave) % shards == rank
    local = (offset // (shards * interleave)) * interleave + offset % interleave
    blocks = block_table[request, vblock.clamp(max=block_table.shape[1] - 1)].long()
    return torch.where(mine, blocks * block_size + local, pad)


def shard_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float, shards: int, rank: int,
                    interleave: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of a batch's queries over this rank's share of the KV.

    Shapes as `reference.pod_attention` (seq_lens are whole-sequence lengths, this
    step's tokens included), caches holding the rank's share. Returns out
    [num_tokens, num_heads, head_dim] (query's dtype) and the natural-log LSE
    [num_tokens, num_heads] in float32: -inf, with zeros out, for a query that
    sees none of the rank's keys.
    """
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(query)
    lse = torch.full((num_tokens, num_heads), float("-inf"), dtype=torch.float32,
                     device=query.device)
    starts = query_start_loc.tolist()
    for s, length in enumerate(seq_lens.tolist()):
        q0, q1 = starts[s], starts[s + 1]
        local = local_length(length, shards, rank, interleave)
        if q1 == q0 or local == 0:
            continue
        blocks = block_table[s, :(local + block_size - 1) // block_size].long()
        k = key_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:local].float()
        v = value_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:local].float()
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query[q0:q1].float(), k) * scale
        q_pos = torch.arange(length - (q1 - q0), length, device=query.device)
        k_pos = global_positions(local, shards, rank, interleave, query.device)
        visible = k_pos[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        part = torch.logsumexp(scores, dim=-1)  # [heads, q]
        seen = torch.isfinite(part)
        probs = torch.where(seen[..., None], torch.exp(scores - part.masked_fill(~seen, 0)[..., None]),
                            0.0)
        lse[q0:q1] = part.transpose(0, 1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out, lse

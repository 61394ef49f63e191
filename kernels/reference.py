"""Plain PyTorch references for the kernels, same signatures, float32 math.

Slow and obvious on purpose: the kernels are tested against these.
"""

from __future__ import annotations

import torch


def pod_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  block_table: torch.Tensor, seq_lens: torch.Tensor,
                  query_start_loc: torch.Tensor, num_decodes: int, scale: float,
                  out: torch.Tensor | None = None, return_lse: bool = False):
    """Causal attention of a hybrid batch over vLLM's paged KV cache.

    query [num_tokens, num_heads, head_dim]; key/value_cache [num_blocks, block_size,
    num_kv_heads, head_dim]; block_table int32 [num_seqs, max_blocks]; seq_lens int32
    [num_seqs] (context length including this step's tokens); query_start_loc int32
    [num_seqs + 1]. Query token j of sequence s sits at position seq_lens[s] - q_len + j
    and sees every position up to its own. `num_decodes` only says that the first
    sequences have one query token each; the result does not depend on it.
    Returns out [num_tokens, num_heads, head_dim] (query's dtype), and with `return_lse`
    also the natural-log LSE [num_tokens, num_heads] in float32.
    """
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    result = torch.empty_like(query) if out is None else out
    lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=query.device)
    starts = query_start_loc.tolist()
    for s, ctx in enumerate(seq_lens.tolist()):
        q0, q1 = starts[s], starts[s + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        blocks = block_table[s, :(ctx + block_size - 1) // block_size].long()
        k = key_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].float()
        v = value_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx].float()
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        q = query[q0:q1].float()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        pos = torch.arange(ctx - q_len, ctx, device=query.device)
        visible = torch.arange(ctx, device=query.device)[None, :] <= pos[:, None]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        lse[q0:q1] = torch.logsumexp(scores, dim=-1).transpose(0, 1)
        probs = torch.softmax(scores, dim=-1)
        result[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v).to(result.dtype)
    return (result, lse) if return_lse else result

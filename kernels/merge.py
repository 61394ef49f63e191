"""Exact attention over KV split into shards, from each shard's output and LSE.

KV-cache parallelism (Mnemosyne) keeps one request's KV in contiguous shards on
several workers. Each computes attention of the same queries over its shard and
returns its output O_i and natural-log LSE lse_i; the attention over all shards is

    lse = log(sum_i exp(lse_i)),   O = sum_i exp(lse_i - lse) * O_i

which is exact up to float rounding. A shard that sees no key for a query (LSE -inf)
contributes nothing; a query that sees no key at all gets zeros and LSE -inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_attention(outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """outputs: [tokens, heads, head_dim] each; lses: [tokens, heads] (float32) each.
    Returns the merged output (the outputs' dtype) and LSE (float32)."""
    if not outputs or len(outputs) != len(lses):
        raise ValueError(f"need one LSE per output and at least one shard, got "
                         f"{len(outputs)} outputs and {len(lses)} LSEs")
    shapes = {tuple(o.shape) for o in outputs}
    if len(shapes) != 1 or any(tuple(l.shape) != tuple(outputs[0].shape[:2]) for l in lses):
        raise ValueError(f"shards disagree on shapes: outputs {sorted(shapes)}, "
                         f"LSEs {sorted({tuple(l.shape) for l in lses})}")
    stacked = torch.stack([l.float() for l in lses])  # [shards, tokens, heads]
    lse = torch.logsumexp(stacked, dim=0)
    seen = torch.isfinite(lse)
    weights = torch.where(seen, torch.exp(stacked - lse.masked_fill(~seen, 0.0)), 0.0)
    out = sum(w.unsqueeze(-1) * o.float() for w, o in zip(weights, outputs))
    return out.to(outputs[0].dtype), lse

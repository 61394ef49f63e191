"""KV-cache parallelism (`--kvp 2`) on the real engine: two CPU ranks (gloo) each hold a
share of every request's KV, attention over it (the PyTorch reference, or the POD kernel
with `kv_shard`) is merged by LSE, and the greedy float32 tokens equal a single worker's
for contexts far longer than one rank's share."""

from __future__ import annotations

import pytest

from engine_runner import LONG, MAX_TOKENS, SHORT

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1200)]


# Both interleaves, and both implementations (the kernel at 16, where a rank's tokens come
# in runs); torch at 16 too would be one more engine CI has no time for.
@pytest.mark.parametrize("interleave, impl", [(1, "torch"), (16, "triton")])
def test_kvp_two_ranks_equal_one_worker(run_engine, interleave, impl):
    stock = run_engine()
    # triton: the POD kernel on each rank's shard (kv_shard), interpreted on this CPU.
    kvp = run_engine("--kvp", "2", "--kvp-interleave", str(interleave), "--pod-impl", impl)
    assert kvp["parallel"] == {"tensor_parallel_size": 2, "pipeline_parallel_size": 1,
                               "decode_context_parallel_size": 2,
                               "cp_kv_cache_interleave_size": interleave}
    assert kvp["attention_backends"] == ["vllm_ext.engine.pod.cpu.PodAttentionBackend"]
    assert kvp["tokens"] == stock["tokens"] and len(stock["tokens"]) == len(SHORT + LONG)
    # Every token's KV is written once, on the rank its position falls to: the two
    # ranks hold about half of all the rows written each.
    rows = kvp["kv_rows_per_rank"]
    longest = max(LONG) + MAX_TOKENS
    assert len(rows) == 2 and sum(rows) >= longest
    assert all(0.35 * sum(rows) <= r <= 0.65 * sum(rows) for r in rows), rows

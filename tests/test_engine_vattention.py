"""`--kv-allocator vattention` on the real vLLM engine (CPU, float32, greedy), tiny model.

The KV cache lives in a VirtualKVPool whose pages are mapped as blocks are handed
out, in both layouts (vLLM's blocks; a contiguous slot per request). The tests check:
- the tokens are exactly stock vLLM's;
- the mapped bytes, read from the statistics behind /metrics after every step, follow
  the live blocks within the configured reserve;
- a low physical cap preempts requests instead of failing, and every request still
  completes with the same tokens;
- in the slots layout every request's block ids are consecutive; prefix caching keeps
  hitting in the blocks layout;
- under tensor parallelism (2 ranks, the small model: 2 of its 4 KV heads each) every
  rank's pool holds its shard, carries out the scheduler's page plan step by step and
  is capped on its own, with a single worker's tokens.
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1200)]

VATT = ("--kv-allocator", "vattention")
SMALL_PAGES = (*VATT, "--vattention-page-size", "16KiB", "--block-size", "32",
               "--max-model-len", "576")
PREMAP, WATERMARK = 2, 8  # the defaults


@pytest.fixture(scope="module")
def stock(run_engine):
    return run_engine()


def _page_bytes(result) -> float:
    totals = result["kv_pool"]["totals"]
    return totals["mapped_bytes"] / totals["mapped_pages"]


def _check_memory_follows_live_blocks(result, reserve_pages):
    samples = result["kv_pool"]["samples"]
    assert len(samples) > 20  # one per step
    page = _page_bytes(result)
    for _, live, live_pages, mapped in samples:
        assert live <= live_pages <= mapped  # every live block is in a mapped page
        assert mapped <= live_pages + reserve_pages * page
    peak_live = max(s[1] for s in samples)
    assert peak_live >= 10 * samples[0][1]  # the run did grow, and memory grew with it
    assert max(s[3] for s in samples) <= (1 + reserve_pages) * page + peak_live * 1.0001 + \
        max(s[2] - s[1] for s in samples)
    # Once the last request is done, its memory goes back (beyond the reserve).
    _, live, _, mapped = samples[-1]
    assert live == samples[0][1] and mapped <= (1 + reserve_pages) * page
    totals = result["kv_pool"]["totals"]
    assert totals["reserved_bytes"] >= 100 * max(s[3] for s in samples)
    assert totals["maps"] > 0 and totals["unmaps"] > 0


def test_tokens_identical_and_mapped_memory_follows_live_blocks(run_engine, stock):
    result = run_engine(*VATT)
    assert result["tokens"] == stock["tokens"] and len(result["tokens"]) == 7
    assert all(len(t) == 40 for t in result["tokens"].values())
    _check_memory_follows_live_blocks(result, PREMAP + WATERMARK)
    # One 128-token block fills a 64 KiB page here: the bound is exact, with no
    # rounding slack beyond the reserve.
    for _, live, live_pages, mapped in result["kv_pool"]["samples"]:
        assert live_pages == live


def test_small_pages_without_look_ahead_or_reuse(run_engine, stock):
    result = run_engine(*SMALL_PAGES, "--vattention-premap", "0", "--vattention-watermark", "0")
    assert result["tokens"] == stock["tokens"]
    samples = result["kv_pool"]["samples"]
    # No reserve: after every step exactly the pages of live blocks are mapped.
    assert all(mapped == live_pages for _, _, live_pages, mapped in samples)
    # Every map was waited for, but page 0's: mapped with the pool, before any step.
    totals = result["kv_pool"]["totals"]
    assert totals["critical_maps"] == totals["maps"] - 1


def test_physical_cap_preempts_and_every_request_completes(run_engine, stock):
    cap = 640 << 10  # 20 pages of 32 KiB (2 layers): one 576-token request needs 19
    result = run_engine(*SMALL_PAGES, "--vattention-physical-limit", str(cap),
                        "--scheduler", "vllm")
    assert sum(step["preempted"] for step in result["steps"]) >= 1
    assert result["tokens"] == stock["tokens"]
    assert max(s[3] for s in result["kv_pool"]["samples"]) <= cap


def test_slots_layout_keeps_each_request_contiguous_and_preempts_at_the_cap(run_engine, stock):
    cap = 640 << 10
    result = run_engine(*SMALL_PAGES, "--vattention-layout", "slots", "--scheduler", "vllm",
                        "--vattention-physical-limit", str(cap))
    assert result["tokens"] == stock["tokens"]
    assert result["config"]["additional_config"]["vllm_ext"]["kv_allocator"]["layout"] == "slots"
    totals = result["kv_pool"]["totals"]
    preempted = sum(step["preempted"] for step in result["steps"])
    assert preempted >= 1
    # Every request (and every resumption after preemption) got consecutive block ids.
    assert totals["slot_requests"] >= 7 + preempted and totals["slot_breaks"] == 0
    assert max(s[3] for s in result["kv_pool"]["samples"]) <= cap
    _check_memory_follows_live_blocks(result, PREMAP + WATERMARK)


def test_prefix_caching_keeps_working(run_engine):
    base = run_engine("--shared-prefix", "256")
    result = run_engine(*VATT, "--shared-prefix", "256")
    assert result["tokens"] == base["tokens"]
    assert base["prefix_cache_hits"] > 0
    assert result["prefix_cache_hits"] == base["prefix_cache_hits"]


def test_together_with_pod_attention_and_sarathi(run_engine, stock):
    result = run_engine(*VATT, "--attn", "pod", "--scheduler", "sarathi", "--budget", "64")
    assert result["attention_backends"] == ["vllm_ext.engine.pod.cpu.PodAttentionBackend"]
    assert result["tokens"] == stock["tokens"]
    assert result["kv_pool"]["totals"]["maps"] > 0


def test_tensor_parallel_ranks_each_map_their_shard_as_planned_under_their_own_cap(
        run_engine, small_model):
    # One worker on the same prompts: test_engine_adaptive's stock run, run once a session.
    stock = run_engine(model=small_model)
    config = json.loads((small_model / "config.json").read_text())
    heads = config["num_key_value_heads"] // 2  # each rank's shard
    # A block (32 tokens) of one rank, all layers: K and V of its heads, float32.
    block = 32 * config["num_hidden_layers"] * heads * config["head_dim"] * 2 * 4
    cap = 20 * block  # per rank: 20 pages of one block; one 576-token request needs 19
    result = run_engine(*SMALL_PAGES, "--vattention-premap", "0", "--vattention-watermark", "0",
                        "--scheduler", "vllm", "--vattention-physical-limit", str(cap),
                        "--tensor-parallel-size", "2", model=small_model)
    assert result["parallel"]["tensor_parallel_size"] == 2
    assert result["tokens"] == stock["tokens"] and len(result["tokens"]) == 7
    assert sum(step["preempted"] for step in result["steps"]) >= 1  # the cap was reached

    ranks = result["kv_pool_per_process"]
    assert len(ranks) == 2  # one pool per rank, each in its worker process
    for rank in ranks:
        samples, totals = rank["samples"], rank["totals"]
        assert len(samples) > 20  # one per step
        # The null block alone at first: one block of the rank's 2 heads, half a single
        # worker's.
        assert samples[0][1] == block
        # After every step the rank had mapped exactly the pages of the live blocks the
        # scheduler planned (no look-ahead, no kept pages): the plan, carried out here.
        assert all(live <= live_pages == mapped for _, live, live_pages, mapped in samples)
        assert max(s[1] for s in samples) >= 10 * block  # it grew, and memory with it
        assert max(s[3] for s in samples) <= cap == totals["provisioned_bytes"]  # its own cap
        assert samples[-1][1:] == [block, block, block]  # all but the null block went back
    assert ranks[0]["totals"]["maps"] == ranks[1]["totals"]["maps"] > 10
    assert ranks[0]["totals"]["unmaps"] == ranks[1]["totals"]["unmaps"]

"""Sequence pipeline parallelism on the real engine: two CPU pipeline stages, prompts
chunked at 64 tokens. With SPP (vLLM 0.32's own behaviour, kept by --scheduler
sarathi) a prompt's next chunk enters the first stage while its previous chunk is
still in the pipeline; with --sarathi-spp off it waits (plain pipeline parallelism).
Both give a single worker's greedy float32 tokens."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1200)]

PP = ("--pipeline-parallel-size", "2", "--scheduler", "sarathi", "--budget", "64")


def _pipelined(result) -> int:
    return sum(s["pipelined_chunks"] for s in result["steps"])


def test_spp_pipelines_a_prompts_chunks_and_is_exact(run_engine):
    stock = run_engine()
    spp, plain = run_engine(*PP), run_engine(*PP, "--spp", "off")
    for result in (spp, plain):
        assert result["parallel"]["pipeline_parallel_size"] == 2
        assert result["tokens"] == stock["tokens"] and len(result["tokens"]) == 7
    # The long prompts (300-520 tokens) take 5-9 chunks each: with SPP most of their
    # chunks after the first are scheduled while the one before is in flight.
    assert _pipelined(spp) >= 10, _pipelined(spp)
    assert _pipelined(plain) == 0
    assert plain["config"]["additional_config"]["vllm_ext"]["scheduler"][
        "sequence_pipeline"] is False

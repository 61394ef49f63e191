"""`--attn pod` on the real vLLM engine (CPU, float32, greedy), tiny model: vLLM runs
the POD backend in its worker, and the tokens are exactly stock vLLM's, through the
PyTorch path and through the Triton kernel (interpreted), alone and with Sarathi."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1200)]

POD = "vllm_ext.engine.pod.cpu.PodAttentionBackend"


@pytest.fixture(scope="module")
def stock(run_engine):
    return run_engine()


# The Triton kernel runs under Sarathi's small budget, whose steps mix prefill chunks and
# decodes (its hybrid batches), which covers stock vLLM's steps' kinds too; an engine
# for each would cost CI a minute it does not have.
@pytest.mark.parametrize("args", [
    ("--attn", "pod"),
    ("--attn", "pod", "--pod-impl", "triton", "--scheduler", "sarathi", "--budget", "64"),
], ids=["torch", "triton+sarathi"])
def test_pod_tokens_identical_to_stock(run_engine, stock, args):
    result = run_engine(*args)
    assert result["attention_backends"] == [POD]
    assert stock["attention_backends"] != [POD]
    assert len(result["tokens"]) == 7
    for rid, tokens in stock["tokens"].items():
        assert len(tokens) == 40
        assert result["tokens"][rid] == tokens, rid

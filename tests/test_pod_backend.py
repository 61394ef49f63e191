"""`--attn pod` refuses what it cannot run, before serving, with what it supports."""

from __future__ import annotations

import pytest

from vllm_ext.frontend.builtin.attention import _configure_pod
from vllm_ext.frontend.components import ConfigureContext, SelectionError


@pytest.mark.parametrize("change, says", [
    ({"head_size": 32}, "head size 32"),
    ({"sliding_window": 128}, "sliding windows"),
    ({"alibi_slopes": [0.5, 0.25]}, "ALiBi"),
    ({"logits_soft_cap": 30.0}, "logit soft capping"),
    ({"kv_cache_dtype": "fp8"}, "KV cache dtype fp8"),
    ({"attn_type": "encoder_only"}, "encoder_only attention"),
])
def test_unsupported_model_features_fail_naming_what_is_supported(change, says):
    from vllm_ext.engine.pod.cpu import PodAttentionImpl

    kwargs = dict(num_heads=2, head_size=64, scale=0.125, num_kv_heads=1, alibi_slopes=None,
                  sliding_window=None, kv_cache_dtype="auto", **{})
    kwargs.update(change)
    with pytest.raises(ValueError) as e:
        PodAttentionImpl(**kwargs)
    assert says in str(e.value)
    assert "head sizes [64, 80, 96, 128, 256]" in str(e.value) and "--attn vllm" in str(e.value)


def test_cuda_runs_the_compiled_kernel_by_default_kvp_too_and_other_platforms_are_refused():
    settings, engine = _configure_pod({}, ConfigureContext("cuda", {}))
    assert settings == {"impl": "triton", "kvp": 1} and engine == {"attention_backend": "CUSTOM"}
    assert _configure_pod({}, ConfigureContext("cpu", {}))[0]["impl"] == "torch"
    with pytest.raises(SelectionError, match="runs on vLLM's cpu and cuda platforms, not 'tpu'"):
        _configure_pod({}, ConfigureContext("tpu", {}))
    settings, engine = _configure_pod({"kvp": 2}, ConfigureContext("cuda", {}))
    assert settings == {"impl": "triton", "kvp": 2}
    assert engine["decode_context_parallel_size"] == 2 and engine["tensor_parallel_size"] == 2
    assert _configure_pod({"kvp": 2, "impl": "triton"}, ConfigureContext("cpu", {}))[0] == \
        {"impl": "triton", "kvp": 2}

"""What `--attn pod` supports, said once for both of its backends (the CPU platform's,
`vllm_ext.engine.pod.cpu`, and CUDA's, `vllm_ext.engine.pod.cuda`), and which
implementation an engine chose."""

from __future__ import annotations

import torch

from vllm_ext.config import ExtConfig
from vllm_ext.kernels.limits import SUPPORTED_HEAD_DIMS

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "float32")
SUPPORTED = (f"--attn pod runs causal decoder self-attention with head sizes "
             f"{list(SUPPORTED_HEAD_DIMS)} in float16, bfloat16 or float32 (KV cache in the "
             f"model's dtype), without ALiBi, sliding windows, soft-capping or attention sinks")


def impl(vllm_config, default: str | None = None) -> str | None:
    """This engine's `--pod-impl`; `default` for an engine that did not choose `--attn pod`
    (a backend built directly, as vLLM's own tests build theirs)."""
    chosen = ExtConfig.of(vllm_config).settings("attn", "pod")
    return default if chosen is None else chosen.impl


def unsupported(head_size: int, kv_cache_dtype: str | None, attn_type: str = "decoder",
                dtype: torch.dtype | None = None, **features: bool) -> list[str]:
    """What of a layer's configuration `--attn pod` cannot run, each named with what it
    can; `features` are flags such as `sinks=True` (present means unsupported)."""
    reasons = []
    if head_size not in SUPPORTED_HEAD_DIMS:
        reasons.append(f"head size {head_size} (supported: {list(SUPPORTED_HEAD_DIMS)})")
    if dtype is not None and dtype not in DTYPES:
        reasons.append(f"dtype {dtype} (supported: float16, bfloat16, float32)")
    if (kv_cache_dtype or "auto") not in KV_CACHE_DTYPES:
        reasons.append(f"KV cache dtype {kv_cache_dtype} (supported: {', '.join(KV_CACHE_DTYPES)}; "
                       f"auto is the model's dtype)")
    elif dtype is not None and kv_cache_dtype not in (None, "auto") \
            and getattr(torch, kv_cache_dtype) != dtype:
        reasons.append(f"KV cache dtype {kv_cache_dtype} with a {str(dtype).split('.')[-1]} "
                       f"model (supported: the model's own dtype, or auto)")
    if attn_type != "decoder":
        reasons.append(f"{attn_type} attention (supported: decoder)")
    reasons += [f"{name.replace('_', ' ')} (not supported)"
                for name, present in features.items() if present]
    return reasons


def check_layer(head_size: int, kv_cache_dtype: str | None, attn_type: str, alibi_slopes,
                sliding_window, logits_soft_cap, sinks) -> None:
    """Raise, naming what is supported, for an attention layer `--attn pod` cannot run
    (what vLLM hands an attention implementation's constructor)."""
    reasons = unsupported(head_size, kv_cache_dtype, attn_type, alibi=alibi_slopes is not None,
                          sliding_window=sliding_window is not None,
                          logit_soft_capping=bool(logits_soft_cap),
                          attention_sinks=sinks is not None)
    if reasons:
        raise ValueError(refusal(reasons))


def refusal(reasons: list[str]) -> str:
    return (f"--attn pod does not support {'; '.join(reasons)}. {SUPPORTED}; use --attn vllm "
            f"for this model")

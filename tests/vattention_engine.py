"""A vattention engine's configs as vLLM's engine core makes them before the workers
allocate the KV cache, for tests that run the runners' allocation and the scheduler
in process (no engine)."""

from __future__ import annotations

import torch


def runner_config(model_dir, block_size: int, max_model_len: int, preset: str = "tiny",
                  **options):
    """The engine's VllmConfig for a preset's model shape (`kv_allocator="vattention"` among
    the options for a vattention engine), with the KV layout the engine core resolves
    (layer-outermost)."""
    from vllm.v1.attention.backends.utils import record_kv_cache_layout

    from vllm_ext.tools.driver import engine_config
    from vllm_ext.tools.models import make_shape

    config = engine_config(make_shape(model_dir, preset), block_size=block_size,
                           max_model_len=max_model_len, dtype="float32", **options)
    record_kv_cache_layout(config.cache_config, "LBNHC")
    return config


def kv_cache_config(config, block_size: int, num_blocks: int):
    """What the engine core plans for it: one full-attention group in one tensor whose
    blocks are dense and layer-outermost, over one rank's KV heads (vLLM's
    `get_num_kv_heads`: the model's over the tensor-parallel size, at least one)."""
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
    )

    model, parallel = config.model_config, config.parallel_config
    spec = FullAttentionSpec(block_size=block_size,
                             num_kv_heads=model.get_num_kv_heads(parallel),
                             head_size=model.get_head_size(), dtype=torch.float32)
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(model.get_num_layers(parallel))]
    block = spec.page_size_bytes
    tensor = KVCacheTensor(size=len(layers) * num_blocks * block, layers=layers,
                           layer_stride=num_blocks * block, block_stride=block)
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[tensor],
                         kv_cache_groups=[KVCacheGroupSpec(layers, spec)])

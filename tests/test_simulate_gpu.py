"""The GPU step-time source: profiled tables read back as shipped, the attention model
and the defaults it claims for vLLM, against vLLM's own code."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import pytest

from vllm_ext.schedulers.latency import StepShape
from vllm_ext.simulate import tables
from vllm_ext.simulate.gpu import GPUS, SHAPES, GpuAssumptions, GpuError, GpuStepTime

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "vidur-profiles"


@pytest.mark.skipif(not SOURCE.is_dir(), reason="the source tables are not on this machine")
def test_shipped_tables_are_the_source_medians(tmp_path):
    """Rebuilding from the source gives the shipped bytes; a source row's medians are there."""
    for built in tables.build(SOURCE, tmp_path):
        assert built.read_bytes() == (tables.DATA / built.name).read_bytes(), built.name
    rows = list(csv.DictReader(open(SOURCE / "compute" / tables.COMPUTE[("h100", "llama-2-7b")]
                                    / "mlp.csv")))
    row = next(r for r in rows if r["num_tokens"] == "512" and r["num_tensor_parallel_workers"] == "2")
    _, by_tp = tables.load_compute("h100", "llama-2-7b")
    ops = dict(by_tp[2])[512]
    assert ops == pytest.approx([float(row[f"time_stats.{op}.median"]) for op in tables.OPERATORS],
                                rel=1e-4)


def test_shipped_with_the_license():
    assert "MIT License" in (tables.DATA / "LICENSE").read_text()
    assert "Microsoft" in (tables.DATA / "README.md").read_text()
    with gzip.open(tables.DATA / "a100-llama-3-8b.csv.gz", "rt") as f:
        assert next(csv.reader(f))[:2] == ["num_tokens", "tp"]


def test_a_profiled_point_is_the_tables_sum():
    """At a profiled token count and without attention work the linear part is
    embedding + layers x (the layer's operators, norms and adds twice), each curve
    raised to its largest value at fewer tokens where noise dipped below it."""
    src = GpuStepTime("a100", "llama-3-8b")
    _, by_tp = tables.load_compute("a100", "llama-3-8b")
    upto = [ops for t, ops in by_tp[1] if t <= 256]
    emb = max(ops[0] for ops in upto)
    layer = max(sum(ops[1:]) + ops[9] for ops in upto)
    parts = src.breakdown(StepShape(((256, 0),), ()))
    assert parts["linear"] == pytest.approx((emb + 32 * layer) / 1e3, rel=1e-12)
    assert parts["all_reduce"] == 0.0  # one GPU
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))


def test_attention_model_is_the_stated_roofline():
    a = GpuAssumptions(attn_flops_fraction=0.5, attn_bandwidth_fraction=0.5)
    src, shape = GpuStepTime("h100", "llama-2-7b", 1, a), SHAPES["llama-2-7b"]
    prefill = src.breakdown(StepShape(((1000, 3000),), ()))
    flops = 4 * shape.head_dim * shape.heads * 1000 * (3000 + 500) * shape.layers
    assert prefill["prefill_attention"] == pytest.approx(flops / (989e12 * 0.5))
    decode = src.breakdown(StepShape((), (4096, 1024)))
    kv = 2 * shape.kv_heads * shape.head_dim * 2 * (4096 + 1024) * shape.layers
    assert decode["kv_read"] == pytest.approx(kv / (3350e9 * 0.5))


def test_step_time_grows_with_every_token_and_context():
    src = GpuStepTime("h100", "llama-2-70b", 4)
    times = [src(StepShape(((n, 0),), (2048,) * 8)) for n in (0, 1, 17, 256, 1000, 4096, 20000)]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert src(StepShape((), (1000,) * 8)) < src(StepShape((), (8000,) * 8))
    assert src.breakdown(StepShape((), (10,)))["all_reduce"] > 0  # TP 4


def test_kv_blocks_from_memory():
    src = GpuStepTime("a100", "llama-3-8b", 1, GpuAssumptions(kv_memory_gib=16.0))
    # 128 KiB of K and V per token: 32 layers x 8 heads x 128 dims x 2 x 2 bytes
    assert src.num_blocks(16) == 16 * (1 << 30) // (16 * 128 * 1024)
    assert GpuStepTime("a100", "llama-3-8b").kv_memory_default() == pytest.approx(
        0.9 * 80 - SHAPES["llama-3-8b"].weight_bytes() / (1 << 30) - 2)


@pytest.mark.parametrize("args, message", [
    (("b200", "llama-3-8b"), "profiled GPUs are a100, h100"),
    (("a100", "llama-2-70b"), "profiled on a100: llama-2-7b, llama-3-8b"),
    (("h100", "llama-2-7b", 3), "profiled at TP \\[1, 2, 4, 8\\]"),
])
def test_refusals_name_what_is_profiled(args, message):
    with pytest.raises(GpuError, match=message):
        GpuStepTime(*args)


@pytest.mark.release
def test_serve_defaults_are_vllms_own(monkeypatch):
    """What GpuSpec says `vllm serve` picks on each GPU is what vLLM's own
    EngineArgs.get_batch_defaults returns for that GPU's name and memory."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.usage.usage_lib import UsageContext

    for spec in GPUS.values():
        monkeypatch.setattr(current_platform, "get_device_total_memory",
                            lambda *a, m=spec.memory_gib: int(m * (1 << 30)), raising=False)
        monkeypatch.setattr(current_platform, "get_device_name",
                            lambda *a, n=spec.name: f"NVIDIA {n}", raising=False)
        monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
        tokens, seqs = EngineArgs.get_batch_defaults(world_size=1)
        server = UsageContext.OPENAI_API_SERVER
        assert (tokens[server], seqs[server]) == (spec.serve_max_num_batched_tokens,
                                                  spec.serve_max_num_seqs), spec.name

"""Per-engine choices on the real engine: the session's engines share one process (the
engine host), and each gets exactly what its own config selected, nothing left over
from the engines before it; every patch a selection relies on was reached in the run."""

from __future__ import annotations

import pytest

from engine_runner import needed_patches

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

POD = "vllm_ext.engine.pod.cpu.PodAttentionBackend"
CPU_ATTN = "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend"


def test_two_engines_in_one_process_each_get_their_own_choices(run_engine):
    stock = run_engine()
    first = run_engine("--kv-allocator", "vattention", "--attn", "pod")
    # An argument list no other test uses: this engine is built after the one above.
    then = run_engine("--scheduler", "sarathi", "--budget", "48")
    assert first["pid"] == then["pid"]
    assert first["block_pool_class"] == "PagedBlockPool"
    assert first["attention_backends"] == [POD]
    assert first["kv_pool"]["totals"]["maps"] > 0
    assert then["scheduler_class"] == "SarathiScheduler"
    assert then["block_pool_class"] == "BlockPool"
    assert then["attention_backends"] == [CPU_ATTN]
    assert set(then["config"]["additional_config"]["vllm_ext"]) == {"scheduler"}
    assert not then["kv_pool"]["samples"]  # no pool wrote anything for this engine
    assert first["tokens"] == then["tokens"] == stock["tokens"]


@pytest.mark.parametrize("args", [
    ("--kv-allocator", "vattention", "--attn", "pod"),
    ("--kv-allocator", "vattention", "--vattention-page-size", "16KiB", "--block-size", "32",
     "--max-model-len", "576", "--vattention-layout", "slots", "--scheduler", "vllm",
     "--vattention-physical-limit", str(640 << 10)),
    # The engines test_engine_kvp and test_engine_spp run (each runs once a session).
    ("--kvp", "2", "--kvp-interleave", "1", "--pod-impl", "torch"),
    ("--pipeline-parallel-size", "2", "--scheduler", "sarathi", "--budget", "64"),
], ids=["vattention+pod", "vattention-slots", "kvp", "pp"])
def test_every_patch_a_selection_needs_was_reached(run_engine, args):
    result = run_engine(*args)
    needed = needed_patches(result)
    assert needed, "these selections rely on patches"
    assert needed <= set(result["patches_reached"]), needed - set(result["patches_reached"])

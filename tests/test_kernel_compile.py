"""The compile gate, with no GPU: every POD-Attention build the launcher can ask for
(fp16/bf16/fp32, each supported head size, KV-sharded or not; nothing about a batch
selects a build: tests/test_pod_kernel.py drives the launcher over 1,000 random batches
and finds only these) built by Triton for sm_80, sm_90 and sm_100 with the signature and
attributes a launch gives it, and ptxas's report of each read back. A build error, any
register spill, or more shared memory than the target has fails the test; the full
table is benchmarks/results/kernels-compile.md (python benchmarks/kernels_compile.py)."""

from __future__ import annotations

import importlib.util

import pytest

from vllm_ext.kernels import compile_check as cc

# Found without importing Triton here: this process interprets (see conftest).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="needs Triton (with its NVIDIA backend)")


def test_every_build_fits_every_target():
    reports = cc.build_all(jobs=2)
    assert {(r.config, r.target) for r in reports} == {
        (c.name, t.name) for c in cc.configs() for t in cc.TARGETS}
    targets = {t.name: t for t in cc.TARGETS}
    problems = [f"{r.config} on {r.target}: {p}" for r in reports
                for p in r.problems(targets[r.target])]
    assert not problems, "\n".join(problems)
    assert all(r.registers > 0 and r.blocks_per_sm >= 1 for r in reports)


def test_occupancy_follows_nvidias_rules():
    sm90 = next(t for t in cc.TARGETS if t.name == "sm_90")
    # 8 warps of 128 registers: 32 KiB of registers each, so two fit in 64 K.
    assert cc._blocks_per_sm(sm90, 8, 128, 16384) == 2
    # 255 registers round up to 256 per thread: one 8-warp block only.
    assert cc._blocks_per_sm(sm90, 8, 255, 0) == 1
    # Shared memory binds: 100 KiB blocks, two fit in 228 KiB with the 1 KiB reserve each.
    assert cc._blocks_per_sm(sm90, 4, 32, 100 * 1024) == 2

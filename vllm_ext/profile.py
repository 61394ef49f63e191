"""`vllm-ext profile MODEL --out FILE`: measure this engine's step times on this machine and
fit the step-time model that adaptive chunking uses (`vllm_ext.schedulers.latency`).

One engine runs a grid of workloads (prompt lengths x concurrency, decodes of short
and long contexts beside prefill chunks with and without earlier context) under the
Sarathi scheduler, whose step records carry each step's features and wall time. The
first steps of the engine (warm-up) are left out; a quarter of the rest is held out
and the fit reports its relative error there.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_ext.schedulers.latency import LatencyModel, fit

# (prompt tokens, requests, output tokens, steps between arrivals)
GRID = [(64, 1, 8, 0), (512, 1, 8, 0), (2048, 1, 4, 0), (3000, 1, 4, 0),
        (96, 8, 64, 2), (1024, 4, 48, 6), (200, 16, 48, 1), (2500, 2, 32, 10)]
QUICK = [(64, 1, 8, 0), (1024, 1, 8, 0), (2000, 1, 4, 0), (96, 8, 48, 2), (200, 16, 32, 1),
         (1500, 2, 24, 4)]
WARMUP_STEPS = 3


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

    def engine_kwargs(self) -> dict:
        import vllm_ext

        extra = {"kvp": self.kvp} if self.kvp > 1 else {}
        return vllm_ext.engine_kwargs(
            model=self.model, scheduler="sarathi", sarathi_token_budget=self.budget,
            attn=self.attn, dtype=self.dtype, enforce_eager=True, max_model_len=self.max_model_len,
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size, enable_prefix_caching=False,
            seed=0, **extra)

    def cli_args(self) -> list[str]:
        return [self.model, "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
                "--budget", str(self.budget), "--attn", self.attn,
                "--tensor-parallel-size", str(self.tensor_parallel_size),
                "--pipeline-parallel-size", str(self.pipeline_parallel_size),
                "--kvp", str(self.kvp)]


def run(target: ProfileTarget, out: str, quick: bool = False, progress: bool = True) -> LatencyModel:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    import vllm_ext

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    kwargs = target.engine_kwargs()
    max_model_len = target.max_model_len
    engine = LLMEngine.from_engine_args(EngineArgs(**kwargs))
    vocab = engine.model_config.get_vocab_size()
    first = vllm_ext.step_stats().steps
    grid = QUICK if quick else GRID
    bar = _bar(len(grid), progress)
    started = time.monotonic()
    for w, (prompt, count, output, every) in enumerate(grid):
        prompt = min(prompt, max_model_len - output)
        params = SamplingParams(temperature=0.0, max_tokens=output, ignore_eos=True)
        todo = [(i, [(5 + 7 * w + 13 * i + 3 * j) % (vocab - 10) + 5 for j in range(prompt)])
                for i in range(count)]
        step = 0
        while todo or engine.has_unfinished_requests():
            while todo and todo[0][0] * every <= step:
                i, ids = todo.pop(0)
                engine.add_request(f"profile-{w}-{i}", {"prompt_token_ids": ids}, params)
            engine.step()
            step += 1
        bar.update(1)
    bar.close()
    stats = vllm_ext.step_stats()
    records = list(stats.recent[-(stats.steps - first):]) if stats.steps > first else []
    records = [r for r in records[WARMUP_STEPS:] if r.decode_tokens + r.prefill_tokens]
    samples = [((1.0, r.prefill_tokens, r.prefill_attention, r.decode_tokens, r.decode_context),
                r.wall_s) for r in records]
    latency = fit(samples)
    latency.fit.update(**asdict(target), quick=quick, steps=len(samples),
                       seconds=round(time.monotonic() - started, 1),
                       machine=f"{platform.machine()}, {os.cpu_count()} cores",
                       vllm=_vllm_version(), vllm_ext=vllm_ext.__version__)
    Path(out).write_text(latency.to_json())
    return latency


def cache_path(target: ProfileTarget) -> Path:
    """Where the start-up profile of `target` on this machine is kept."""
    import hashlib

    import vllm_ext

    model = os.path.abspath(target.model) if os.path.exists(target.model) else target.model
    key = json.dumps([{**asdict(target), "model": model}, vllm_ext.__version__, _vllm_version(),
                      platform.machine(), os.cpu_count()])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vllm-ext" / "latency"
    name = Path(target.model.rstrip("/")).name or "model"
    return cache / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def profile_for(target: ProfileTarget) -> str:
    """The quick profile of the engine `target` describes, measured once on this machine
    (in a child process: this one is about to start the real engine) and cached."""
    import subprocess
    import sys

    from vllm_ext import envs

    path = cache_path(target)
    if path.exists():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    limit = envs.profile_timeout_s()
    print(f"vllm-ext: no --sarathi-latency-model given; profiling {target.model} once, up to "
          f"{limit:.0f} s (cached in {path})", file=sys.stderr, flush=True)
    partial = path.with_suffix(f".{os.getpid()}.part")
    cmd = [sys.executable, "-m", "vllm_ext.cli", "profile", *target.cli_args(), "--quick",
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
        from vllm_ext.components import SelectionError

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


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="profile workloads", disable=not enabled)


def summary(model: LatencyModel) -> str:
    f = model.fit
    return (f"{f['steps']} steps measured, fitted on {f['train_points']}: mean error "
            f"{100 * f['train_mean_rel_error']:.1f}% on those, {100 * f['holdout_mean_rel_error']:.1f}% "
            f"(p90 {100 * f['holdout_p90_rel_error']:.1f}%) on {f['holdout_points']} held out\n"
            f"{model.form}\ncoefficients: " + json.dumps(dict(zip(
                ("c0 s", "c1 s/token", "c2 s/attention", "c3 s/decode", "c4 s/context"),
                model.coef))))

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
import time
from dataclasses import asdict
from pathlib import Path

import vllm_ext
from vllm_ext.frontend.startup_profile import ProfileTarget, vllm_version
from vllm_ext.schedulers.latency import LatencyModel, fit

# (prompt tokens, requests, output tokens, steps between arrivals)
GRID = [(64, 1, 8, 0), (512, 1, 8, 0), (2048, 1, 4, 0), (3000, 1, 4, 0),
        (96, 8, 64, 2), (1024, 4, 48, 6), (200, 16, 48, 1), (2500, 2, 32, 10)]
QUICK = [(64, 1, 8, 0), (1024, 1, 8, 0), (2000, 1, 4, 0), (96, 8, 48, 2), (200, 16, 32, 1),
         (1500, 2, 24, 4)]
WARMUP_STEPS = 3


def engine_kwargs(target: ProfileTarget) -> dict:
    """The engine a profile measures: Sarathi's steps at the target's budget, no prefix cache."""
    extra = {"kvp": target.kvp} if target.kvp > 1 else {}
    return vllm_ext.engine_kwargs(
        model=target.model, scheduler="sarathi", sarathi_token_budget=target.budget,
        attn=target.attn, dtype=target.dtype, enforce_eager=True,
        max_model_len=target.max_model_len,
        tensor_parallel_size=target.tensor_parallel_size,
        pipeline_parallel_size=target.pipeline_parallel_size, enable_prefix_caching=False,
        seed=0, **extra)


def run(target: ProfileTarget, out: str, quick: bool = False, progress: bool = True) -> LatencyModel:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    kwargs = engine_kwargs(target)
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
                       vllm=vllm_version(), vllm_ext=vllm_ext.__version__,
                       served=step_time_traits(engine.vllm_config))
    Path(out).write_text(latency.to_json())
    return latency


# What about a served engine changes its step times, as its config says: recorded with a
# profile, compared with each arm a simulation uses the profile for.
TRAITS = {"dtype": "dtype {}", "max_num_batched_tokens": "steps of up to {} tokens",
          "attn": "attention {}", "tensor_parallel_size": "tensor parallel size {}",
          "pipeline_parallel_size": "pipeline parallel size {}", "kvp": "{} KV-parallel ranks"}


def step_time_traits(vllm_config) -> dict:
    """`TRAITS` of the engine `vllm_config` configures."""
    from vllm_ext.config import ExtConfig

    attn = ExtConfig.of(vllm_config).attn
    parallel = vllm_config.parallel_config
    return {"dtype": str(vllm_config.model_config.dtype).removeprefix("torch."),
            "max_num_batched_tokens": vllm_config.scheduler_config.max_num_batched_tokens,
            "attn": attn.name if attn is not None else "vllm",
            "tensor_parallel_size": parallel.tensor_parallel_size,
            "pipeline_parallel_size": parallel.pipeline_parallel_size,
            "kvp": parallel.decode_context_parallel_size}


def profiled_traits(model: LatencyModel) -> dict:
    """The traits of the engine a profile measured; for a profile older than that
    record, what its target says (a dtype of "auto" says nothing)."""
    fit = model.fit
    if "served" in fit:
        return dict(fit["served"])
    legacy = {"dtype": fit.get("dtype"), "max_num_batched_tokens": fit.get("budget"),
              "attn": fit.get("attn"), "tensor_parallel_size": fit.get("tensor_parallel_size"),
              "pipeline_parallel_size": fit.get("pipeline_parallel_size"), "kvp": fit.get("kvp")}
    return {k: v for k, v in legacy.items() if v not in (None, "auto")}


def mismatches(model: LatencyModel, vllm_config) -> list[str]:
    """How the engine `vllm_config` configures serves otherwise than the one `model` was
    profiled on, each as "dtype float32 (profiled at bfloat16)"."""
    profiled, serves = profiled_traits(model), step_time_traits(vllm_config)
    # Any other budget counts: a fit over steps of up to 2048 tokens forecast the steps of
    # a 256-token engine 15% long here (benchmarks/results/simulate-fidelity-cpu.md).
    return [f"{TRAITS[k].format(serves[k])} (profiled at {profiled[k]})"
            for k in TRAITS if k in profiled and profiled[k] != serves[k]]


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

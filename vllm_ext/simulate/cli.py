"""`vllm-ext simulate`: the arms of `vllm-ext bench ab`, forecast on a virtual clock."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from vllm_ext.ab.cli import (add_capacity_args, add_output_args, add_slo_args, add_trace_args,
                             capacity_from, out_dir, slo_options, traces_from)
from vllm_ext.ab.summary import SLO
from vllm_ext.ab.traces import TraceError

EXAMPLE = """examples:
  # this machine, from a profile of the served model (vllm-ext profile MODEL --out lat.json)
  vllm-ext simulate --latency-model lat.json --serve-args "--dtype float32 --max-model-len 4096" \\
      --arm vllm="--scheduler vllm" --arm sarathi="--scheduler sarathi" --qps 0.4 --seeds 2

  # the same, stock vLLM on 2 data-parallel ranks as `vllm serve --data-parallel-size 2` routes
  vllm-ext simulate --latency-model lat.json --serve-args "--dtype float32 --max-model-len 4096" \\
      --arm vllm="--scheduler vllm" --replicas 2 --router vllm-dp --qps 0.8 --seeds 2

  # how many A100s running Llama-3-8B carry 50 QPS of chat within TTFT P99 2 s, TBT P99 100 ms?
  vllm-ext simulate --gpu a100 --model-shape llama-3-8b --arm vllm="--scheduler vllm" \\
      --arm sarathi="--scheduler sarathi" --target-qps 50 --ttft-slo-s 2 --tbt-slo-ms 100 \\
      --prompt-len lognormal:1024:0.9 --output-len lognormal:256:0.5 --max-prompt-tokens 6000

  # an A100, Llama-3-8B: which Sarathi budget carries the most load within a 100 ms P99 TBT?
  vllm-ext simulate --gpu a100 --model-shape llama-3-8b --arm sarathi="--scheduler sarathi" \\
      --sweep sarathi-token-budget=256,512,1024,2048 --capacity-qps 0.5:20 --tbt-slo-ms 100 \\
      --prompt-len lognormal:1024:0.9 --output-len lognormal:256:0.5 --max-prompt-tokens 6000 \\
      --max-output-tokens 1024
"""


def add_parser(sub) -> argparse.ArgumentParser:
    from vllm_ext.simulate.gpu import GPUS, PROFILED, GpuAssumptions

    p = sub.add_parser(
        "simulate", help="forecast an A/B of vllm serve flag sets with vLLM's own scheduler on a "
                         "virtual clock (this machine's profile or a GPU's)",
        description="Run each arm's vLLM scheduler (the class and settings its `vllm serve` "
                    "flags select) over the same seeded traces on a virtual clock, each step "
                    "lasting what a step-time source predicts, and write the report `vllm-ext "
                    "bench ab` writes, marked as simulated.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("arms (the first is the base the others are compared with)")
    g.add_argument("--arm", action="append", default=[], metavar='NAME="FLAGS"',
                   help="simulate `vllm serve MODEL FLAGS` (repeatable)")
    g.add_argument("--serve-args", default="", metavar='"FLAGS"',
                   help="flags every arm gets before its own, e.g. \"--max-model-len 8192\"")
    g.add_argument("--model", help="with --latency-model or --step-time: the model directory "
                                   "(its config.json is enough); default: the profiled one")
    g.add_argument("--sweep", metavar="FLAG=V1,V2,...",
                   help="one arm per value of a serve flag in every arm that takes it, each "
                        "capacity-searched, and the best value named (implies --capacity)")
    s = p.add_argument_group("step-time source (exactly one)")
    s.add_argument("--latency-model", metavar="FILE",
                   help="a step-time model from `vllm-ext profile` (this machine)")
    s.add_argument("--gpu", choices=sorted(GPUS), help="profiled GPU operator tables "
                   "(Vidur's, MIT) with an attention model; needs --model-shape")
    s.add_argument("--model-shape", help="; ".join(f"{g}: {', '.join(m)}"
                                                   for g, m in PROFILED.items()))
    s.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs (1, 2, 4, 8)")
    s.add_argument("--step-time", metavar="MODULE:FUNCTION",
                   help="any function of a vllm_ext.schedulers.latency.StepShape -> seconds")
    d = GpuAssumptions()
    s.add_argument("--step-overhead-ms", type=float, default=d.step_overhead_ms,
                   help="--gpu: per-step CPU time (scheduling, inputs, sampling)")
    s.add_argument("--attn-flops-fraction", type=float, default=d.attn_flops_fraction,
                   help="--gpu: prefill attention's share of peak FLOPs")
    s.add_argument("--attn-bandwidth-fraction", type=float, default=d.attn_bandwidth_fraction,
                   help="--gpu: KV reads' share of HBM bandwidth")
    s.add_argument("--host-time-scale", type=float, metavar="X",
                   help="the scheduler's host time per step, timed here on each simulated step, "
                        "counts X times over (0.5: a host CPU twice as fast as this one; 0: "
                        "left out); the async loop hides it behind the device's step. Default: "
                        "1, or 0 with --latency-model (a profile's step times hold it already)")
    k = p.add_argument_group("KV cache (default: --gpu: what vLLM would leave at "
                             "--gpu-memory-utilization 0.9; else VLLM_CPU_KVCACHE_SPACE or 4 GiB)")
    k.add_argument("--kv-memory", type=float, metavar="GIB", help="KV memory per GPU (GiB)")
    k.add_argument("--num-gpu-blocks", type=int, metavar="N", help="KV blocks")
    add_fleet_args(p)
    add_trace_args(p)
    add_slo_args(p, client=False)
    add_capacity_args(p)
    # Probes cost seconds here, not minutes: search finer by default. A rate range left
    # unset is told apart from one given, which --target-qps refuses.
    p.set_defaults(capacity_probes=8, capacity_requests=256, capacity_qps=None)
    add_output_args(p, "simulate-report")
    p.set_defaults(run=run)
    return p


class OptionError(ValueError):
    pass


def add_fleet_args(p: argparse.ArgumentParser) -> None:
    from vllm_ext.simulate.routers import ROUTERS

    f = p.add_argument_group("fleet (replicas of each arm behind a router; docs/simulate.md)")
    f.add_argument("--replicas", type=int, metavar="N",
                   help="engines per arm, each with its own scheduler and KV cache (default 1)")
    f.add_argument("--router", metavar="POLICY",
                   help=f"how requests are spread over the replicas: {', '.join(ROUTERS)}. "
                        f"vllm-dp (default): vLLM's own, as `vllm serve --data-parallel-size N` "
                        f"balances; the others are an external router's")
    f.add_argument("--api-server-count", type=int, metavar="K",
                   help="--router vllm-dp: vLLM's API servers, each balancing on its own "
                        "(default: one per replica, as vLLM starts them)")
    f.add_argument("--target-qps", type=float, metavar="Q",
                   help="for each arm, the fewest replicas that carry Q QPS within the SLOs "
                        "(--ttft-slo-s as TTFT P99, --capacity-tbt-slo-ms or --tbt-slo-ms as "
                        "TBT P99, --capacity-sched-delay-s as P50 scheduling delay)")
    f.add_argument("--max-replicas", type=int, metavar="N",
                   help="--target-qps: search 1..N replicas (default 64)")
    f.add_argument("--requests-per-replica", type=int, metavar="N",
                   help="--target-qps: Poisson requests per replica in each probe (default "
                        "256, as --capacity-requests; fewer flatter the counts)")


def _fleet(a: argparse.Namespace):
    """(Fleet, ReplicaTarget or None) from the flags; every refusal names its flag."""
    from vllm_ext.ab.capacity import CapacityTarget
    from vllm_ext.simulate.engine import Fleet
    from vllm_ext.simulate.planner import ReplicaTarget
    from vllm_ext.simulate.routers import ROUTERS

    replicas = 1 if a.replicas is None else a.replicas
    if replicas < 1:
        raise OptionError(f"--replicas must be >= 1, got {replicas}")
    router = a.router or "vllm-dp"
    if router not in ROUTERS:
        raise OptionError(f"--router {router!r}: choose from {', '.join(ROUTERS)}")
    if a.api_server_count is not None:
        if router != "vllm-dp":
            raise OptionError(f"--api-server-count sets vLLM's own front end (--router vllm-dp), "
                              f"not --router {router}")
        if a.api_server_count < 1:
            raise OptionError(f"--api-server-count must be >= 1, got {a.api_server_count}")
    if a.target_qps is None:
        for flag, value in (("--max-replicas", a.max_replicas),
                            ("--requests-per-replica", a.requests_per_replica)):
            if value is not None:
                raise OptionError(f"{flag} shapes a --target-qps search; give --target-qps")
        if a.capacity_qps is None:
            a.capacity_qps = "0.1:10"
        return Fleet(replicas, router, a.api_server_count), None
    if not a.target_qps > 0:
        raise OptionError(f"--target-qps must be > 0, got {a.target_qps}")
    asked = [f for f, v in (("--capacity", a.capacity), ("--sweep", a.sweep),
                            ("--capacity-qps", a.capacity_qps)) if v]
    if asked:
        raise OptionError(f"--target-qps searches replica counts at one rate; {' and '.join(asked)} "
                          f"search{'es' * (len(asked) == 1)} rates at one count: give one or "
                          f"the other")
    most = 64 if a.max_replicas is None else a.max_replicas
    if most < 1:
        raise OptionError(f"--max-replicas must be >= 1, got {most}")
    per = 256 if a.requests_per_replica is None else a.requests_per_replica
    if per < 1:
        raise OptionError(f"--requests-per-replica must be >= 1, got {per}")
    slo = CapacityTarget(a.capacity_tbt_slo_ms or a.tbt_slo_ms, a.capacity_sched_delay_s)
    return (Fleet(replicas, router, a.api_server_count),
            ReplicaTarget(a.target_qps, most, per, slo, a.ttft_slo_s))


def _source(a: argparse.Namespace):
    """(step-time source, model directory, target, KV size) from the flags."""
    from vllm_ext.simulate.arms import Target
    from vllm_ext.simulate.gpu import GPUS, GpuAssumptions, GpuStepTime
    from vllm_ext.simulate.run import KvSize, default_cpu_kv
    from vllm_ext.simulate.sources import CallableSource, FittedSource

    given = [f for f, v in (("--latency-model", a.latency_model), ("--gpu", a.gpu),
                            ("--step-time", a.step_time)) if v]
    if len(given) != 1:
        raise OptionError("give exactly one step-time source: --latency-model FILE, --gpu "
                          "a100|h100 with --model-shape, or --step-time MODULE:FUNCTION"
                          + (f" (got {' and '.join(given)})" if given else ""))
    if a.kv_memory is not None and a.num_gpu_blocks is not None:
        raise OptionError("give --kv-memory or --num-gpu-blocks, not both")
    if a.kv_memory is not None and not a.kv_memory > 0:
        raise OptionError(f"--kv-memory must be > 0 GiB, got {a.kv_memory}")
    if a.num_gpu_blocks is not None and a.num_gpu_blocks < 2:
        raise OptionError(f"--num-gpu-blocks must be >= 2, got {a.num_gpu_blocks}")
    if a.host_time_scale is None:
        a.host_time_scale = 0.0 if a.latency_model else 1.0
    if not a.host_time_scale >= 0:
        raise OptionError(f"--host-time-scale must be >= 0, got {a.host_time_scale}")
    if a.gpu is None and (a.model_shape or a.tp != 1):
        raise OptionError("--model-shape and --tp describe a --gpu simulation; give --gpu")
    kv = (KvSize(blocks=a.num_gpu_blocks) if a.num_gpu_blocks is not None else
          KvSize(gib=a.kv_memory, why="--kv-memory") if a.kv_memory is not None else None)
    if a.gpu:
        if not a.model_shape:
            raise OptionError("--gpu needs --model-shape (profiled: see --help)")
        if a.model:
            raise OptionError("--gpu simulates --model-shape's model; leave out --model")
        for flag, value in (("--attn-flops-fraction", a.attn_flops_fraction),
                            ("--attn-bandwidth-fraction", a.attn_bandwidth_fraction)):
            if not 0 < value <= 1:
                raise OptionError(f"{flag} must be in (0, 1], got {value}")
        if a.step_overhead_ms < 0:
            raise OptionError(f"--step-overhead-ms must be >= 0, got {a.step_overhead_ms}")
        source = GpuStepTime(a.gpu, a.model_shape, a.tp, GpuAssumptions(
            a.step_overhead_ms, a.attn_flops_fraction, a.attn_bandwidth_fraction, a.kv_memory))
        spec = GPUS[a.gpu]
        target = Target("cuda", spec.serve_max_num_batched_tokens, spec.serve_max_num_seqs, 16)
        if kv is None or a.kv_memory is not None:
            kv = KvSize(blocks=source.num_blocks(16), why=source.kv_memory_note())
        return source, _shape_dir(a.model_shape, source.shape), target, kv
    source = (FittedSource(a.latency_model) if a.latency_model else
              CallableSource.load(a.step_time))
    model = a.model or getattr(source, "profiled_model", None)
    if not model:
        raise OptionError("--model DIR is needed: the model whose shape the arms are configured "
                          "for (its config.json)")
    if not (Path(model) / "config.json").is_file():
        raise OptionError(f"--model {model}: no config.json there (a model directory, e.g. "
                          f"`vllm-ext make-model DIR`)")
    return source, str(model), Target(), kv or default_cpu_kv()


def _shape_dir(name: str, shape) -> str:
    """A config.json of the profiled model's shape, written once per user."""
    import os

    from vllm_ext.tools.models import ModelPreset, make_shape

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vllm-ext" / "shapes"
    out = root / name
    if not (out / "config.json").is_file():
        make_shape(out, ModelPreset(name, shape.hidden, shape.intermediate, shape.layers,
                                    shape.heads, shape.kv_heads, shape.vocab, shape.max_position,
                                    "simulated GPU model"), dtype="bfloat16")
    return str(out)


def build(a: argparse.Namespace):
    """(ABConfig, Simulation) from the flags; every refusal before anything runs."""
    from vllm_ext.ab.progress import Progress
    from vllm_ext.ab.config import ABConfig, Arm
    from vllm_ext.simulate.run import ADAPTIVE, Simulation, Sweep
    from vllm_ext.simulate.sources import fitted_for_adaptive, write_fitted

    arms = [Arm.parse(s) for s in a.arm]
    fleet, plan = _fleet(a)
    traces, prompt, output, mix = traces_from(a)
    if a.sweep and not a.capacity:
        a.capacity = True
    capacity = capacity_from(a)
    source, model, target, kv = _source(a)
    out = out_dir(a, "simulate-report")
    shown = f"{source.shape.name} (its shape: {model})" if a.gpu else model
    cfg = ABConfig(model=shown, arms=arms, traces=traces, out=out, vocab_size=0,
                   slo=SLO(a.ttft_slo_s, a.tbt_slo_ms, a.prefill_ms_per_token),
                   common_args=tuple(shlex.split(a.serve_args)), prompts=None,
                   capacity=capacity, prompt_len=prompt, output_len=output,
                   max_prompt_tokens=a.max_prompt_tokens, max_output_tokens=a.max_output_tokens,
                   bootstrap_iterations=a.bootstrap,
                   progress=Progress(enabled=not a.no_progress), slo_mix=mix, **slo_options(a))
    cfg.check()
    sim = Simulation(source, model, kv, target, Sweep.parse(a.sweep) if a.sweep else None,
                     host_scale=a.host_time_scale, fleet=fleet, plan=plan,
                     gpus_per_replica=a.tp if a.gpu and a.tp > 1 else None)
    adaptive = any(f"--{name}-tbt-slo-ms" in args for name in ADAPTIVE
                   for args in (cfg.common_args, *(arm.serve_args for arm in arms)))
    if adaptive:
        # What `vllm-ext profile` would fit on the forecast engine, unless the source is one.
        sim.adaptive_model = (a.latency_model or str(write_fitted(
            fitted_for_adaptive(source, 8192), out / "adaptive-step-time-model.json")))
    assumptions = [*source.assumptions(), f"KV cache: {kv.describe()}."]
    if adaptive and not a.latency_model:
        assumptions.append(f"Arms with --sarathi-tbt-slo-ms or --mnemosyne-tbt-slo-ms and no "
                           f"model of their own plan with a linear step-time model fitted to "
                           f"this source ({sim.adaptive_model}).")
    cfg.simulation = {"source": source.name, "assumptions": assumptions}
    return cfg, sim


def run(a: argparse.Namespace) -> int:
    from vllm_ext.ab.config import ABError
    from vllm_ext.simulate.arms import ArmError
    from vllm_ext.simulate.gpu import GpuError
    from vllm_ext.simulate.sources import SourceError

    try:
        cfg, sim = build(a)
        from vllm_ext.simulate.run import run_simulation

        results, comparisons = run_simulation(cfg, sim, say=lambda line: print(line, flush=True))
    except (TraceError, ABError, ArmError, GpuError, SourceError, OptionError) as e:
        print(f"vllm-ext simulate: error: {e}", file=sys.stderr)
        return 2
    from vllm_ext.ab.cli import print_headline

    print(f"\nSIMULATED ({cfg.simulation['source']}); not measured.")
    print_headline(cfg, results, comparisons)
    from vllm_ext.ab.report import md_table, sweep_sections

    for kind, body in [*sweep_sections(results, cfg.simulation),
                       *cfg.simulation.get("sections", ())]:
        if kind == "ul":
            body = "\n".join(f"- {item}" for item in body)
        print(f"\n{body}" if kind == "h2" else md_table(*body) if kind == "table" else body)
    return 1 if any(r.error for r in results) else 0

"""Every arm of a simulated A/B: configs checked first, then each arm's traces and
capacity probes simulated, and the same report `bench ab` writes, marked as simulated."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from vllm_ext.ab import capacity as cap
from vllm_ext.ab import report
from vllm_ext.ab.config import ABConfig, Arm, ArmResult
from vllm_ext.ab.runner import compare_arms, probe_trace
from vllm_ext.ab.summary import summarize
from vllm_ext.ab.traces import Trace, synthesize
from vllm_ext.simulate import fleet_report
from vllm_ext.simulate.arms import ArmError, Target, arm_config
from vllm_ext.simulate.engine import Fleet, SimRun, simulate_trace
from vllm_ext.simulate.planner import ReplicaSearch, ReplicaTarget, fewest_replicas
from vllm_ext.simulate.replica import ReplicaFigures
from vllm_ext.simulate.sources import StepTimeSource

GiB = 1 << 30
# The schedulers whose --NAME-tbt-slo-ms chunks adaptively, planning with a step-time model.
ADAPTIVE = ("sarathi", "mnemosyne")


@dataclass(frozen=True, slots=True)
class Sweep:
    """One flag's values, each tried in every arm that takes the flag."""

    flag: str  # without the leading dashes
    values: tuple[str, ...]

    @classmethod
    def parse(cls, spec: str) -> Sweep:
        flag, sep, values = spec.partition("=")
        flag = flag.strip().lstrip("-")
        vals = tuple(v.strip() for v in values.split(",") if v.strip())
        if not sep or not flag or not vals:
            raise ArmError(f"--sweep {spec!r}: expected FLAG=V1,V2,... (e.g. "
                           f"sarathi-token-budget=256,512,1024)")
        return cls(flag, vals)


@dataclass(frozen=True, slots=True)
class KvSize:
    """The KV cache every arm gets: a number of blocks, or GiB per GPU."""

    blocks: int | None = None
    gib: float | None = None
    why: str = ""  # where a default came from

    def num_blocks(self, config) -> int:
        if self.blocks is not None:
            return self.blocks
        model, parallel = config.model_config, config.parallel_config
        per_token = (2 * model.get_num_layers(parallel) * model.get_num_kv_heads(parallel)
                     * model.get_head_size() * model.dtype.itemsize)
        return int(self.gib * GiB // (per_token * config.cache_config.block_size))

    def describe(self) -> str:
        if self.blocks is not None:
            return f"{self.blocks} blocks ({self.why or '--num-gpu-blocks'})"
        return f"{self.gib:g} GiB{f' ({self.why})' if self.why else ''}"


@dataclass
class Simulation:
    source: StepTimeSource
    model: str  # a directory whose config.json describes the model
    kv: KvSize
    target: Target = Target()
    sweep: Sweep | None = None
    adaptive_model: str | None = None  # for arms with --*-tbt-slo-ms and no model
    # The scheduler's host time on this machine, scaled to the serving host (0: left out).
    host_scale: float = 1.0
    fleet: Fleet = Fleet()  # replicas per arm, and their router
    plan: ReplicaTarget | None = None  # --target-qps: the fewest replicas for a rate
    gpus_per_replica: int | None = None  # a GPU forecast's tensor-parallel size
    configs: dict[str, object] = field(default_factory=dict)  # arm name -> VllmConfig
    skipped: dict[str, str] = field(default_factory=dict)  # arms the sweep left alone


def _flags(arm: Arm, sim: Simulation, common: tuple[str, ...]) -> list[str]:
    flags = [*common, *arm.serve_args]
    for name in ADAPTIVE:  # without a model the server would profile itself at start
        if (f"--{name}-tbt-slo-ms" in flags and f"--{name}-latency-model" not in flags
                and sim.adaptive_model):
            flags += [f"--{name}-latency-model", sim.adaptive_model]
    return flags


def expand_sweep(cfg: ABConfig, sim: Simulation) -> dict:
    """Replace each arm that takes the swept flag by one arm per value (`arm@v`);
    the sweep's description for the report."""
    sweep = sim.sweep
    arms, variants = [], {}
    for arm in cfg.arms:
        swept = [Arm(f"{arm.name}@{v}", (*arm.serve_args, f"--{sweep.flag}", v))
                 for v in sweep.values]
        try:  # the first value's config tells whether the arm takes the flag; prepare keeps it
            sim.configs[swept[0].name] = arm_config(sim.model, _flags(swept[0], sim,
                                                                      cfg.common_args), sim.target)
        except ArmError as e:
            sim.skipped[arm.name] = str(e).splitlines()[0]
            arms.append(arm)
            continue
        arms += swept
        variants[arm.name] = [(v, a.name) for v, a in zip(sweep.values, swept)]
    if not variants:
        raise ArmError(f"--sweep {sweep.flag}: no arm takes --{sweep.flag} "
                       f"({'; '.join(f'{n}: {w}' for n, w in sim.skipped.items())})")
    cfg.arms = arms
    return {"flag": sweep.flag, "values": list(sweep.values), "arms": variants,
            "skipped": dict(sim.skipped)}


def prepare(cfg: ABConfig, sim: Simulation) -> None:
    """Every arm's engine config, and every trace checked against it, before anything
    is simulated: a bad flag or an oversized request fails here, naming the arm."""
    for arm in cfg.arms:
        try:
            config = sim.configs.get(arm.name) or arm_config(
                sim.model, _flags(arm, sim, cfg.common_args), sim.target)
        except ArmError as e:
            raise ArmError(f"arm {arm.name} ({arm.describe()}): {e}") from None
        dp = config.parallel_config.data_parallel_size
        if dp > 1:  # an arm's config is one engine's: the fleet is made by the flags below
            raise ArmError(f"arm {arm.name}: --data-parallel-size {dp} serves {dp} engines; "
                           f"leave it out of the arm and give --replicas {dp} --router vllm-dp")
        limit = config.model_config.max_model_len
        for trace in cfg.traces:
            for i, r in enumerate(trace.requests):
                if r.prompt_tokens + r.output_tokens > limit:
                    raise ArmError(
                        f"arm {arm.name}: request {i} of seed {trace.seed} needs "
                        f"{r.prompt_tokens} prompt + {r.output_tokens} output tokens, more than "
                        f"its max_model_len {limit} (--max-prompt-tokens, or --max-model-len "
                        f"in --serve-args)")
        if sim.kv.num_blocks(config) < 2:
            raise ArmError(f"arm {arm.name}: a KV cache of {sim.kv.describe()} holds no "
                           f"blocks of this model")
        sim.configs[arm.name] = config


def _simulate(cfg: ABConfig, sim: Simulation, arm: Arm, trace: Trace, desc: str,
              fleet: Fleet | None = None) -> SimRun:
    config = sim.configs[arm.name]
    with cfg.progress.replay(desc, len(trace.requests)) as shown:
        return simulate_trace(config, sim.kv.num_blocks(config), trace, sim.source,
                              on_done=shown.request_done, host_scale=sim.host_scale,
                              sending=cfg.sending(arm), fleet=fleet or sim.fleet)


def run_arm(arm: Arm, cfg: ABConfig, sim: Simulation, say) -> ArmResult:
    result = ArmResult(arm)
    config = sim.configs[arm.name]
    runs: list[SimRun] = []
    try:
        for i, trace in enumerate(cfg.traces, start=1):
            run = _simulate(cfg, sim, arm, trace, f"[{arm.name}] seed {trace.seed} "
                                                  f"({i}/{len(cfg.traces)}), simulated")
            runs.append(run)
            result.runs.append(run.records)
            report.write_json(cfg.out / "raw" / arm.name / f"seed{trace.seed}.json",
                              {"arm": arm.name, "seed": trace.seed, "trace": trace.description,
                               "simulated": True,
                               "requests": [r.to_dict() for r in run.records],
                               "sched_delays": run.sched_delays})
        delays = [d for run in runs for d in run.sched_delays]
        steps, wall = sum(r.steps for r in runs), sum(r.wall_s for r in runs)
        result.summary = {**summarize(result.runs, cfg.slo),
                          "sched_delay_p50_s": statistics.median(delays),
                          # The figures a real server's vllm-ext metrics give (bench ab).
                          "engine_steps": sum(r.busy_steps for r in runs),
                          "engine_step_s": sum(r.busy_s for r in runs),
                          "engine_loop": loop_of(config),
                          "sim_host_s": sum(r.host_s for r in runs),
                          "sim_steps": steps, "sim_wall_s": wall,
                          "sim_steps_per_s": steps / wall if wall else float("nan"),
                          "kv_blocks": sim.kv.num_blocks(config),
                          "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
                          "max_num_seqs": config.scheduler_config.max_num_seqs}
        if sim.fleet.replicas > 1:
            per = [ReplicaFigures() for _ in range(sim.fleet.replicas)]
            for run in runs:
                for mine, theirs in zip(per, run.replicas):
                    mine.add(theirs)
            result.summary["router"] = sim.fleet.router
            result.summary["replicas"] = fleet_report.replica_rows(
                per, result.summary["duration_s"])
        if cfg.capacity is not None:
            result.capacity = _search_capacity(cfg, sim, arm, say)
        if sim.plan is not None:
            result.summary["replicas_for_target"] = _plan(cfg, sim, arm, say).to_dict()
    except Exception as e:  # one arm's failure is recorded; the others still run
        result.error = f"{type(e).__name__}: {e}"
        say(f"[{arm.name}] FAILED: {result.error}")
    result.wall_s = sum(r.wall_s for r in runs)
    return result


def _search_capacity(cfg: ABConfig, sim: Simulation, arm: Arm, say) -> cap.Capacity:
    search = cfg.capacity
    count = iter(range(search.iterations))

    def probe(qps: float) -> cap.Probe:
        index = next(count)
        run = _simulate(cfg, sim, arm, probe_trace(cfg, qps, index),
                        f"[{arm.name}] capacity probe {index + 1}/{search.iterations} at "
                        f"{qps:.3g} QPS, simulated")
        s = summarize([run.records], cfg.slo)
        return search.target.judge(qps, s["tbt_p99_ms"], statistics.median(run.sched_delays),
                                   s["failed"])

    return cap.bisect_capacity(probe, search.low_qps, search.high_qps, search.iterations,
                               lambda p: say(p.line(arm.name)))


def fleet_probe_trace(cfg: ABConfig, plan: ReplicaTarget, replicas: int,
                      qps: float | None = None) -> Trace:
    """The Poisson trace `replicas` are probed with, at the target rate unless `qps` is
    given. One seed for every count and rate (its own, per --first-seed): a larger
    count's trace extends a smaller one's."""
    return synthesize(replicas * plan.requests_per_replica, "poisson",
                      cfg.prompt_len, cfg.output_len, seed=20_000 + 100 * cfg.traces[0].seed,
                      qps=plan.qps if qps is None else qps, max_prompt=cfg.max_prompt_tokens,
                      max_output=cfg.max_output_tokens, classes=cfg.slo_mix)


def _plan(cfg: ABConfig, sim: Simulation, arm: Arm, say) -> ReplicaSearch:
    """The fewest replicas of `arm` for the target rate (see planner.py)."""
    plan = sim.plan

    def probe(n: int, qps: float):
        run = _simulate(cfg, sim, arm, fleet_probe_trace(cfg, plan, n, qps),
                        f"[{arm.name}] {n} replicas at {qps:.3g} QPS, simulated",
                        Fleet(n, sim.fleet.router, sim.fleet.api_servers))
        return plan.judge(n, qps, summarize([run.records], cfg.slo),
                          statistics.median(run.sched_delays), run.wall_s)

    return fewest_replicas(probe, plan.qps, plan.max_replicas,
                           lambda p: say(p.line(arm.name)))


def run_simulation(cfg: ABConfig, sim: Simulation,
                   say: Callable[[str], None] = print) -> tuple[list[ArmResult], dict]:
    """All arms, one after another; the report is rewritten after each."""
    cfg.check()
    if sim.sweep is not None:
        cfg.simulation = {**(cfg.simulation or {}), "sweep": expand_sweep(cfg, sim)}
    prepare(cfg, sim)
    if cfg.simulation is not None:
        cfg.simulation["assumptions"] = [*cfg.simulation.get("assumptions", ()),
                                         *engine_assumptions(sim, say)]
    cfg.out.mkdir(parents=True, exist_ok=True)
    for trace in cfg.traces:
        report.write_json(cfg.out / "trace" / f"seed{trace.seed}.json", trace.to_dict())
    results: list[ArmResult] = []
    comparisons: dict = {}
    for i, arm in enumerate(cfg.arms, start=1):
        say(f"[{arm.name}] arm {i} of {len(cfg.arms)}, simulated: {arm.describe()}")
        results.append(run_arm(arm, cfg, sim, say))
        comparisons = compare_arms(results, cfg, comparisons)
        if cfg.simulation is not None:
            cfg.simulation["sections"] = fleet_report.sections(results, sim.plan,
                                                               sim.gpus_per_replica)
        report.write(cfg, results, comparisons)
    return results, comparisons


def loop_of(config) -> str:
    return "async" if config.scheduler_config.async_scheduling else "synchronous"


def engine_assumptions(sim: Simulation, say: Callable[[str], None]) -> list[str]:
    """What a report must say of the arms' engines: the loop each runs, how the
    scheduler's host time counts, and every arm that serves otherwise than the engine
    the step-time model was profiled on (said aloud too: its times may be far off)."""
    loops: dict[str, list[str]] = {}
    for name, config in sim.configs.items():
        loops.setdefault(loop_of(config), []).append(name)
    said = ["Engine loop, as vLLM chooses it for each arm's config: " + "; ".join(
        f"{loop} ({', '.join(names)})" for loop, names in loops.items()) + "."]
    if sim.fleet.replicas > 1 or sim.plan is not None:
        fleet = (f"{sim.fleet.replicas} replicas per arm" if sim.fleet.replicas > 1 else
                 "--target-qps's fleets")
        said.append(f"Fleet: {fleet}, each an engine of its own (its own scheduler and "
                    f"KV cache of the size below, on its own clock), routed by "
                    f"{Fleet(2, sim.fleet.router, sim.fleet.api_servers).make_router().describe()}."
                    f" Figures pool every replica's requests.")
    if sim.host_scale:
        scaled = "" if sim.host_scale == 1 else f", times {sim.host_scale:g}"
        said.append(
            f"The scheduler's own host time (its schedule() and update_from_output(), timed "
            f"on every step of this simulation{scaled}"
            f") takes virtual time: in full on the synchronous loop; on the async loop it "
            f"overlaps the device's step and delays the next only where update + next "
            f"schedule exceed it. Other host work (input preparation, sampling, detokenizing, "
            f"the API server) is not modelled.")
    else:
        said.append("The scheduler's host time is not added (--host-time-scale 0): each step "
                    "follows the previous one at once, as the step-time source times it (a "
                    "profile's measured steps hold their host time already).")
    check = getattr(sim.source, "mismatches", None)
    for name, config in sim.configs.items() if check else ():
        differs = check(config)
        if differs:
            line = (f"Arm {name} serves otherwise than the profiled engine: "
                    f"{', '.join(differs)}. Its step times may be far off (a bfloat16 profile "
                    f"forecast a float32 engine 3x fast); profile the engine as it serves.")
            say(f"WARNING: {line}")
            said.append(line)
    return said


def default_cpu_kv() -> KvSize:
    """This machine's CPU engine: the KV space vLLM's CPU worker is given."""
    space = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    if space:
        return KvSize(gib=float(space), why="VLLM_CPU_KVCACHE_SPACE")
    return KvSize(gib=4.0, why="default; --kv-memory or --num-gpu-blocks to change")


__all__ = ["KvSize", "Simulation", "Sweep", "default_cpu_kv", "prepare", "run_simulation"]

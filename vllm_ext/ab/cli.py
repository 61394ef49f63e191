"""`vllm-ext bench ab`: flags -> ABConfig -> run -> headline table."""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

from vllm_ext.ab.capacity import CapacityTarget
from vllm_ext.ab.equivalence import default_prompts, load_prompts
from vllm_ext.ab.summary import SLO
from vllm_ext.ab.traces import (ARRIVALS, CSV_SLO_COLUMNS, LENGTH_FORMS, LengthDist, TraceError,
                                load_csv, parse_slo_mix, synthesize)

EXAMPLE = """example:
  vllm-ext bench ab --model DIR --serve-args "--dtype float32 --enforce-eager" \\
      --arm base="--scheduler vllm" --arm sarathi="--scheduler sarathi --sarathi-token-budget 256" \\
      --qps 1 --num-requests 60 --prompt-len lognormal:512 --output-len 128 --seeds 2
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("ab", help="A/B benchmark of vllm serve flag sets or running endpoints",
                       description="Replay one seeded trace through each arm (a `vllm serve` started "
                                   "with the arm's flags, one at a time, or a running endpoint) and "
                                   "report Metron's latency metrics, output equivalence, confidence "
                                   "intervals and, optionally, capacity.",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("arms (the first is the base the others are compared with)")
    g.add_argument("--model", help="model to serve (path or name); the endpoints' model name")
    g.add_argument("--arm", action="append", default=[], metavar='NAME="FLAGS"',
                   help="start `vllm serve MODEL FLAGS` for this arm (repeatable)")
    g.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL",
                   help="use a running OpenAI-compatible server as an arm (repeatable)")
    g.add_argument("--serve-args", default="", metavar='"FLAGS"',
                   help='flags every started server gets before its arm\'s own, e.g. '
                        '"--dtype float32 --enforce-eager --max-model-len 4096"')
    g.add_argument("--startup-timeout", type=float, default=600.0, metavar="S")
    add_trace_args(p).add_argument(
        "--vocab-size", type=int,
        help="for random prompt ids; read from MODEL/config.json when it is a directory")
    add_slo_args(p)
    e = p.add_argument_group("output equivalence")
    e.add_argument("--no-equivalence", action="store_true")
    e.add_argument("--equivalence-prompts", metavar="JSONL",
                   help='{"prompt": ..., "answer": ...} lines; a built-in set by default')
    e.add_argument("--equivalence-tokens", type=int, default=32)
    e.add_argument("--top-logprobs", type=int, default=5)
    add_capacity_args(p)
    add_output_args(p, "ab-report")
    p.set_defaults(run=run)
    return p


def main(argv: list[str]) -> int:
    """`vllm-ext bench ARGV`, on its own parser (the demo runs it in process)."""
    parser = argparse.ArgumentParser(prog="vllm-ext bench")
    add_parser(parser.add_subparsers(dest="bench", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def add_output_args(p: argparse.ArgumentParser, name: str) -> None:
    o = p.add_argument_group("output")
    o.add_argument("--out", help=f"report directory (default {name}-<UTC time>)")
    o.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    o.add_argument("--no-progress", action="store_true")


def out_dir(a: argparse.Namespace, name: str) -> Path:
    return Path(a.out or datetime.datetime.now(datetime.timezone.utc).strftime(
        f"{name}-%Y%m%d-%H%M%S"))


def add_trace_args(p: argparse.ArgumentParser):
    """The trace flags `bench ab` and `simulate` share; their group."""
    t = p.add_argument_group("trace (identical in every arm)")
    t.add_argument("--num-requests", type=int, default=64)
    t.add_argument("--arrival", choices=ARRIVALS, default="poisson")
    t.add_argument("--qps", type=float, default=1.0, help="mean arrival rate (poisson, gamma)")
    t.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma arrivals: coefficient of variation of the gaps (1 = Poisson)")
    t.add_argument("--concurrency", type=int, help="arrival 'concurrency': requests in flight")
    t.add_argument("--prompt-len", default="lognormal:512", help=f"prompt tokens: {LENGTH_FORMS}")
    t.add_argument("--output-len", default="lognormal:128", help=f"output tokens: {LENGTH_FORMS}")
    t.add_argument("--max-prompt-tokens", type=int, default=1 << 30, metavar="N",
                   help="clip sampled prompt lengths (keep prompt + output within the context)")
    t.add_argument("--max-output-tokens", type=int, default=1 << 30, metavar="N",
                   help="clip sampled output lengths")
    t.add_argument("--trace-csv", metavar="FILE",
                   help="replay arrival,prompt_tokens,output_tokens rows instead of synthesizing "
                        f"(optionally followed by columns {','.join(CSV_SLO_COLUMNS)})")
    t.add_argument("--slo-mix", metavar="NAME=SHARE[:ttft=D][:tbt=D][:prompt=L][:output=L],...",
                   help="split the requests into SLO classes by share (shares sum to 1), each "
                        "stating its deadlines (D: 1s, 200ms) and drawing its own lengths (L: "
                        "a length form with '/' for ':'), e.g. interactive=0.8:ttft=1s:tbt=200ms,"
                        "batch=0.2:ttft=30s:tbt=2s:prompt=lognormal/4000/0.3")
    t.add_argument("--seeds", type=int, default=1, help="paired traces per arm")
    t.add_argument("--first-seed", type=int, default=0,
                   help="seeds run from here; change it to replay against a server that has "
                        "seen earlier runs' prompts in its prefix cache")
    return t


def add_slo_args(p: argparse.ArgumentParser, client: bool = True) -> None:
    """The SLO flags; `client`: also how a request carries its SLOs over HTTP."""
    from vllm_ext.ab.client import SLO_SEND

    s = p.add_argument_group("SLOs (deadlines, fluidity, goodput; a request the trace gives "
                             "SLOs is judged by its own)")
    s.add_argument("--ttft-slo-s", type=float, default=2.0)
    s.add_argument("--tbt-slo-ms", type=float, default=100.0)
    s.add_argument("--prefill-ms-per-token", type=float, default=0.0,
                   help="predicted prefill time per prompt token, added to the TTFT deadline")
    if client:
        s.add_argument("--slo-send", choices=SLO_SEND, default="xargs",
                       help="how a request states its trace's SLOs: vllm_xargs ttft_slo_ms, "
                            "tbt_slo_ms (default) or headers x-slo-ttft-ms, x-slo-tpot-ms")
    s.add_argument("--slo-send-class", action="store_true",
                   help="also send each request's class name (slo_class / x-slo-class); only "
                        "for servers that define every class (--mnemosyne-slo-class), which "
                        "refuse an unknown one")
    s.add_argument("--slo-priority", metavar="CLASS=N,...",
                   help="also send vLLM's request priority by class (lower first; 'default': "
                        "requests without a class) to the arms served with --scheduling-policy "
                        "priority, e.g. interactive=0,batch=1")
    s.add_argument("--slo-priority-arms", metavar="NAME,...",
                   help="the arms --slo-priority applies to instead (an --endpoint's policy "
                        "cannot be seen)")


def slo_options(a: argparse.Namespace) -> dict:
    """The ABConfig fields of the SLO-sending flags."""
    from vllm_ext.ab.client import SLOSending

    priorities = None
    if a.slo_priority is not None:
        priorities = {}
        for item in a.slo_priority.split(","):
            name, eq, value = item.partition("=")
            try:
                if not eq or not name.strip():
                    raise ValueError
                priorities[name.strip()] = int(value)
            except ValueError:
                raise TraceError(f"--slo-priority {item!r}: expected CLASS=INTEGER,... "
                                 f"(e.g. interactive=0,batch=1)") from None
    arms = None
    if a.slo_priority_arms is not None:
        arms = tuple(n.strip() for n in a.slo_priority_arms.split(",") if n.strip())
    return {"slo_sending": SLOSending(getattr(a, "slo_send", "xargs"), a.slo_send_class),
            "slo_priority": priorities, "slo_priority_arms": arms}


def add_capacity_args(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("capacity search (Sarathi-Serve's method)")
    c.add_argument("--capacity", action="store_true",
                   help="bisect each arm's capacity (probes: Poisson arrivals, --prompt-len and "
                        "--output-len lengths)")
    c.add_argument("--capacity-tbt-slo-ms", type=float, help="P99 TBT bound (default --tbt-slo-ms)")
    c.add_argument("--capacity-sched-delay-s", type=float, default=2.0, help="P50 bound")
    c.add_argument("--capacity-qps", default="0.1:10", metavar="LO:HI")
    c.add_argument("--capacity-probes", type=int, default=5)
    c.add_argument("--capacity-requests", type=int, default=64, help="requests per probe")


def vocab_size_of(model: str | None, given: int | None) -> int:
    if given is not None:
        if given < 32:
            raise TraceError(f"--vocab-size must be >= 32, got {given}")
        return given
    config = Path(model) / "config.json" if model else None
    if config is not None and config.is_file():
        d = json.loads(config.read_text())
        size = d.get("vocab_size") or d.get("text_config", {}).get("vocab_size")
        if size:
            return int(size)
    raise TraceError(f"cannot tell the vocabulary size of {model!r} (no config.json there); "
                     f"pass --vocab-size")


def build_config(a: argparse.Namespace):
    from vllm_ext.ab.progress import Progress
    from vllm_ext.ab.config import ABConfig, Arm

    arms = [Arm.parse(s) for s in a.arm] + [Arm.parse(s, endpoint=True) for s in a.endpoint]
    traces, prompt, output, mix = traces_from(a)
    capacity = capacity_from(a)
    prompts = None
    if not a.no_equivalence:
        prompts = load_prompts(a.equivalence_prompts) if a.equivalence_prompts else default_prompts()
    out = out_dir(a, "ab-report")
    cfg = ABConfig(model=a.model, arms=arms, traces=traces, out=out,
                   vocab_size=0,
                   slo=SLO(a.ttft_slo_s, a.tbt_slo_ms, a.prefill_ms_per_token),
                   common_args=tuple(shlex.split(a.serve_args)), prompts=prompts,
                   equivalence_tokens=a.equivalence_tokens, top_k=a.top_logprobs,
                   capacity=capacity, prompt_len=prompt, output_len=output,
                   max_prompt_tokens=a.max_prompt_tokens, max_output_tokens=a.max_output_tokens,
                   bootstrap_iterations=a.bootstrap, startup_timeout=a.startup_timeout,
                   progress=Progress(enabled=not a.no_progress), slo_mix=mix, **slo_options(a))
    cfg.check()
    cfg.vocab_size = vocab_size_of(a.model, a.vocab_size)
    return cfg


def traces_from(a: argparse.Namespace):
    """(one trace per seed, prompt lengths, output lengths, SLO classes) from the trace
    flags."""
    if a.seeds < 1:
        raise TraceError(f"--seeds must be >= 1, got {a.seeds}")
    seeds = range(a.first_seed, a.first_seed + a.seeds)
    prompt = LengthDist.parse(a.prompt_len, "--prompt-len")
    output = LengthDist.parse(a.output_len, "--output-len")
    mix = parse_slo_mix(a.slo_mix) if a.slo_mix else ()
    if a.trace_csv:
        if mix:
            raise TraceError("--slo-mix draws classes for a generated trace; a --trace-csv "
                             f"states them in its columns ({','.join(CSV_SLO_COLUMNS)})")
        traces = [load_csv(a.trace_csv, seed=s) for s in seeds]
    else:
        traces = [synthesize(a.num_requests, a.arrival, prompt, output, seed=s, qps=a.qps,
                             burstiness=a.burstiness, concurrency=a.concurrency,
                             max_prompt=a.max_prompt_tokens, max_output=a.max_output_tokens,
                             classes=mix)
                  for s in seeds]
    return traces, prompt, output, mix


def capacity_from(a: argparse.Namespace):
    """The capacity search the flags ask for, or None."""
    from vllm_ext.ab.config import CapacitySearch

    if not a.capacity:
        return None
    try:
        lo, hi = (float(x) for x in a.capacity_qps.split(":"))
    except ValueError:
        raise TraceError(f"--capacity-qps {a.capacity_qps!r}: expected LO:HI") from None
    if not 0 < lo < hi or a.capacity_probes < 1 or a.capacity_requests < 1:
        raise TraceError("capacity search needs 0 < LO < HI, --capacity-probes >= 1 and "
                         "--capacity-requests >= 1")
    return CapacitySearch(CapacityTarget(a.capacity_tbt_slo_ms or a.tbt_slo_ms,
                                         a.capacity_sched_delay_s), lo, hi,
                          a.capacity_probes, a.capacity_requests)


def run(a: argparse.Namespace) -> int:
    from vllm_ext.ab.runner import ABError, run_ab

    try:
        cfg = build_config(a)
    except (TraceError, ABError) as e:
        print(f"vllm-ext bench ab: error: {e}", file=sys.stderr)
        return 2
    # Flushed, so that in a log these lines keep their place among the progress lines
    # (stderr); stdout to a pipe is otherwise written in blocks.
    results, comparisons = run_ab(cfg, say=lambda line: print(line, flush=True))
    print_headline(cfg, results, comparisons)
    return 1 if any(r.error or r.problems for r in results) else 0


def print_headline(cfg, results, comparisons) -> None:
    from vllm_ext.ab.plots import missing
    from vllm_ext.ab.report import (LAG_WARNING, class_rows, headline_rows, lagging_arms,
                                    md_table)

    print()
    print(md_table(*headline_rows(results, comparisons, compact=True)))
    if (per_class := class_rows(results, compact=True)) is not None:
        print("\nPer SLO class (each request judged by its own deadlines):")
        print(md_table(*per_class))
    for entry in comparisons.values():
        if "equivalence" in entry:
            print(entry["equivalence"]["verdict"])
    for r in results:
        if r.error:
            print(f"{r.arm.name} FAILED: {r.error.splitlines()[0]} (see {cfg.out}/summary.md)")
        for p in r.problems:
            print(f"{r.arm.name}: {p.splitlines()[0]}")
    if behind := lagging_arms(results, cfg):
        print(f"\nWarning: the load generator fell behind ({', '.join(behind)}): {LAG_WARNING}")
    if note := missing():
        print(f"\n{note}")
    print(f"\nreport: {cfg.out}/report.html, {cfg.out}/summary.md, raw data in {cfg.out}/raw/")

"""`vllm-ext`: the project's own commands (serving itself is `vllm serve ... --scheduler NAME`)."""

from __future__ import annotations

import argparse
import sys


def _make_model(args: argparse.Namespace) -> int:
    from vllm_ext.tools.models import make_model

    path = make_model(args.dir, preset=args.preset, seed=args.seed)
    print(path)
    return 0


def _components(args: argparse.Namespace) -> int:
    from vllm_ext.frontend.components import KINDS
    from vllm_ext.frontend.registry import components

    for kind, (flag, _) in KINDS.items():
        for name, comp in sorted(components(kind).items()):
            opts = " ".join(f"{o.flag(name)}" for o in comp.options)
            print(f"{flag:<15} {name:<14} {comp.summary}" + (f"  [{opts}]" if opts else ""))
    return 0


def _profile(args: argparse.Namespace) -> int:
    from vllm_ext.tools.profile import ProfileTarget, run, summary

    target = ProfileTarget(args.model, args.dtype, args.max_model_len, args.budget, args.attn,
                           args.tensor_parallel_size, args.pipeline_parallel_size, args.kvp)
    model = run(target, args.out, quick=args.quick)
    print(summary(model))
    print(f"wrote {args.out}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from vllm_ext.tools.doctor import run

    return run()


def _demo(args: argparse.Namespace) -> int:
    from vllm_ext.tools.demo import run

    if args.qps is not None and not args.qps > 0:
        print(f"vllm-ext demo: error: --qps must be > 0, got {args.qps}", file=sys.stderr)
        return 2
    return run(args.workdir, qps=args.qps, sizing=not args.no_sizing)


def build_parser() -> argparse.ArgumentParser:
    from vllm_ext.tools.models import PRESETS

    parser = argparse.ArgumentParser(prog="vllm-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-model", help="build a synthetic Llama model with random weights "
                                           "and a locally trained tokenizer (no network)")
    mk.add_argument("dir", help="output directory (reused if it holds the same preset and seed)")
    mk.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                    help="; ".join(f"{p.name}: {p.purpose}" for p in PRESETS.values()))
    mk.add_argument("--seed", type=int, default=0)
    mk.set_defaults(run=_make_model)
    ls = sub.add_parser("components", help="list the selectable components and their flags")
    ls.set_defaults(run=_components)
    demo = sub.add_parser("demo", help="A/B of stock vLLM, prefill-first, sarathi and mnemosyne "
                                       "on the small synthetic model on CPU, load and SLOs sized "
                                       "to this machine, ~10 minutes")
    demo.add_argument("--workdir", default="demo", help="where the model and the report go")
    demo.add_argument("--qps", type=float, help="request rate (default: 80%% of stock vLLM's "
                                                "capacity here, simulated from a profile)")
    demo.add_argument("--no-sizing", action="store_true",
                      help="neither profile nor simulate: the SLOs and rate sizing chose on "
                           "this project's 2-core CI machine (or --qps)")
    demo.set_defaults(run=_demo)
    prof = sub.add_parser("profile", help="measure this engine's step times here and fit the "
                                          "step-time model for --sarathi-tbt-slo-ms")
    prof.add_argument("model")
    prof.add_argument("--out", required=True, help="where the model (JSON) goes")
    prof.add_argument("--quick", action="store_true", help="fewer workloads (about a minute "
                                                           "on the tiny model)")
    prof.add_argument("--budget", type=int, default=512, help="largest step in tokens")
    prof.add_argument("--max-model-len", type=int, default=4096)
    prof.add_argument("--attn", choices=("vllm", "pod"), default="vllm",
                      help="the attention backend the served engine will use")
    prof.add_argument("--tensor-parallel-size", type=int, default=1)
    prof.add_argument("--pipeline-parallel-size", type=int, default=1)
    prof.add_argument("--kvp", type=int, default=1, help="KV-cache parallel ranks (--kvp)")
    prof.add_argument("--dtype", default="auto", help="as vLLM's --dtype (float32 on CPUs "
                                                     "without bf16)")
    prof.set_defaults(run=_profile)
    doc = sub.add_parser("doctor", help="check the installed vLLM: support, every patch's "
                                        "targets, attention platform, Triton, CUDA VMM")
    doc.set_defaults(run=_doctor)
    bench = sub.add_parser("bench", help="benchmarks (ab: A/B of serve flag sets or endpoints)")
    from vllm_ext.ab.cli import add_parser as add_ab

    add_ab(bench.add_subparsers(dest="bench", required=True))
    from vllm_ext.simulate.cli import add_parser as add_simulate

    add_simulate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

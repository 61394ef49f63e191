"""`vllm-ext`: the project's own commands (serving itself is `vllm serve ... --scheduler NAME`)."""

from __future__ import annotations

import argparse
import sys


def _make_model(args: argparse.Namespace) -> int:
    from vllm_ext.models import make_model

    path = make_model(args.dir, preset=args.preset, seed=args.seed)
    print(path)
    return 0


def _components(args: argparse.Namespace) -> int:
    from vllm_ext.components import KINDS
    from vllm_ext.registry import components

    for kind, (flag, _) in KINDS.items():
        for name, comp in sorted(components(kind).items()):
            opts = " ".join(f"{o.flag(name)}" for o in comp.options)
            print(f"{flag:<15} {name:<14} {comp.summary}" + (f"  [{opts}]" if opts else ""))
    return 0


def _profile(args: argparse.Namespace) -> int:
    from vllm_ext.profile import run, summary

    model = run(args.model, args.out, quick=args.quick, budget=args.budget,
                max_model_len=args.max_model_len, dtype=args.dtype)
    print(summary(model))
    print(f"wrote {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vllm_ext.demo import run

    return run(args.workdir)


def build_parser() -> argparse.ArgumentParser:
    from vllm_ext.models import PRESETS

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
    demo = sub.add_parser("demo", help="A/B of the schedulers (vllm, prefill-first, sarathi) on "
                                       "the small synthetic model on CPU, ~10 minutes")
    demo.add_argument("--workdir", default="demo", help="where the model and the report go")
    demo.set_defaults(run=_demo)
    prof = sub.add_parser("profile", help="measure this engine's step times here and fit the "
                                          "step-time model for --sarathi-tbt-slo-ms")
    prof.add_argument("model")
    prof.add_argument("--out", required=True, help="where the model (JSON) goes")
    prof.add_argument("--quick", action="store_true", help="fewer workloads (about a minute "
                                                           "on the tiny model)")
    prof.add_argument("--budget", type=int, default=512, help="largest step in tokens")
    prof.add_argument("--max-model-len", type=int, default=4096)
    prof.add_argument("--dtype", default="auto", help="as vLLM's --dtype (float32 on CPUs "
                                                     "without bf16)")
    prof.set_defaults(run=_profile)
    bench = sub.add_parser("bench", help="benchmarks (ab: A/B of serve flag sets or endpoints)")
    from vllm_ext.ab.cli import add_parser as add_ab

    add_ab(bench.add_subparsers(dest="bench", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

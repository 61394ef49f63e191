"""The README's main job: an A/B run of the three schedulers on the small synthetic model,
on CPU, through the same `vllm-ext bench ab` an operator would use.

Prompts of a few hundred to ~2K tokens arrive while earlier requests decode: the
traffic where a prefill either stalls running decodes (prefill-first, and stock
vLLM when a long chunk leads its step) or shares each step with them (sarathi).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from vllm_ext.tools.serve import CPU_SERVE_ARGS

ARMS = {"vllm": "--scheduler vllm", "prefill-first": "--scheduler prefill-first",
        "sarathi": "--scheduler sarathi"}
# Sized to finish on 2 CPU cores in about ten minutes after set-up (three server
# starts, two seeds of 16 requests per arm, the equivalence prompts).
TRAFFIC = ("--num-requests", "16", "--qps", "0.4", "--prompt-len", "lognormal:384:0.8",
           "--max-prompt-tokens", "2048", "--output-len", "uniform:32:96", "--seeds", "2",
           "--ttft-slo-s", "5", "--tbt-slo-ms", "1000")


def bench_argv(model: Path, out: Path) -> list[str]:
    serve = [*CPU_SERVE_ARGS, "--max-model-len", "4096"]
    arms = [a for name, flags in ARMS.items() for a in ("--arm", f"{name}={flags}")]
    return ["bench", "ab", "--model", str(model), "--serve-args", shlex.join(serve), *arms,
            *TRAFFIC, "--out", str(out)]


def shown(argv: list[str]) -> str:
    """The command as a person would type it: --arm NAME="FLAGS"."""
    words = []
    for prev, word in zip(["", *argv], argv):
        name, _, flags = word.partition("=")
        words.append(f'{name}="{flags}"' if prev == "--arm" else shlex.quote(word))
    return " ".join(words)


def run(workdir: str | Path = "demo") -> int:
    from vllm_ext.ab.cli import main as bench
    from vllm_ext.tools.models import make_model

    workdir = Path(workdir)
    model = make_model(workdir / "small", preset="small")
    argv = bench_argv(model, workdir / "ab-report")
    print("$ vllm-ext " + shown(argv), flush=True)
    return bench(argv[1:])  # argv[0] is "bench"


if __name__ == "__main__":
    sys.exit(run())

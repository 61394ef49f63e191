"""Cross-check: the A/B harness and vLLM's own `vllm bench serve` measure the same
server under the same load, and their TTFT and TPOT should agree.

    python benchmarks/crosscheck_bench_serve.py [--model DIR] [--out benchmarks/results]

One `vllm serve` (small synthetic model, --scheduler sarathi) is started; `vllm bench
serve` (random dataset, fixed lengths) and `vllm-ext bench ab --endpoint` with the same
lengths and request count take turns against it, twice each, one request at a time.
Under load the two cannot be compared run for run: with Poisson arrivals each tool
draws its own arrival times, and in a closed loop of several equal requests they
phase-lock (arriving together, or staggered) by chance; either moves TTFT by more
than a measuring error could.
Results go to OUT/crosscheck-cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from vllm_ext.ab.report import machine, md_table
from vllm_ext.tools.serve import CPU_SERVE_ARGS, VllmServer, vllm_command

PROMPT, OUTPUT, REQUESTS, CONCURRENCY, ROUNDS = 256, 32, 16, 1, 2
# (label, vllm bench serve key, harness summary key, harness unit -> ms)
ROWS = (
    ("TTFT mean (ms)", "mean_ttft_ms", "ttft_mean_s", 1e3),
    ("TTFT median (ms)", "median_ttft_ms", "ttft_p50_s", 1e3),
    ("TPOT mean (ms)", "mean_tpot_ms", "tpot_mean_ms", 1.0),
    ("TPOT median (ms)", "median_tpot_ms", "tpot_p50_ms", 1.0),
    ("output tok/s", "output_throughput", "out_tok_per_s", 1.0),
)


def bench_serve(url: str, model: str, workdir: Path, seed: int, logprobs: bool) -> dict:
    cmd = [vllm_command(), "bench", "serve", "--backend", "vllm", "--base-url", url,
           "--model", model, "--tokenizer", model, "--dataset-name", "random",
           "--random-input-len", str(PROMPT), "--random-output-len", str(OUTPUT),
           "--random-range-ratio", "0", "--num-prompts", str(REQUESTS), "--temperature", "0",
           "--request-rate", "inf", "--max-concurrency", str(CONCURRENCY), "--seed", str(seed),
           "--ignore-eos", "--save-result", "--result-dir", str(workdir),
           "--result-filename", f"bench_serve{seed}{logprobs}.json"]
    # The harness asks for logprobs=0 (to count the tokens in each event), which costs
    # the server a little; with the same request, bench serve shows what that costs.
    subprocess.run(cmd + ["--logprobs", "0"] * logprobs, check=True)
    return json.loads((workdir / f"bench_serve{seed}{logprobs}.json").read_text())


def harness(url: str, model: str, workdir: Path, seed: int) -> dict:
    from vllm_ext.tools.cli import main

    out = workdir / f"ab{seed}"
    main(["bench", "ab", "--model", model, "--endpoint", f"sarathi={url}", "--num-requests",
          str(REQUESTS), "--arrival", "concurrency", "--concurrency", str(CONCURRENCY),
          "--prompt-len", str(PROMPT), "--output-len", str(OUTPUT), "--no-equivalence",
          "--first-seed", str(seed), "--out", str(out)])  # new prompts each round: no cache hits
    return json.loads((out / "report.json").read_text())["arms"][0]["summary"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: build the small preset)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    opts = ap.parse_args()
    from vllm_ext.tools.models import make_model

    work = Path(tempfile.mkdtemp(prefix="crosscheck-"))
    model = str(opts.model or make_model(work / "small", preset="small"))
    args = [*CPU_SERVE_ARGS, "--max-model-len", "4096", "--scheduler", "sarathi"]
    plain, with_lp, ours = [], [], []
    with VllmServer(model, args, work / "server.log") as url:
        for r in range(ROUNDS):  # taking turns, so drift over time hits all alike
            plain.append(bench_serve(url, model, work, seed=2 * r + 1, logprobs=False))
            with_lp.append(bench_serve(url, model, work, seed=2 * r + 2, logprobs=True))
            ours.append(harness(url, model, work, seed=r + 1))
    head = ["metric", "bench ab", "bench serve", "bench serve --logprobs 0",
            "ab / serve", "ab / serve --logprobs 0"]
    mean = lambda xs: sum(xs) / len(xs)
    rows = []
    for label, k_theirs, k_ours, scale in ROWS:
        a = mean([o[k_ours] * scale for o in ours])
        b, c = mean([t[k_theirs] for t in plain]), mean([t[k_theirs] for t in with_lp])
        rows.append([label, f"{a:.1f}", f"{b:.1f}", f"{c:.1f}", f"{a / b:.3f}", f"{a / c:.3f}"])
    text = (f"# Harness vs `vllm bench serve`\n\nOne `vllm serve {' '.join(args)}` of the small "
            f"synthetic model; each run {REQUESTS} requests of {PROMPT} prompt + {OUTPUT} output "
            f"tokens in a closed loop of {CONCURRENCY}, each tool with its own random prompts; "
            f"the tools take turns, {ROUNDS} runs each, means shown. {machine()}.\n\n"
            f"{md_table(head, rows)}\n")
    print(text)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "crosscheck-cpu.md").write_text(text)
    (out / "crosscheck-cpu.json").write_text(json.dumps({"harness": ours, "vllm_bench_serve": plain,
                                                         "vllm_bench_serve_logprobs0": with_lp},
                                                        indent=1, default=str))


if __name__ == "__main__":
    main()

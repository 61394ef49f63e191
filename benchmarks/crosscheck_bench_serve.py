"""Cross-check: the A/B harness and vLLM's own `vllm bench serve` measure the same
server under the same load, and their TTFT and TPOT should agree.

    python benchmarks/crosscheck_bench_serve.py [--model DIR] [--out benchmarks/results]

One `vllm serve` (small synthetic model, --scheduler sarathi) is started; `vllm bench
serve` (random dataset, fixed lengths, Poisson arrivals) and then `vllm-ext bench ab
--endpoint` with the same lengths, rate and request count run against it. Results
go to OUT/crosscheck-<machine>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from vllm_ext.ab.report import machine, md_table
from vllm_ext.serve import CPU_SERVE_ARGS, VllmServer, vllm_command

PROMPT, OUTPUT, REQUESTS, QPS = 256, 64, 40, 0.5
# (label, vllm bench serve key, harness summary key, harness unit -> ms)
ROWS = (
    ("TTFT mean (ms)", "mean_ttft_ms", "ttft_mean_s", 1e3),
    ("TTFT median (ms)", "median_ttft_ms", "ttft_p50_s", 1e3),
    ("TPOT mean (ms)", "mean_tpot_ms", "tpot_mean_ms", 1.0),
    ("TPOT median (ms)", "median_tpot_ms", "tpot_p50_ms", 1.0),
    ("output tok/s", "output_throughput", "out_tok_per_s", 1.0),
)


def bench_serve(url: str, model: str, workdir: Path) -> dict:
    cmd = [vllm_command(), "bench", "serve", "--backend", "vllm", "--base-url", url,
           "--model", model, "--tokenizer", model, "--dataset-name", "random",
           "--random-input-len", str(PROMPT), "--random-output-len", str(OUTPUT),
           "--random-range-ratio", "0", "--num-prompts", str(REQUESTS),
           "--request-rate", str(QPS), "--seed", "1", "--ignore-eos", "--save-result",
           "--result-dir", str(workdir), "--result-filename", "bench_serve.json"]
    subprocess.run(cmd, check=True)
    return json.loads((workdir / "bench_serve.json").read_text())


def harness(url: str, model: str, workdir: Path) -> dict:
    from vllm_ext.cli import main

    main(["bench", "ab", "--model", model, "--endpoint", f"sarathi={url}", "--num-requests",
          str(REQUESTS), "--qps", str(QPS), "--prompt-len", str(PROMPT), "--output-len",
          str(OUTPUT), "--no-equivalence", "--out", str(workdir / "ab")])
    return json.loads((workdir / "ab" / "report.json").read_text())["arms"][0]["summary"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: build the small preset)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    from vllm_ext.models import make_model

    work = Path(tempfile.mkdtemp(prefix="crosscheck-"))
    model = str(a.model or make_model(work / "small", preset="small"))
    args = [*CPU_SERVE_ARGS, "--max-model-len", "4096", "--scheduler", "sarathi"]
    with VllmServer(model, args, work / "server.log") as url:
        theirs = bench_serve(url, model, work)
        ours = harness(url, model, work)
    rows = [[label, f"{ours[k_ours] * scale:.1f}", f"{theirs[k_theirs]:.1f}",
             f"{ours[k_ours] * scale / theirs[k_theirs]:.3f}"] for label, k_theirs, k_ours, scale in ROWS]
    table = md_table(["metric", "vllm-ext bench ab", "vllm bench serve", "ratio"], rows)
    text = (f"# Harness vs `vllm bench serve`\n\nOne `vllm serve {' '.join(args)}` of the small "
            f"synthetic model; {REQUESTS} requests, {PROMPT} prompt + {OUTPUT} output tokens, "
            f"Poisson {QPS} QPS, each tool its own random prompts and arrival draws. "
            f"{machine()}.\n\n{table}\n")
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "crosscheck-cpu.md").write_text(text)
    (out / "crosscheck-cpu.json").write_text(json.dumps({"harness": ours, "vllm_bench_serve": theirs},
                                                        indent=1, default=str))


if __name__ == "__main__":
    main()

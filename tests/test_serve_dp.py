"""vllm-ext under vLLM's data parallelism: one `vllm serve --data-parallel-size 2` (vLLM's
own load balancer and DP coordinator, two engine cores, two API server processes) on
127.0.0.1 with --scheduler sarathi, driven by the real openai client.

- Exactness: the tokens are stock vLLM's, whichever rank served each request.
- Each rank's series on /metrics, labelled as vLLM labels its own (`engine`,
  `model_name`), agree with vLLM's own per-engine counters, and `step_stats(engine=k)`
  reads the same.
- `vllm-ext bench ab` against the deployment reports each rank's load and steps.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine_runner import MAX_TOKENS, prompts
from vllm_ext import envs
from vllm_ext.ab import promtext
from vllm_ext.tools.serve import CPU_SERVE_ARGS, VllmServer

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

BUDGET = "64"  # the long prompts (300-520 tokens) are chunked on either rank


@pytest.fixture(scope="module")
def dp_server(tiny_model, tmp_path_factory):
    stats = tmp_path_factory.mktemp("dp-stats")
    log = tmp_path_factory.mktemp("dp-serve") / "server.log"
    args = [*CPU_SERVE_ARGS, "--max-model-len", "1024", "--data-parallel-size", "2",
            "--scheduler", "sarathi", "--sarathi-token-budget", BUDGET]
    with VllmServer(tiny_model, args, log, env={envs.STATS_DIR: str(stats)}) as base:
        yield base, stats, log


@pytest.fixture(scope="module")
def served(dp_server, tiny_model):
    """The engine tests' prompts, all at once, and /metrics afterwards."""
    from openai import OpenAI

    base, _, _ = dp_server
    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]

    def complete(ids: list[int]) -> list[int]:
        r = client.completions.create(
            model=str(tiny_model), prompt=ids, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True})
        return r.choices[0].token_ids

    with ThreadPoolExecutor(8) as pool:
        tokens = list(pool.map(complete, prompts(vocab)))
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    return tokens, text


def test_both_ranks_run_the_pack_and_serve_stock_tokens(dp_server, served, run_engine):
    _, _, log = dp_server
    tokens, _ = served
    stock = run_engine()  # stock vLLM, one engine, the same prompts (tests/engine_runner.py)
    assert tokens == [stock["tokens"][f"req-{i}"] for i in range(len(tokens))]
    text = log.read_text()
    for rank in (0, 1):
        assert re.search(rf"EngineCore_DP{rank} .*vllm-ext active: scheduler=sarathi\("
                         rf"token_budget={BUDGET}", text), f"rank {rank} without the pack"


def test_each_rank_is_labelled_as_vllm_labels_it_and_agrees_with_vllms_counters(served):
    tokens, text = served
    ours = {name: promtext.by_label(text, f"vllm_ext_{name}", "engine")
            for name in ("steps_total", "prefill_tokens_total", "decode_tokens_total")}
    vllm = {name: promtext.by_label(text, f"vllm:{name}", "engine")
            for name in ("request_success_total", "prompt_tokens_total",
                         "generation_tokens_total", "prefix_cache_hits_total")}
    assert set(ours["steps_total"]) == {"0", "1"}
    requests = vllm["request_success_total"]
    assert sum(requests.values()) == len(tokens) and min(requests.values()) > 0, requests
    for rank in ("0", "1"):
        assert ours["steps_total"][rank] > 0
        # The prompt tokens vLLM counted on that rank are the ones our scheduler there
        # scheduled (less its prefix-cache hits); its generated tokens, one per decode
        # plus the first of each request (from the prefill).
        assert ours["prefill_tokens_total"][rank] == \
            vllm["prompt_tokens_total"][rank] - vllm["prefix_cache_hits_total"][rank]
        assert ours["decode_tokens_total"][rank] == \
            vllm["generation_tokens_total"][rank] - requests[rank]
    model = {labels["model_name"] for labels, _ in promtext.samples(text, "vllm_ext_steps_total")}
    assert model == {labels["model_name"] for labels, _ in
                     promtext.samples(text, "vllm:request_success_total")}


def test_step_stats_per_rank(dp_server, served, monkeypatch):
    import vllm_ext

    _, stats, _ = dp_server
    _, text = served
    monkeypatch.setenv(envs.STATS_DIR, str(stats))
    by_engine = vllm_ext.step_stats_by_engine()
    assert set(by_engine) == {0, 1}
    steps = promtext.by_label(text, "vllm_ext_steps_total", "engine")
    for rank, stats_k in by_engine.items():
        assert vllm_ext.step_stats(engine=rank).steps == stats_k.steps >= steps[str(rank)]
    assert vllm_ext.step_stats().steps == sum(s.steps for s in by_engine.values())


def test_bench_ab_reports_each_ranks_load(dp_server, tiny_model, tmp_path):
    base, _, _ = dp_server
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "vllm_ext", "bench", "ab", "--model", str(tiny_model),
           "--endpoint", f"dp={base}", "--num-requests", "12", "--qps", "20",
           "--prompt-len", "uniform:20:100", "--output-len", "6", "--seeds", "1",
           "--no-equivalence", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    arm = json.loads((out / "report.json").read_text())["arms"][0]
    engines = arm["summary"]["per_engine"]
    assert set(engines) == {"0", "1"}
    assert sum(e["requests"] for e in engines.values()) == 12  # the replay's, not before it
    assert sum(e["generation_tokens"] for e in engines.values()) == 12 * 6
    assert all(e["steps"] > 0 for e in engines.values() if e["requests"])
    report = (out / "summary.md").read_text()
    assert "## Per engine (data-parallel ranks)" in report

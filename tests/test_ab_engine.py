"""A short real A/B run: `vllm-ext bench ab` starts `vllm serve` for its serve arms on the
tiny model, measures a running server (the session's shared one) as an endpoint arm,
replays one trace through the openai client, and writes the report. A broken arm and
an unreachable endpoint fail with their reasons while the good arms' results stay whole."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_ext.tools.serve import CPU_SERVE_ARGS, free_port

pytestmark = pytest.mark.engine

OUTPUT_TOKENS = 12


@pytest.fixture(scope="module")
def ab_run(tiny_model, tmp_path_factory, shared_server):
    out = tmp_path_factory.mktemp("ab") / "report"
    dead = f"http://127.0.0.1:{free_port()}"
    serve = " ".join([*CPU_SERVE_ARGS, "--max-model-len", "1024"])
    # The sarathi arm is the session's running server (Mnemosyne: Sarathi's steps with
    # prefills in deadline order, budget 64, over vattention):
    # the harness measures an endpoint the same way as a server it starts.
    cmd = [sys.executable, "-m", "vllm_ext", "bench", "ab", "--model", str(tiny_model),
           "--serve-args", serve,
           "--arm", "base=--scheduler vllm",
           "--arm", "broken=--max-num-seqs not-a-number",
           "--endpoint", f"sarathi={shared_server[0]}",
           "--endpoint", f"gone={dead}",
           "--num-requests", "10", "--qps", "5", "--prompt-len", "uniform:20:200",
           "--output-len", str(OUTPUT_TOKENS), "--seeds", "2",
           "--equivalence-tokens", "32", "--capacity", "--capacity-probes", "1",
           "--capacity-requests", "6", "--capacity-qps", "1:4", "--tbt-slo-ms", "500",
           "--bootstrap", "200", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    return proc, out, json.loads((out / "report.json").read_text())


def test_failed_arms_exit_nonzero_and_say_why(ab_run):
    proc, out, report = ab_run
    assert proc.returncode == 1, proc.stderr[-3000:]
    arms = {a["name"]: a for a in report["arms"]}
    # the server's own complaint, from the tail of its log
    assert "vllm serve exited" in arms["broken"]["error"]
    assert "not-a-number" in arms["broken"]["error"]
    assert (out / "logs" / "broken.log").exists()
    assert "not a reachable OpenAI-compatible endpoint" in arms["gone"]["error"]
    assert "broken FAILED" in proc.stdout and "gone FAILED" in proc.stdout


def test_good_arms_complete_every_request_with_every_token(ab_run):
    _, out, report = ab_run
    for name in ("base", "sarathi"):
        arm = next(a for a in report["arms"] if a["name"] == name)
        assert arm["error"] is None
        s = arm["summary"]
        assert (s["requests"], s["completed"], s["failed"]) == (20, 20, 0)
        assert s["output_tokens"] == 20 * OUTPUT_TOKENS and s["token_count_mismatches"] == 0
        assert s["ttft_p50_s"] > 0 and s["tbt_p99_ms"] > 0 and s["out_tok_per_s"] > 0
        assert s["sched_delay_p50_s"] is not None  # from the server's queue-time histogram
        assert len(arm["capacity"]["probes"]) == 1
        for seed in (0, 1):
            raw = json.loads((out / "raw" / name / f"seed{seed}.json").read_text())["requests"]
            assert len(raw) == 10
            assert all(sum(n for _, n in r["events"]) == OUTPUT_TOKENS for r in raw)
            assert all(r["sent"] <= r["events"][0][0] for r in raw)


def test_arms_replay_identical_traces(ab_run):
    _, out, _ = ab_run
    for seed in (0, 1):
        shape = [[(r["scheduled"], r["prompt_tokens"], r["max_tokens"]) for r in
                  json.loads((out / "raw" / arm / f"seed{seed}.json").read_text())["requests"]]
                 for arm in ("base", "sarathi")]
        assert shape[0] == shape[1]


def test_sarathi_is_exact(ab_run):
    # An exact technique: greedy float32 outputs identical to stock vLLM's.
    _, _, report = ab_run
    eqv = report["comparisons"]["sarathi"]["equivalence"]
    assert eqv["exact_match_rate"] == 1.0, eqv["verdict"]
    assert eqv["top1_agreement"] == 1.0 and eqv["kl_max"] < 1e-6
    assert set(report["comparisons"]["sarathi"]["ci"]) >= {"ttft_p50_s", "tbt_p99_ms"}


def test_report_files(ab_run):
    proc, out, _ = ab_run
    md = (out / "summary.md").read_text()
    assert "| base |" in md and "| sarathi |" in md and "| broken | FAILED |" in md
    assert "greedy outputs identical to base on all 16 prompts" in md
    assert "logprobs" in md  # how tokens were counted
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4  # TBT, TTFT, timelines, capacity
    assert "| sarathi |" in proc.stdout  # the headline table is printed too

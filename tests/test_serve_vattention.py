"""`vllm serve --kv-allocator vattention` end to end: a real server on 127.0.0.1, streamed
completions through the openai client, and /metrics showing mapped KV memory rise with
the live tokens and fall back when they are gone.

A second server runs short of physical KV memory (VLLMEXT_HOST_KV_LIMIT, far below the
1 GiB vLLM sizes): it sets aside what there is, its scheduler preempts there, and a
burst of streamed requests all complete with stock vLLM's tokens. On both servers
`vllm:kv_cache_usage_perc` is the live KV over what can be mapped: 0 when idle."""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time
import urllib.request

import pytest

from vllm_ext import envs
from vllm_ext.tools.serve import CPU_SERVE_ARGS, VllmServer, stream_completion

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]


def _kv_metrics(base: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    return {k: float(v) for k, v in
            re.findall(r'^(vllm_ext_kv_[a-z_]+)\{engine="0",[^}]*\} ([0-9.e+]+)$', text, re.M)}


def _usage(base: str) -> float:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    return float(re.search(r"^vllm:kv_cache_usage_perc\{[^}]*\} ([0-9.e+-]+)$", text,
                           re.MULTILINE)[1])


def _idle_usage(base: str, timeout: float = 15) -> float:
    """vllm:kv_cache_usage_perc once it reads 0 (the front end may take a moment to
    hear of the last step), or as it is at the timeout."""
    deadline = time.monotonic() + timeout
    while (usage := _usage(base)) != 0.0 and time.monotonic() < deadline:
        time.sleep(0.5)
    return usage


def _settled(base: str, timeout: float = 30) -> dict[str, float]:
    """The pool's metrics once every page but the null block's has been given back (the
    engine hands the last orders over one step after its last request finishes)."""
    deadline = time.monotonic() + timeout
    while (m := _kv_metrics(base))["vllm_ext_kv_maps_total"] > \
            m["vllm_ext_kv_unmaps_total"] + 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    return m


@pytest.fixture(scope="module")
def server(shared_server):
    """The session's server: no look-ahead and no kept pages, so mapped memory should be
    exactly the live pages (see conftest.SHARED_SERVE_ARGS)."""
    return shared_server


def test_mapped_memory_follows_live_tokens_on_metrics(server, tiny_model, shared_stats_dir):
    from openai import OpenAI

    from vllm_ext.allocators.poolstats import SAMPLE, read_pool_dir

    base, log_path = server
    idle = _settled(base)  # earlier tests of the session may have used the server
    assert idle["vllm_ext_kv_reserved_bytes"] > 1000 * idle["vllm_ext_kv_mapped_bytes"] > 0
    seen: list[dict[str, float]] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(_kv_metrics(base))
            time.sleep(0.01)

    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    prompts = [" ".join(["the quick brown fox"] * n) for n in (5, 50, 20, 70)]
    tokens = (300, 200, 300, 160)  # within the server's 1024-token context
    watcher = threading.Thread(target=watch)
    started = time.monotonic()
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            done = list(pool.map(lambda p, n: stream_completion(client, str(tiny_model), p,
                                                                max_tokens=n), prompts, tokens))
    finally:
        stop.set()
        watcher.join()
    assert [d.tokens for d in done] == list(tokens)
    # The engine publishes one sample a step (what /metrics serves): mapped memory rose
    # with the live tokens during the burst. Reading them all from the published files
    # does not depend on a scrape landing mid-burst, which a loaded machine may delay.
    i_t, i_mapped = SAMPLE.index("t"), SAMPLE.index("mapped_bytes")
    burst = [x for x in read_pool_dir(shared_stats_dir).samples if x[i_t] >= started]
    assert burst and max(x[i_mapped] for x in burst) >= 10 * idle["vllm_ext_kv_mapped_bytes"]
    # One block per page and no reserve: mapped is exactly the live blocks, in every
    # published sample and in every /metrics scrape.
    i_live = SAMPLE.index("live_page_bytes")
    assert all(x[i_mapped] == x[i_live] for x in burst)
    for m in seen:
        assert m["vllm_ext_kv_mapped_bytes"] == m["vllm_ext_kv_live_page_bytes"]
    after = _settled(base)
    assert after["vllm_ext_kv_mapped_bytes"] == idle["vllm_ext_kv_mapped_bytes"]
    assert after["vllm_ext_kv_maps_total"] == after["vllm_ext_kv_unmaps_total"] + 1  # null page
    assert "vllm-ext vattention: reserved" in log_path.read_text()
    assert _idle_usage(base) == 0.0  # idle: nothing live, whatever was mapped on the way


# One request of max_model_len 576 needs 19 pages of 32 KiB (16 KiB in each of 2 layers)
# with the null block's; 640 KiB holds 20, against the 32768 of vLLM's 1 GiB. A long
# prompt of the burst (300 to 520 tokens) fills 10 to 18 of them: any two running at
# once, however the burst's arrivals spread, pass the capacity.
SHORT_PAGES = 20
SHORT_LIMIT = SHORT_PAGES * (32 << 10)
SHORT_ARGS = (*CPU_SERVE_ARGS, "--max-model-len", "576", "--block-size", "32",
              "--kv-allocator", "vattention", "--vattention-page-size", "16KiB")
BURST = 48


@pytest.fixture(scope="module")
def short_server(tiny_model, tmp_path_factory):
    """(base URL, log path) of a vattention server whose host backend has 640 KiB of
    physical memory where vLLM sized 1 GiB of KV cache (no physical cap given)."""
    log_path = tmp_path_factory.mktemp("serve-short") / "server.log"
    env = {envs.HOST_KV_LIMIT: str(SHORT_LIMIT),
           envs.STATS_DIR: str(tmp_path_factory.mktemp("serve-short-stats"))}
    with VllmServer(tiny_model, list(SHORT_ARGS), log_path, env=env) as base:
        yield base, log_path


@pytest.fixture(scope="module")
def short_burst(short_server, tiny_model):
    """48 streamed completions at once on the short server (engine_runner's prompts, in
    turn): their token ids, and the KV cache usage scraped from /metrics meanwhile."""
    import json

    from engine_runner import MAX_TOKENS, prompts
    from openai import OpenAI

    base, _ = short_server
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    ids = prompts(vocab)
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    idle = _usage(base)

    def stream(i: int) -> tuple[list[int], str | None]:
        tokens, finish = [], None
        for chunk in client.completions.create(
                model=str(tiny_model), prompt=ids[i % len(ids)], max_tokens=MAX_TOKENS,
                temperature=0, stream=True,
                extra_body={"ignore_eos": True, "return_token_ids": True}):
            tokens += chunk.choices[0].token_ids or []
            finish = chunk.choices[0].finish_reason or finish
        return tokens, finish

    seen: list[float] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(_usage(base))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
            done = list(pool.map(stream, range(BURST)))
    finally:
        stop.set()
        watcher.join()
    return {"done": done, "prompts": len(ids), "idle_before": idle, "usage_seen": seen}


def test_short_of_physical_memory_every_request_completes_with_stock_tokens(
        short_server, short_burst, run_engine):
    from engine_runner import MAX_TOKENS

    base, log_path = short_server
    stock = run_engine()["tokens"]  # the same prompts on a stock engine, greedy
    n = short_burst["prompts"]
    assert [finish for _, finish in short_burst["done"]] == ["length"] * BURST
    for i, (tokens, _) in enumerate(short_burst["done"]):
        assert len(tokens) == MAX_TOKENS and tokens == stock[f"req-{i % n}"], i
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    preempted = float(re.search(r"^vllm:num_preemptions_total\{[^}]*\} ([0-9.e+]+)$",
                                text, re.MULTILINE)[1])
    assert preempted > 0  # the capacity was reached, and vLLM preempted there
    m = _kv_metrics(base)
    assert m["vllm_ext_kv_provisioned_bytes"] == SHORT_LIMIT  # whole pages
    assert m["vllm_ext_kv_reserved_bytes"] >= 1000 * SHORT_LIMIT
    log = log_path.read_text()
    assert f"physical memory for {SHORT_PAGES} of the 32768 KV pages planned" in log
    assert f"at most {SHORT_PAGES} pages mapped (what the workers got)" in log
    assert "Traceback" not in log


def test_kv_cache_usage_is_live_over_what_fits(short_server, short_burst):
    base, _ = short_server
    seen = short_burst["usage_seen"]
    assert short_burst["idle_before"] == 0.0
    # Live blocks over the 19 that fit (the 20 pages but the null block's, one block a
    # page), whenever a scrape landed: vLLM's own count would be out of its 32767 blocks,
    # most of them never within reach (they used to count as used). 0 once all is done.
    live = [u * (SHORT_PAGES - 1) for u in seen]
    assert max(live) >= 1 and all(abs(n - round(n)) < 1e-6 and n <= SHORT_PAGES - 1
                                  for n in live), seen
    assert _idle_usage(base) == 0.0

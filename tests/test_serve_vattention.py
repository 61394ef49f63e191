"""`vllm serve --kv-allocator vattention` end to end: a real server on 127.0.0.1, streamed
completions through the openai client, and /metrics showing mapped KV memory rise with
the live tokens and fall back when they are gone."""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time
import urllib.request

import pytest

from vllm_ext.tools.serve import stream_completion

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]


def _kv_metrics(base: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    return {k: float(v) for k, v in re.findall(r"^(vllm_ext_kv_[a-z_]+) ([0-9.e+]+)$", text, re.M)}


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

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

from vllm_ext.serve import stream_completion

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


def test_mapped_memory_follows_live_tokens_on_metrics(server, tiny_model):
    from openai import OpenAI

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
    # Long enough that a busy front end answers /metrics many times mid-burst (at 96
    # tokens a warm server could finish between two scrapes on a loaded machine), short
    # enough that the longest prompt (about 840 tokens) and its reply fit the server's
    # 1024-token context.
    tokens = 160
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            done = list(pool.map(lambda p: stream_completion(client, str(tiny_model), p,
                                                             max_tokens=tokens), prompts))
    finally:
        stop.set()
        watcher.join()
    assert [d.tokens for d in done] == [tokens] * len(prompts)
    peak = max(seen, key=lambda m: m["vllm_ext_kv_mapped_bytes"])
    assert peak["vllm_ext_kv_mapped_bytes"] >= 10 * idle["vllm_ext_kv_mapped_bytes"]
    for m in seen:  # one block per page, no reserve: mapped is exactly the live blocks
        assert m["vllm_ext_kv_mapped_bytes"] == m["vllm_ext_kv_live_page_bytes"]
    after = _settled(base)
    assert after["vllm_ext_kv_mapped_bytes"] == idle["vllm_ext_kv_mapped_bytes"]
    assert after["vllm_ext_kv_maps_total"] == after["vllm_ext_kv_unmaps_total"] + 1  # null page
    assert "vllm-ext vattention: reserved" in log_path.read_text()

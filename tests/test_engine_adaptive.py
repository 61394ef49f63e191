"""Mnemosyne's adaptive chunking on the real vLLM engine (CPU, the `small` model, whose steps
of tens of milliseconds a step-time model can be judged on; the tiny model's few-ms steps
are mostly scheduling noise).

`--scheduler sarathi --sarathi-tbt-slo-ms T` without a latency model profiles the engine
once at start-up (the `vllm-ext profile` command in a child process, with its progress)
and caches the fit; with the fitted model every step is planned within the target, the
measured mixed steps stay near it, every request finishes, and the greedy tokens are
stock vLLM's."""

from __future__ import annotations

import json
import statistics

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def stock(run_engine, small_model):
    return run_engine(model=small_model)


@pytest.fixture(scope="module")
def profiled(run_engine, small_model, tmp_path_factory):
    """An engine started with a TBT target and no latency model: it profiles itself."""
    cache = tmp_path_factory.mktemp("cache")
    result = run_engine("--scheduler", "sarathi", "--tbt-slo-ms", "200",
                        env={"XDG_CACHE_HOME": str(cache)}, model=small_model)
    return result, list((cache / "vllm-ext" / "latency").glob("*.json"))


def test_start_up_profile_is_measured_once_and_cached(profiled, stock):
    result, cached = profiled
    assert len(cached) == 1 and cached[0].name.startswith("small-")
    settings = result["config"]["additional_config"]["vllm_ext"]["scheduler"]
    assert settings["latency_model"] == str(cached[0]) and settings["tbt_slo_ms"] == 200
    assert result["tokens"] == stock["tokens"]
    assert all(s["predicted_s"] > 0 for s in result["steps"]
               if s["decode_tokens"] + s["prefill_tokens"])


def test_profile_reports_a_model_and_its_held_out_error(profiled):
    data = json.loads(profiled[1][0].read_text())
    assert data["features"][0] == "const" and len(data["coef"]) == 5
    assert min(data["coef"]) >= 0 and data["coef"][1] > 0  # prompt tokens cost time
    fit = data["fit"]
    assert fit["quick"] is True and fit["holdout_points"] >= 20
    # The key of the cache: everything that changes step time.
    assert (fit["dtype"], fit["max_model_len"], fit["budget"], fit["attn"]) == (
        "float32", 1024, 256, "vllm")
    # Measured so far on 2 cores: median 1.3%, p90 2.6% held out.
    assert fit["holdout_median_rel_error"] < 0.1 and fit["holdout_p90_rel_error"] < 0.25


def test_adaptive_chunking_stays_in_the_target_and_is_exact(run_engine, profiled, stock,
                                                           small_model):
    latency_file = profiled[1][0]
    coef = json.loads(latency_file.read_text())["coef"]
    slo_ms = 1000 * (coef[0] + 200 * coef[1])  # room for ~200 prompt tokens beside decodes
    result = run_engine("--scheduler", "sarathi", "--budget", "1024", "--tbt-slo-ms",
                        f"{slo_ms:.3f}", "--latency-model", str(latency_file), model=small_model)
    assert result["tokens"] == stock["tokens"] and len(result["tokens"]) == 7
    steps = [s for s in result["steps"] if s["decode_tokens"] + s["prefill_tokens"]]
    assert all(s["predicted_s"] > 0 for s in steps)
    for s in steps:  # a step over target only as the one 32-token chunk that keeps a prompt moving
        assert s["predicted_s"] <= slo_ms / 1000 + 1e-9 or s["prefill_tokens"] <= 32
    chunks = [s["prefill_tokens"] for s in steps if s["partial_prefills"]]
    assert chunks and max(chunks) < 1024  # the target, not the budget, sized the chunks
    # Judged on measured time too: the mixed steps (prefill chunks beside decodes).
    mixed = sorted(s["wall_s"] for s in steps if s["prefill_tokens"] and s["decode_tokens"])
    assert len(mixed) >= 5
    p90 = mixed[min(len(mixed) - 1, int(0.9 * len(mixed)))]
    assert p90 <= 1.25 * slo_ms / 1000, (p90, slo_ms, statistics.median(mixed))

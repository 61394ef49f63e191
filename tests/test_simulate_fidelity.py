"""The fidelity comparison (simulated against measured reports) on hand-made reports."""

from __future__ import annotations

import math

import pytest

from vllm_ext.simulate.fidelity import compare, markdown, where_time_goes


def _report(simulated: bool, **arms: tuple[float, float, float, float]) -> dict:
    return {"simulated": simulated, "arms": [
        {"name": name, "summary": {"ttft_p50_s": t, "tbt_p50_ms": b, "tbt_p99_ms": b99,
                                   "out_tok_per_s": tok, "duration_s": 100.0,
                                   "engine_steps": 1000.0, "engine_step_s": 90.0}}
        for name, (t, b, b99, tok) in arms.items()]}


def test_errors_targets_and_order():
    real = _report(False, a=(1.0, 100, 1000, 20.0), b=(2.0, 50, 400, 20.5))
    sim = _report(True, a=(1.1, 95, 1250, 19.0), b=(1.5, 60, 380, 21.0))
    checks, order = compare(real, sim)
    by = {(c.arm, c.metric): c for c in checks}
    assert by["a", "ttft_p50_s"].error == pytest.approx(0.10)
    assert by["a", "ttft_p50_s"].passed  # exactly at the 10% target
    assert by["a", "tbt_p99_ms"].error == pytest.approx(0.25) and not by["a", "tbt_p99_ms"].passed
    assert by["b", "ttft_p50_s"].error == pytest.approx(-0.25) and not by["b", "ttft_p50_s"].passed
    assert by["b", "tbt_p50_ms"].error == pytest.approx(0.2) and not by["b", "tbt_p50_ms"].passed
    assert order == {"ttft_p50_s": True, "tbt_p50_ms": True, "tbt_p99_ms": True,
                     "out_tok_per_s": True}
    swapped = _report(True, a=(2.5, 100, 1000, 20.0), b=(2.0, 50, 400, 20.5))
    assert compare(real, swapped)[1]["ttft_p50_s"] is False
    # Throughputs 2.5% apart are a tie at a 10% target: either order is the same order.
    assert compare(real, _report(True, a=(1, 100, 1000, 21.0), b=(2, 50, 400, 20.0)))[1][
        "out_tok_per_s"] is True
    text = markdown("demo", checks, order, where_time_goes(real, sim))
    assert "| a | TBT P99 | 1000 | 1250 | +25.0% | ±20% | MISSED |" in text


def test_missing_values_fail_rather_than_pass():
    real = _report(False, a=(1.0, math.nan, 1000, 20.0))
    checks, _ = compare(real, _report(True, a=(1.0, 90, 1000, 20.0)))
    assert not next(c for c in checks if c.metric == "tbt_p50_ms").passed


def test_reports_must_match():
    real = _report(False, a=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="arms in one report only: b"):
        compare(real, _report(True, a=(1, 1, 1, 1), b=(1, 1, 1, 1)))
    with pytest.raises(ValueError, match="measured report"):
        compare(real, _report(False, a=(1, 1, 1, 1)))

"""The step-time model behind adaptive chunking (no engine): the fit recovers a known
cost law from noisy steps, reports its held-out error, and the chunk it chooses keeps
the predicted step within the budget and shrinks as the prompt's context grows."""

from __future__ import annotations

import random

import pytest

from vllm_ext.schedulers.latency import FEATURES, LatencyModel, StepShape, fit

TRUE = (0.004, 2e-5, 4e-9, 3e-4, 1e-7)  # seconds: fixed, per token, attention, per decode, reads


def _steps(n: int, noise: float, seed: int = 1):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chunks = tuple((rng.choice([0, 64, 256, 512, 1024]), rng.choice([0, 2048, 8192]))
                       for _ in range(rng.choice([0, 1, 1, 2])))
        chunks = tuple(c for c in chunks if c[0])
        decodes = tuple(rng.randint(100, 20000) for _ in range(rng.choice([0, 4, 16, 64])))
        shape = StepShape(chunks, decodes)
        t = LatencyModel(TRUE).predict(shape) * (1 + rng.gauss(0, noise))
        out.append((shape, t))
    return out


def test_fit_recovers_the_cost_law_and_reports_held_out_error():
    model = fit(_steps(200, noise=0.02))
    for got, want in zip(model.coef, TRUE):
        assert got == pytest.approx(want, rel=0.2)
    assert model.fit["holdout_points"] == 50
    assert model.fit["holdout_mean_rel_error"] < 0.05
    assert min(model.coef) >= 0


def test_chunks_keep_the_step_in_budget_and_shrink_with_context():
    model = LatencyModel(TRUE)
    decodes = (4000,) * 16
    sizes = [model.largest_chunk(0.05, context, decodes) for context in (0, 8192, 65536, 262144)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1] > 0
    for context, n in zip((0, 8192, 65536, 262144), sizes):
        assert n % 32 == 0
        assert model.predict(StepShape(((n, context),), decodes)) <= 0.05
        if n < 4096:  # one more step of 32 would break the budget
            assert model.predict(StepShape(((n + 32, context),), decodes)) > 0.05
    assert model.largest_chunk(0.001, 0, decodes) == 0  # the decodes alone exceed it


def test_json_round_trip_and_refusals():
    model = fit(_steps(40, noise=0.01))
    again = LatencyModel.from_json(model.to_json())
    assert again.coef == model.coef and again.fit == model.fit
    with pytest.raises(ValueError, match="profile again"):
        LatencyModel.from_json('{"features": ["const"], "coef": [1.0]}')
    with pytest.raises(ValueError, match=f"too few to fit {len(FEATURES)} coefficients"):
        fit(_steps(5, noise=0.0))

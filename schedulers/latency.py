"""A step-time model for one engine on one machine, fitted to measured steps (Mnemosyne's
batch-time predictor, in its simplest useful form).

Form, linear in five features of a step:

    t = c0                       fixed cost (launches, sampling, scheduling)
      + c1 * P                   per prefill token (linear layers, MLP)
      + c2 * A                   prefill attention work, A = sum_i P_i * (C_i + P_i / 2)
                                 (chunk i of P_i tokens after C_i earlier tokens: each of its
                                 queries sees C_i + j keys, j < P_i)
      + c3 * D                   per decode (linear layers for one token each)
      + c4 * K                   decode attention reads, K = sum of the decodes' contexts

The coefficients are fitted by non-negative least squares on relative error (each
step weighted by 1 / its time, so 5 ms decode steps count as much as 500 ms prefill
steps), so every extra token or extra context costs time and the prediction is
monotone in the chunk size, which `largest_chunk` relies on. The fit reports its
relative error on points it did not see.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from vllm_ext.schedulers.request import ReqState

FEATURES = ("const", "prefill_tokens", "prefill_attention", "decodes", "decode_context")
FORM = ("t = c0 + c1*P + c2*sum_i P_i*(C_i + P_i/2) + c3*D + c4*sum(decode contexts); "
        "non-negative least squares on relative error")


@dataclass(frozen=True, slots=True)
class StepShape:
    """What a step computes: prefill chunks as (tokens, earlier context), decode contexts."""

    chunks: tuple[tuple[int, int], ...] = ()
    decode_contexts: tuple[int, ...] = ()

    @classmethod
    def of(cls, scheduled: Iterable[tuple[ReqState, int]]) -> StepShape:
        """From each scheduled request, as it was when the step began, and its tokens."""
        chunks, contexts = [], []
        for state, n in scheduled:
            if state.is_decode:
                contexts.append(state.num_computed + n)
            else:
                chunks.append((n, state.num_computed))
        return cls(tuple(chunks), tuple(contexts))

    def features(self) -> tuple[float, ...]:
        p = sum(n for n, _ in self.chunks)
        a = sum(n * (c + n / 2) for n, c in self.chunks)
        return (1.0, float(p), float(a), float(len(self.decode_contexts)),
                float(sum(self.decode_contexts)))


@dataclass(frozen=True, slots=True)
class LatencyModel:
    coef: tuple[float, ...]  # per FEATURES, seconds
    form: str = FORM
    fit: dict = field(default_factory=dict)  # how it was fitted and how well

    def predict(self, shape: StepShape) -> float:
        return self.predict_features(shape.features())

    def predict_features(self, features: Sequence[float]) -> float:
        return sum(c * x for c, x in zip(self.coef, features))

    def largest_chunk(self, budget_s: float, context: int, decodes: Sequence[int] = (),
                      other_chunks: Sequence[tuple[int, int]] = (), step: int = 32,
                      limit: int = 4096) -> int:
        """The largest chunk (a multiple of `step`, at most `limit`) of a prompt with
        `context` earlier tokens whose step, with these decodes and other chunks, is
        predicted to take at most `budget_s`; 0 if not even `step` tokens fit."""
        base = StepShape(tuple(other_chunks), tuple(decodes))

        def fits(n: int) -> bool:
            return self.predict(StepShape((*base.chunks, (n, context)), base.decode_contexts)) \
                <= budget_s

        lo, hi = 0, limit // step  # in units of `step`; fits() is monotone in n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid * step):
                lo = mid
            else:
                hi = mid - 1
        return lo * step

    def to_json(self) -> str:
        return json.dumps({"features": FEATURES, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> LatencyModel:
        data = json.loads(text)
        if tuple(data.get("features", ())) != FEATURES:
            raise ValueError(f"latency model features {data.get('features')} are not this "
                             f"release's {list(FEATURES)}; profile again (vllm-ext profile)")
        return cls(tuple(data["coef"]), data.get("form", FORM), data.get("fit", {}))


def _nnls(rows: list[tuple[float, ...]], y: list[float]) -> tuple[float, ...]:
    """Non-negative least squares (Lawson-Hanson), small and dependency-free."""
    import numpy as np

    a, b = np.asarray(rows, dtype=float), np.asarray(y, dtype=float)
    scale = np.maximum(np.abs(a).max(axis=0), 1e-12)  # features span ~10 orders of magnitude
    a = a / scale
    n = a.shape[1]
    passive: list[int] = []
    x = np.zeros(n)
    for _ in range(3 * n):
        w = a.T @ (b - a @ x)
        free = [j for j in range(n) if j not in passive and w[j] > 1e-12]
        if not free:
            break
        passive.append(max(free, key=lambda j: w[j]))
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if all(z[j] > 0 for j in passive):
                x = z
                break
            alpha = min(x[j] / (x[j] - z[j]) for j in passive if z[j] <= 0)
            x = x + alpha * (z - x)
            passive = [j for j in passive if x[j] > 1e-15]
    return tuple(float(v) for v in x / scale)


def fit(samples: Sequence[tuple[StepShape | Sequence[float], float]], holdout: float = 0.25,
        seed: int = 0) -> LatencyModel:
    """Fit on a random (1 - holdout) of the measured (shape or FEATURES values, seconds)
    and report the error on the rest."""
    samples = [(s.features() if isinstance(s, StepShape) else tuple(s), t) for s, t in samples
               if t > 0]
    if len(samples) < 2 * len(FEATURES):
        raise ValueError(f"{len(samples)} measured steps are too few to fit "
                         f"{len(FEATURES)} coefficients; profile at least {2 * len(FEATURES)}")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    cut = max(len(FEATURES), int(len(order) * (1 - holdout)))
    train, test = order[:cut], order[cut:]
    # Dividing a row and its time by that time makes the residual the relative error.
    coef = _nnls([tuple(x / samples[i][1] for x in samples[i][0]) for i in train],
                 [1.0] * len(train))
    model = LatencyModel(coef)

    def errors(idx):
        return [abs(model.predict_features(samples[i][0]) - samples[i][1]) / samples[i][1]
                for i in idx]

    held = errors(test) or errors(train)
    model.fit.update(
        train_points=len(train), holdout_points=len(test),
        train_mean_rel_error=_mean(errors(train)), holdout_mean_rel_error=_mean(held),
        holdout_median_rel_error=_quantile(held, 0.5), holdout_max_rel_error=max(held),
        holdout_p90_rel_error=_quantile(held, 0.9))
    return model


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else math.nan

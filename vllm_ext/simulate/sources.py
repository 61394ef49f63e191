"""Where a simulated step's duration comes from: one interface, three sources.

A source is a callable from a step's `StepShape` to seconds, with a `name` and the
`assumptions()` a report must state:

- `FittedSource`: the step-time model `vllm-ext profile` fitted on a real engine (this
  machine, any model it serves);
- `vllm_ext.simulate.gpu.GpuStepTime`: profiled GPU operator tables and an attention model;
- `CallableSource`: any Python function, given as `module:function`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from vllm_ext.schedulers.latency import LatencyModel, StepShape, fit


class SourceError(ValueError):
    """A step-time source that cannot be used; says what would do."""


class StepTimeSource(Protocol):
    name: str

    def __call__(self, shape: StepShape) -> float: ...

    def assumptions(self) -> list[str]: ...


class FittedSource:
    """A step-time model fitted by `vllm-ext profile` on a real engine."""

    def __init__(self, path: str | Path) -> None:
        try:
            self.model = LatencyModel.from_json(Path(path).read_text())
        except OSError as e:
            raise SourceError(f"--latency-model {path}: {e.strerror or e}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise SourceError(f"--latency-model {path}: not a `vllm-ext profile` model ({e})") from None
        self.path = str(path)
        f = self.model.fit
        self.profiled_model = f.get("model")
        self.name = f"fitted step-time model {Path(path).name}"

    def __call__(self, shape: StepShape) -> float:
        return self.model.predict(shape)

    def mismatches(self, config) -> list[str]:
        """How the arm `config` configures serves otherwise than the profiled engine."""
        from vllm_ext.tools.profile import mismatches

        return mismatches(self.model, config)

    def assumptions(self) -> list[str]:
        f = self.model.fit
        where = ", ".join(str(f[k]) for k in ("machine", "vllm") if k in f) or "unknown machine"
        err = f.get("holdout_mean_rel_error")
        return [f"Step times: `vllm-ext profile` of {f.get('model', 'an unnamed model')} "
                f"({where}), {self.model.form}"
                + (f"; mean error {100 * err:.1f}% on held-out steps." if err is not None else "."),
                "Not modelled: time between engine steps (request intake, output streaming, "
                "the API server), which the profile's per-step times leave out."]


class CallableSource:
    """Any function of a `StepShape` returning seconds."""

    def __init__(self, fn: Callable[[StepShape], float], name: str) -> None:
        self.fn, self.name = fn, name

    @classmethod
    def load(cls, spec: str) -> CallableSource:
        module, sep, attr = spec.partition(":")
        if not sep or not module or not attr:
            raise SourceError(f"--step-time {spec!r}: expected module:function")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise SourceError(f"--step-time {spec!r}: {e}") from None
        if not callable(fn):
            raise SourceError(f"--step-time {spec!r} is not callable")
        return cls(fn, spec)

    def __call__(self, shape: StepShape) -> float:
        t = float(self.fn(shape))
        if not t >= 0:
            raise SourceError(f"step-time function {self.name} returned {t!r} for {shape}; "
                              f"a step takes >= 0 seconds")
        return t

    def assumptions(self) -> list[str]:
        return [f"Step times: the function {self.name} (given by --step-time)."]


# Shapes over which a source is sampled to fit the linear model adaptive chunking
# uses (vllm-ext profile's features): chunks of every size at several contexts,
# beside decode batches of several sizes and contexts.
_CHUNKS = (0, 32, 128, 256, 512, 1024, 2048, 4096)
_CONTEXTS = (0, 1024, 4096, 8192)
_DECODES = ((0, 0), (8, 1024), (32, 2048), (64, 512), (128, 2048), (256, 1024))


def fitted_for_adaptive(source: StepTimeSource, max_context: int) -> LatencyModel:
    """The linear step-time model an operator would get from profiling the engine the
    source describes, fitted to the source's predictions (arms with
    --sarathi-tbt-slo-ms and no model of their own get it)."""
    samples = []
    for n in _CHUNKS:
        for c in (c for c in _CONTEXTS if c + n <= max_context):
            for d, ctx in _DECODES:
                if n or d:
                    shape = StepShape(((n, c),) if n else (), (min(ctx, max_context),) * d)
                    samples.append((shape, source(shape)))
    model = fit(samples, holdout=0.25)
    model.fit.update(source=source.name, note="fitted to the simulator's step-time source")
    return model


def write_fitted(model: LatencyModel, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(model.to_json())
    return path


__all__ = ["CallableSource", "FittedSource", "SourceError", "StepTimeSource",
           "fitted_for_adaptive", "write_fitted"]

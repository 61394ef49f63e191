"""Run an A/B benchmark: each arm served (or reached) in turn, the same traces replayed
through it, its equivalence outputs and capacity taken, everything written to a
report directory as it arrives, so a failing arm never costs the others' results."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

from vllm_ext.ab import capacity as cap
from vllm_ext.ab import equivalence as eq
from vllm_ext.ab import promtext, report
from vllm_ext.ab.client import SEND_VALUES, EndpointError, replay, served_models
from vllm_ext.ab.config import ABConfig, ABError, Arm, ArmResult, CapacitySearch
from vllm_ext.ab.report import write_json as _write_json
from vllm_ext.ab.server_view import ServerView
from vllm_ext.ab.stats import paired_bootstrap
from vllm_ext.ab.summary import CLASS_METRICS, HEADLINE, class_items, judge, summarize
from vllm_ext.ab.traces import LengthDist, Trace, TraceError, synthesize

# vLLM's default request-latency buckets start at 0.3 s, too coarse to read a P50
# scheduling delay from; finer bounds for the servers the harness starts (an arm's
# own --custom-histogram-buckets, given later on its command line, wins).
FINE_LATENCY_BUCKETS = ("--custom-histogram-buckets", json.dumps({"request_latency": [
    0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.25, 1.5,
    1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]}))


@contextlib.contextmanager
def _serving(arm: Arm, cfg: ABConfig, log: Path) -> Iterator[tuple[str, str]]:
    """(base URL, model name) of an arm, serving for the duration of the block."""
    if arm.endpoint is not None:
        models = served_models(arm.endpoint)
        if cfg.model in models:
            yield arm.endpoint, cfg.model
        elif len(models) == 1:  # --model may be the local path the vocabulary came from
            yield arm.endpoint, models[0]
        else:
            raise EndpointError(f"endpoint {arm.name} ({arm.endpoint}) serves {models}, "
                                f"not {cfg.model!r}; pass --model with one of those")
        return
    from vllm_ext.tools.serve import VllmServer

    cfg.progress.phase(f"[{arm.name}] starting vllm serve, waiting up to "
                       f"{cfg.startup_timeout:.0f} s for it to answer (log: {log})")
    with VllmServer(cfg.model, [*FINE_LATENCY_BUCKETS, *cfg.common_args, *arm.serve_args], log,
                    startup_timeout=cfg.startup_timeout) as url:
        yield url, str(cfg.model)


def _replay_measured(url: str, model: str, trace: Trace, cfg: ABConfig, desc: str,
                     arm: Arm | None = None):
    """Replay, showing its progress, and what the server's metrics saw of it."""
    before = ServerView.scrape(url)
    sending = cfg.sending(arm) if arm is not None else SEND_VALUES
    with cfg.progress.replay(desc, len(trace.requests)) as shown:
        records = replay(url, model, trace, cfg.vocab_size, on_done=shown.request_done,
                         on_tokens=shown.tokens, sending=sending)
    time.sleep(0.5)  # vLLM records finished requests' stats just after their last token
    return records, ServerView.scrape(url).since(before)


def probe_trace(cfg: ABConfig, qps: float, index: int) -> Trace:
    # Seeds of their own per probe (and per --first-seed): prompts never repeat on the
    # same server, so the prefix cache cannot flatter later probes.
    return synthesize(cfg.capacity.requests, "poisson", cfg.prompt_len, cfg.output_len,
                      seed=10_000 + 100 * cfg.traces[0].seed + index, qps=qps,
                      max_prompt=cfg.max_prompt_tokens, max_output=cfg.max_output_tokens,
                      classes=cfg.slo_mix)


def run_arm(arm: Arm, cfg: ABConfig, say=print) -> ArmResult:
    result = ArmResult(arm)
    log = cfg.out / "logs" / f"{arm.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    result.log = str(log) if arm.endpoint is None else None
    t0 = time.monotonic()
    try:
        with _serving(arm, cfg, log) as (url, model):
            say(f"[{arm.name}] serving at {url} after {time.monotonic() - t0:.0f} s")
            if cfg.warmup_requests:
                warm = synthesize(cfg.warmup_requests, "concurrency", LengthDist("fixed", 16),
                                  LengthDist("fixed", 4), seed=-1, concurrency=cfg.warmup_requests)
                replay(url, model, warm, cfg.vocab_size)
            seen = ServerView()
            for i, trace in enumerate(cfg.traces, start=1):
                desc = f"[{arm.name}] seed {trace.seed} ({i}/{len(cfg.traces)})"
                records, view = _replay_measured(url, model, trace, cfg, desc, arm)
                result.runs.append(records)
                seen = seen + view
                _write_json(cfg.out / "raw" / arm.name / f"seed{trace.seed}.json",
                            {"arm": arm.name, "seed": trace.seed, "trace": trace.description,
                             "requests": [r.to_dict() for r in records]})
            result.summary = {**summarize(result.runs, cfg.slo), **seen.figures()}
            # The latency figures are in; a failure from here on loses only its own part.
            if cfg.prompts:
                cfg.progress.phase(f"[{arm.name}] equivalence: {len(cfg.prompts)} greedy prompts, "
                                   f"{cfg.equivalence_tokens} tokens each")
                with _part(result, "equivalence", say):
                    result.outputs = eq.fetch(url, model, cfg.prompts, cfg.equivalence_tokens,
                                              cfg.top_k)
                    _write_json(cfg.out / "equivalence" / f"{arm.name}.json",
                                [{"text": o.text, "token_ids": o.token_ids,
                                  "top": [{str(k): v for k, v in t.items()} for t in o.top]}
                                 for o in result.outputs])
            if cfg.capacity is not None:
                with _part(result, "capacity search", say):
                    result.capacity = _search_capacity(url, model, cfg, arm, say)
    except Exception as e:
        # Whatever broke (ServerError carries the log tail), this arm is recorded as
        # failed and the others still run.
        result.error = f"{type(e).__name__}: {e}"
        say(f"[{arm.name}] FAILED: {result.error}")
    result.wall_s = time.monotonic() - t0
    return result


@contextlib.contextmanager
def _part(result: ArmResult, part: str, say) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        result.problems.append(f"{part} failed: {type(e).__name__}: {e}")
        say(f"[{result.arm.name}] {result.problems[-1]}")


def _search_capacity(url: str, model: str, cfg: ABConfig, arm: Arm, say) -> cap.Capacity:
    search, name = cfg.capacity, arm.name
    count = iter(range(search.iterations))
    probes = f"{search.iterations} probe" + "s" * (search.iterations != 1)
    cfg.progress.phase(f"[{name}] capacity search: {probes} of {search.requests} requests, "
                       f"bisecting {search.low_qps:g} to {search.high_qps:g} QPS")

    def probe(qps: float) -> cap.Probe:
        index = next(count)
        trace = probe_trace(cfg, qps, index)
        records, view = _replay_measured(url, model, trace, cfg, f"[{name}] capacity probe "
                                         f"{index + 1}/{search.iterations} at {qps:.3g} QPS", arm)
        s = summarize([records], cfg.slo)
        return search.target.judge(qps, s["tbt_p99_ms"], promtext.quantile(view.queue_time, 0.5),
                                   s["failed"])

    return cap.bisect_capacity(probe, search.low_qps, search.high_qps, search.iterations,
                               lambda p: say(p.line(name)))


def compare_arms(results: list[ArmResult], cfg: ABConfig, known: dict | None = None) -> dict:
    """Each arm against the first (the base): bootstrap intervals on the headline
    metrics (and, when requests have SLOs, on each class's), and output equivalence.
    Arms already in `known` are not redone."""
    base, out = results[0], dict(known or {})
    if base.error or not base.runs:
        return out
    base_tls = [[r.timeline() for r in run] for run in base.runs]
    for res in results[1:]:
        if res.error or len(res.runs) != len(base.runs) or res.arm.name in out:
            continue
        tls = [[r.timeline() for r in run] for run in res.runs]
        entry = {"ci": {key: paired_bootstrap(base_tls, tls, fn, cfg.bootstrap_iterations).to_dict()
                        for key, (_, fn, _) in HEADLINE.items()}}
        if "per_class" in (base.summary or {}):
            entry["per_class"] = class_intervals(base.runs, res.runs, cfg)
        if base.outputs is not None and res.outputs is not None:
            cmp = eq.compare(cfg.prompts, base.outputs, res.outputs)
            entry["equivalence"] = {**cmp, "verdict": eq.verdict(res.arm.name, base.arm.name, cmp)}
        out[res.arm.name] = entry
    return out


def class_intervals(base_runs, arm_runs, cfg: ABConfig) -> dict[str, dict]:
    """class -> metric -> the paired-bootstrap interval of arm minus base, over that
    class's requests (each judged by its own deadlines)."""
    base = class_items(base_runs, judge(base_runs, cfg.slo))
    arm = class_items(arm_runs, judge(arm_runs, cfg.slo))
    return {name: {key: paired_bootstrap(base[name], arm[name], fn,
                                         cfg.bootstrap_iterations).to_dict()
                   for key, (_, fn, _) in CLASS_METRICS.items()}
            for name in base}


def run_ab(cfg: ABConfig, say=print) -> tuple[list[ArmResult], dict]:
    """All arms, one at a time; the report is rewritten after each, so it is whole at
    any moment and an interrupted run keeps what finished."""
    cfg.check()
    cfg.out.mkdir(parents=True, exist_ok=True)
    for trace in cfg.traces:
        _write_json(cfg.out / "trace" / f"seed{trace.seed}.json", trace.to_dict())
    results: list[ArmResult] = []
    comparisons: dict = {}
    for i, arm in enumerate(cfg.arms, start=1):
        say(f"[{arm.name}] arm {i} of {len(cfg.arms)}: {arm.describe()}")
        results.append(run_arm(arm, cfg, say))
        comparisons = compare_arms(results, cfg, comparisons)
        report.write(cfg, results, comparisons)
    return results, comparisons


__all__ = ["ABConfig", "ABError", "Arm", "ArmResult", "CapacitySearch", "run_ab", "TraceError"]

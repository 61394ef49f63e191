"""The report's plots (matplotlib, optional): TBT and TTFT distributions, per-request
token timelines, and the capacity curve."""

from __future__ import annotations

from pathlib import Path

from vllm_ext.ab.config import ABConfig, ArmResult
from vllm_ext.ab.metron import pooled_gaps

MISSING = ("Plots left out: matplotlib is not installed. "
           "`pip install 'vllm-ext[bench]'` brings it.")


def _pyplot():
    """matplotlib's pyplot on its file-only backend, or None when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def missing() -> str | None:
    """The sentence saying why the report has no plots when matplotlib is the reason."""
    return MISSING if _pyplot() is None else None


def draw(results: list[ArmResult], cfg: ABConfig, outdir: Path) -> list[Path]:
    """The PNGs written (none without matplotlib or without data)."""
    plt = _pyplot()
    ok = [r for r in results if r.runs]
    if plt is None or not ok:
        return []
    outdir.mkdir(parents=True, exist_ok=True)
    figures = [(_tbt(plt, ok, cfg), "tbt_ccdf.png"), (_ttft(plt, ok), "ttft_cdf.png"),
               (_timelines(plt, ok), "token_timelines.png")]
    if any(r.summary and "per_class" in r.summary for r in ok):
        figures.append((_ttft_by_class(plt, ok), "ttft_cdf_by_class.png"))
    if any(r.capacity for r in ok):
        figures.append((_capacity(plt, ok, cfg), "capacity.png"))
    mark = "SIMULATED: " + cfg.simulation["source"] if cfg.simulation else None
    return [_save(plt, fig, outdir / name, mark) for fig, name in figures]


def _save(plt, fig, path: Path, mark: str | None) -> Path:
    if mark:  # a plot copied out of the report still says it is a forecast
        fig.text(0.01, 0.005, mark, fontsize=7, color="firebrick", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1) if mark else None)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tbt(plt, results, cfg):
    """Complementary CDF on log axes: the tail, where arms differ, gets the room."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        gaps = sorted(g * 1e3 for run in r.runs for g in pooled_gaps([x.timeline() for x in run])
                      if g > 0)
        if gaps:
            n = len(gaps)
            ax.step(gaps, [1 - i / n for i in range(n)], where="post", label=r.arm.name)
    ax.axvline(cfg.slo.tbt_ms, color="grey", linestyle=":", label=f"TBT SLO {cfg.slo.tbt_ms:g} ms")
    ax.set(xscale="log", yscale="log", xlabel="time between tokens (ms)",
           ylabel="fraction of gaps longer", title="TBT tail (zero gaps of coalesced tokens omitted)")
    ax.legend()
    return fig


def _ttft(plt, results):
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ttft = sorted(t for run in r.runs for x in run if (t := x.timeline().ttft) is not None)
        if ttft:
            ax.step(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], where="post",
                    label=r.arm.name)
    ax.set(xlabel="time to first token (s)", ylabel="fraction of requests", title="TTFT CDF")
    ax.legend()
    return fig


def _ttft_by_class(plt, results):
    """One panel per SLO class, each arm's TTFT CDF, the class's TTFT deadline marked
    where all its requests share one."""
    from vllm_ext.ab.traces import counted_class

    names = list(dict.fromkeys(counted_class(x) for r in results for run in r.runs for x in run))
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for r in results:
            ttft = sorted(t for run in r.runs for x in run if counted_class(x) == name
                          and (t := x.timeline().ttft) is not None)
            if ttft:
                ax.step(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], where="post",
                        label=r.arm.name)
        deadline = next((r.summary["per_class"][name]["ttft_deadline_s"] for r in results
                         if r.summary and name in r.summary.get("per_class", {})), None)
        if deadline is not None:
            ax.axvline(deadline, color="grey", linestyle=":", label=f"deadline {deadline:g} s")
        ax.set(xlabel="time to first token (s)", ylabel="fraction of requests",
               title=f"TTFT CDF, class {name}")
        ax.legend(fontsize=8)
    return fig


def _timelines(plt, results):
    """First seed's requests, one row each: a dot per token. Stalls show as gaps
    across many rows at once."""
    fig, axes = plt.subplots(len(results), 1, figsize=(9, 2.6 * len(results)), sharex=True,
                             squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        for rec in r.runs[0]:
            times = rec.timeline().token_times
            ax.plot(times, [rec.index] * len(times), ".", markersize=1.5)
            ax.plot([rec.sent], [rec.index], "k|", markersize=4)
        ax.set(ylabel="request", title=f"{r.arm.name}: token arrivals (| = sent)")
    axes[-1, 0].set_xlabel("seconds from the start of the run")
    return fig


def _capacity(plt, results, cfg):
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        if r.capacity:
            probes = sorted(r.capacity.probes, key=lambda p: p.qps)
            ax.plot([p.qps for p in probes], [p.tbt_p99_ms for p in probes], "o-", label=r.arm.name)
    ax.axhline(cfg.capacity.target.tbt_p99_ms, color="grey", linestyle=":", label="TBT P99 SLO")
    ax.set(xscale="log", yscale="log", xlabel="Poisson QPS", ylabel="P99 TBT (ms)",
           title="Capacity search probes")
    ax.legend()
    return fig

"""The demo's sizing rules (vllm_ext.tools.demo), without an engine: the chunk step from a
step-time model, the SLOs and the rate from it, and the commands they make, parsed by the
parsers that will run them."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from unittest import mock

import pytest

from vllm_ext.ab import capacity as cap
from vllm_ext.ab.traces import parse_slo_mix
from vllm_ext.schedulers.latency import LatencyModel, StepShape
from vllm_ext.schedulers.slo import parse_classes
from vllm_ext.tools import demo

# This project's CI machine's profile of the small model at 256-token steps (rounded): a
# chunk step of ~0.29 s.
CI = LatencyModel((0.0134, 8.04e-4, 1.07e-7, 7.46e-4, 1.08e-6))


def scaled(model: LatencyModel, k: float) -> LatencyModel:
    """The same engine on a machine k times faster."""
    return LatencyModel(tuple(c / k for c in model.coef))


def test_chunk_step_is_the_predicted_chunk_beside_decodes():
    c0, c1, c2, c3, c4 = CI.coef
    by_hand = c0 + c1 * 256 + c2 * 256 * (2048 + 128) + c3 * 8 + c4 * 8 * 512
    assert demo.chunk_step_s(CI) == pytest.approx(by_hand)
    assert demo.chunk_step_s(CI) == pytest.approx(0.29, abs=0.01)


def test_slos_are_multiples_of_the_chunk_step_to_two_digits():
    got = demo.slos(0.289)
    assert got == {"interactive": demo.ClassSLO(1200, 580),
                   "batch": demo.ClassSLO(12000, 3500)}
    # A stall-free step (at most about one chunk step) meets the interactive gap; a
    # whole document in one step (about 6) does not.
    whole_document = CI.predict(StepShape(((2000, 0),), ()))
    assert whole_document / demo.chunk_step_s(CI) == pytest.approx(6.3, abs=0.1)
    assert 0.289e3 < got["interactive"].tbt_ms < whole_document * 1e3 < got["batch"].tbt_ms
    assert got["batch"].ttft_ms > got["interactive"].ttft_ms


@pytest.mark.parametrize("k", [4, 0.25, 10])
def test_a_faster_machine_gets_proportionally_tighter_slos(k):
    slow, fast = demo.slos(demo.chunk_step_s(CI)), demo.slos(demo.chunk_step_s(scaled(CI, k)))
    for name in slow:
        # Two significant digits each: within 5% of exact proportion.
        assert fast[name].ttft_ms * k == pytest.approx(slow[name].ttft_ms, rel=0.05)
        assert fast[name].tbt_ms * k == pytest.approx(slow[name].tbt_ms, rel=0.05)
    lo, hi = demo.capacity_range(demo.chunk_step_s(CI))
    flo, fhi = demo.capacity_range(demo.chunk_step_s(scaled(CI, k)))
    assert flo / k == pytest.approx(lo, rel=0.05) and fhi / k == pytest.approx(hi, rel=0.05)


def test_rate_is_the_load_fraction_of_capacity():
    assert demo.rate(1.15) == 0.92
    assert demo.rate(4.6) == 3.7
    assert demo.rate(0.0123) == 0.0098
    assert demo.LOAD_FRACTION == 0.8


def test_mix_and_mnemosyne_classes_state_the_same_deadlines():
    classes = demo.slos(0.289)
    mix = {c.name: c for c in parse_slo_mix(demo.slo_mix(classes))}
    assert {n: c.share for n, c in mix.items()} == {"interactive": 0.8, "batch": 0.2}
    assert str(mix["batch"].prompt) == "lognormal median 2000 sigma 0.3"
    flags = shlex.split(demo.arms(classes, "/x/y.json")["mnemosyne"])
    defined = parse_classes([flags[i + 1] for i, f in enumerate(flags)
                             if f == "--mnemosyne-slo-class"])
    for name, c in classes.items():
        assert (mix[name].ttft_slo_ms, mix[name].tbt_slo_ms) == (c.ttft_ms, c.tbt_ms)
        assert (defined[name].ttft_s * 1e3, defined[name].tbt_s * 1e3) == \
            pytest.approx((c.ttft_ms, c.tbt_ms))
    # The server's deadline is the class's TTFT, as the report judges it.
    assert flags[flags.index("--mnemosyne-prefill-ms-per-token") + 1] == "0"
    assert flags[-2:] == ["--mnemosyne-latency-model", "/x/y.json"]
    assert "--mnemosyne-latency-model" not in demo.ARMS["mnemosyne"]


def _model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "small"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 4096}))
    return model


def test_bench_argv_is_what_bench_ab_accepts(tmp_path):
    from vllm_ext.ab.cli import add_parser, build_config

    model = _model_dir(tmp_path)
    argv = demo.bench_argv(model, tmp_path / "out", demo.slos(0.289), 0.92, "/x/y.json")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="bench"))
    cfg = build_config(parser.parse_args(argv[1:]))
    assert [a.name for a in cfg.arms] == ["vllm", "prefill-first", "sarathi", "mnemosyne"]
    (trace,) = cfg.traces
    assert len(trace.requests) == demo.NUM_REQUESTS and "0.92 QPS" in trace.description
    assert {r.slo_class for r in trace.requests} == {"interactive", "batch"}
    assert all(r.prompt_tokens <= demo.MAX_PROMPT_TOKENS for r in trace.requests)
    assert cfg.slo_sending.send_class


def _simulated(capacity: cap.Capacity):
    result = mock.Mock(error=None, capacity=capacity)
    return mock.patch("vllm_ext.simulate.run.run_simulation", return_value=([result], {}))


def _sized(tmp_path, capacity: cap.Capacity | None, qps=None) -> tuple[demo.Sizing, list, list]:
    model = _model_dir(tmp_path)
    profile = tmp_path / "profile.json"
    profile.write_text(LatencyModel(CI.coef, fit={"machine": "x86_64, 2 cores",
                                                  "holdout_mean_rel_error": 0.03,
                                                  "model": str(model)}).to_json())
    said, budgets = [], []

    def profile_for(target, why=""):
        budgets.append(target.budget)
        return str(profile)

    cached = mock.patch.multiple("vllm_ext.frontend.startup_profile", cache_path=lambda t: profile,
                                 profile_for=profile_for)
    with cached, _simulated(capacity) as sim:
        sizing = demo.size(model, tmp_path, qps, say=said.append)
    if qps is not None:
        sim.assert_not_called()
    else:
        (cfg, simulation), _ = sim.call_args
        assert [a.name for a in cfg.arms] == ["vllm"]
        assert (cfg.capacity.low_qps, cfg.capacity.high_qps) == (0.17, 17)
        assert cfg.capacity.target == cap.CapacityTarget(3500, 1.2)
        assert Path(simulation.source.path).name == "step-time-model-2048.json"
    return sizing, said, budgets


def test_size_runs_at_the_fraction_of_the_simulated_capacity(tmp_path):
    probes = (cap.Probe(1.0, 2000, 0.2, 0, True), cap.Probe(1.3, 3000, 3.3, 0, False))
    sizing, said, budgets = _sized(tmp_path, cap.Capacity(1.15, 1.18, probes))
    assert budgets == [256, 2048]
    assert sizing.qps == 0.92 and sizing.capacity_qps == 1.15
    assert sizing.step_s == pytest.approx(0.29, abs=0.01)
    assert sizing.classes == demo.slos(sizing.step_s)
    assert said[0].startswith("$ vllm-ext simulate --latency-model ")
    assert "80% of stock vLLM's simulated capacity" in sizing.lines()[-1]
    # Mnemosyne predicts prefills with the model of its own (256-token) steps.
    assert Path(sizing.latency_model) == (tmp_path / "step-time-model-256.json").resolve()


def test_size_with_no_probe_passing_runs_at_the_lowest(tmp_path):
    probes = (cap.Probe(1.0, 9000, 9, 0, False), cap.Probe(0.3, 9000, 9, 0, False))
    sizing, _, _ = _sized(tmp_path, cap.Capacity(None, 0.3, probes))
    assert sizing.qps == 0.3 and "below 0.3 QPS" in sizing.why


def test_given_qps_skips_the_simulation_but_not_the_slos(tmp_path):
    sizing, _, budgets = _sized(tmp_path, None, qps=2.5)
    assert sizing.qps == 2.5 and sizing.why == "given by --qps" and budgets == [256]
    assert sizing.classes == demo.slos(demo.chunk_step_s(CI))


def test_cli_options():
    from vllm_ext.tools.cli import build_parser, main

    args = build_parser().parse_args(["demo", "--qps", "1.5", "--no-sizing"])
    assert (args.qps, args.no_sizing, args.workdir) == (1.5, True, "demo")
    assert main(["demo", "--qps", "0"]) == 2


@pytest.mark.parametrize("qps", [None, 3.0])
def test_no_sizing_runs_the_ci_machines_sizing(tmp_path, qps, capsys):
    model = _model_dir(tmp_path)
    with mock.patch("vllm_ext.tools.models.make_model", return_value=model), \
            mock.patch("vllm_ext.frontend.startup_profile.profile_for") as profiled, \
            mock.patch("vllm_ext.ab.cli.main", return_value=0) as bench:
        assert demo.run(tmp_path, qps=qps, sizing=False) == 0
    profiled.assert_not_called()
    (argv,), _ = bench.call_args
    assert argv[argv.index("--qps") + 1] == ("3" if qps else f"{demo.FIXED_QPS:g}")
    assert not any("--mnemosyne-latency-model" in a for a in argv)
    said = json.loads((tmp_path / "sizing.json").read_text())
    assert said["step_s"] == demo.FIXED_STEP_S and said["lines"][-1] in capsys.readouterr().out


def test_a_failed_simulation_says_what_to_do(tmp_path, capsys):
    model = _model_dir(tmp_path)
    failed = mock.Mock(error="ArmError: refused", capacity=None)
    with mock.patch("vllm_ext.tools.models.make_model", return_value=model), \
            mock.patch("vllm_ext.tools.demo._profiled", return_value=("/m.json", CI)), \
            mock.patch("vllm_ext.simulate.cli.build", return_value=(None, None)), \
            mock.patch("vllm_ext.simulate.run.run_simulation", return_value=([failed], {})), \
            mock.patch("vllm_ext.ab.cli.main") as bench:
        assert demo.run(tmp_path) == 1
    bench.assert_not_called()
    assert "ArmError: refused; give --qps" in capsys.readouterr().err

"""The flags on vLLM's real `vllm serve` parser, folded into engine arguments (no engine)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def serve_parser(tmp_path_factory):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # make_arg_parser loads the general plugins, as `vllm serve` does.
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))

    def raw(*args: str):
        ns = parser.parse_args(list(args))
        return ns, AsyncEngineArgs.from_cli_args(ns)

    def parse(*args: str):
        return raw("model-dir", *args)

    parse.raw = raw

    # Folding a selection prepares this process as a front end (stats directory in the
    # environment); keep that out of the engines later tests start.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLMEXT_STATS_DIR", str(tmp_path_factory.mktemp("stats")))
        yield parse


def test_without_flags_vllm_parses_as_before(serve_parser):
    ns, engine_args = serve_parser()
    assert engine_args.scheduler_cls is None
    assert engine_args.additional_config == {}
    assert engine_args.max_num_batched_tokens is None


def test_scheduler_cls_keeps_working(serve_parser):
    _, engine_args = serve_parser("--scheduler-cls", "my_pkg.MyScheduler")
    assert engine_args.scheduler_cls == "my_pkg.MyScheduler"


def test_sarathi_folds_into_engine_arguments(serve_parser):
    _, engine_args = serve_parser("--scheduler", "sarathi", "--additional-config", '{"x": 1}')
    assert engine_args.scheduler_cls == "vllm_ext.engine.scheduling.SarathiScheduler"
    assert engine_args.max_num_batched_tokens == 256  # the CPU default budget
    assert engine_args.enable_chunked_prefill is True
    assert engine_args.long_prefill_token_threshold == 0
    assert engine_args.additional_config == {"x": 1, "vllm_ext": {"scheduler": {
        "name": "sarathi", "token_budget": 256, "kv_admission": "full"}}}


def test_sarathi_budget_from_max_num_batched_tokens(serve_parser):
    _, engine_args = serve_parser("--scheduler", "sarathi", "--max-num-batched-tokens", "512",
                                  "--sarathi-kv-admission", "chunk")
    assert engine_args.max_num_batched_tokens == 512
    assert engine_args.additional_config["vllm_ext"]["scheduler"]["kv_admission"] == "chunk"


def test_mnemosyne_folds_deadlines_and_sarathi_options_into_engine_arguments(serve_parser):
    _, engine_args = serve_parser("--scheduler", "mnemosyne", "--mnemosyne-ttft-slo-s", "0.5",
                                  "--mnemosyne-token-budget", "128",
                                  "--mnemosyne-starvation-s", "3")
    assert engine_args.scheduler_cls == "vllm_ext.engine.scheduling.MnemosyneScheduler"
    assert engine_args.max_num_batched_tokens == 128
    assert engine_args.scheduling_policy == "fcfs"
    assert engine_args.additional_config == {"vllm_ext": {"scheduler": {
        "name": "mnemosyne", "token_budget": 128, "kv_admission": "full", "ttft_slo_s": 0.5,
        "prefill_ms_per_token": 1.0, "starvation_s": 3.0}}}


SLO_INTAKE = "vllm_ext.frontend.slo_middleware.SLOIntake"
# With any selection: vllm-ext's series on /metrics also with several API servers.
METRICS = "vllm_ext.frontend.metrics_middleware.MetricsAppend"


def test_mnemosyne_slo_classes_fold_and_bring_the_servers_slo_intake(serve_parser):
    ns, engine_args = serve_parser("--scheduler", "mnemosyne",
                                   "--mnemosyne-slo-class", "interactive=ttft:500ms,tbt:100ms",
                                   "--mnemosyne-slo-class", "batch=ttft:30s",
                                   "--mnemosyne-max-defer-steps", "0")
    record = engine_args.additional_config["vllm_ext"]["scheduler"]
    assert record["slo_classes"] == {"interactive": {"ttft_ms": 500.0, "tbt_ms": 100.0},
                                     "batch": {"ttft_ms": 30000.0}}
    assert record["max_defer_steps"] == 0
    assert ns.middleware == [METRICS, SLO_INTAKE]


def test_middleware_is_added_once_after_the_operators_middleware(serve_parser):
    ns, _ = serve_parser("--scheduler", "mnemosyne", "--middleware", "my.Mw",
                         "--middleware", SLO_INTAKE)
    assert ns.middleware == ["my.Mw", SLO_INTAKE, METRICS]
    ns, _ = serve_parser("--scheduler", "sarathi")
    assert ns.middleware == [METRICS]
    ns, _ = serve_parser()
    assert ns.middleware == []  # stock: and the parser's default list was not changed in place


def test_prefill_first_turns_chunking_off(serve_parser):
    _, engine_args = serve_parser("--scheduler", "prefill-first")
    assert engine_args.scheduler_cls == "vllm_ext.engine.scheduling.PrefillFirstScheduler"
    assert engine_args.enable_chunked_prefill is False


def test_kvp_flag_becomes_decode_context_parallelism(serve_parser):
    _, engine_args = serve_parser("--kvp", "2")
    assert (engine_args.tensor_parallel_size, engine_args.decode_context_parallel_size) == (2, 2)
    assert engine_args.additional_config["vllm_ext"]["attn"] == {"name": "pod", "impl": "torch",
                                                               "kvp": 2}


def test_attn_pod_is_chosen_in_the_engine_arguments_only(serve_parser):
    before = dict(os.environ)
    _, engine_args = serve_parser("--attn", "pod", "--pod-impl", "triton")
    assert engine_args.additional_config == {"vllm_ext": {"attn": {"name": "pod", "impl": "triton",
                                                                  "kvp": 1}}}
    assert engine_args.attention_backend == "CUSTOM"
    # Nothing of the choice is left in this process for engines it starts later (only
    # Triton's own interpreter switch, for the engine processes: see _configure_pod).
    changed = {k for k in {*before, *os.environ} if before.get(k) != os.environ.get(k)}
    assert changed <= {"TRITON_INTERPRET"}, changed
    assert os.environ["TRITON_INTERPRET"] == "1"


def test_pod_impl_choices(serve_parser, capsys):
    with pytest.raises(SystemExit) as e:
        serve_parser("--attn", "pod", "--pod-impl", "cuda")
    assert e.value.code == 2
    assert "argument --pod-impl: invalid choice: 'cuda' (choose from 'torch', 'triton')" in capsys.readouterr().err


def test_vattention_settings_reach_the_engine_processes(serve_parser):
    _, engine_args = serve_parser("--kv-allocator", "vattention", "--vattention-page-size",
                                  "16KiB", "--vattention-physical-limit", "1.5GiB")
    expected = {"backend": "host", "layout": "blocks", "page_size": 16384, "premap": 2,
                "watermark": 8, "physical_limit": 3 << 29}
    assert engine_args.additional_config == {"vllm_ext": {"kv_allocator": {
        "name": "vattention", **expected}}}


def test_vattention_sizes_are_checked_by_the_parser(serve_parser, capsys):
    with pytest.raises(SystemExit):
        serve_parser("--kv-allocator", "vattention", "--vattention-page-size", "lots")
    assert "argument --vattention-page-size: invalid size_in_bytes value: 'lots'" in \
        capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--scheduler", "sarathi", "--scheduler-cls", "my.Scheduler"],
     "--scheduler and --scheduler-cls both choose the scheduler class; give one of them"),
    (["--sarathi-token-budget", "64"],
     "--sarathi-token-budget applies to --scheduler sarathi, which is not selected"),
    (["--scheduler", "sarathi", "--sarathi-token-budget", "64", "--max-num-batched-tokens", "128"],
     "--sarathi-token-budget 64 contradicts --max-num-batched-tokens 128"),
    (["--scheduler", "sarathi", "--sarathi-kv-admission", "lazy"],
     "invalid choice: 'lazy' (choose from 'full', 'chunk')"),
    (["--scheduler", "prefill-first", "--enable-chunked-prefill"],
     "--scheduler prefill-first needs enable_chunked_prefill=False"),
    (["--kv-allocator", "vattention", "--vattention-premap", "-1"],
     "--vattention-premap is a number of pages >= 0, got -1"),
    (["--attn", "pod", "--attention-backend", "FLEX_ATTENTION"],
     "--attn pod needs attention_backend='CUSTOM'"),
    (["--scheduler", "mnemosyne", "--scheduling-policy", "priority"],
     "--scheduler mnemosyne needs scheduling_policy='fcfs'"),
    (["--scheduler", "mnemosyne", "--mnemosyne-ttft-slo-s", "0"],
     "--mnemosyne-ttft-slo-s must be > 0, got 0.0"),
    (["--scheduler", "mnemosyne", "--mnemosyne-token-budget", "64",
      "--max-num-batched-tokens", "128"],
     "--mnemosyne-token-budget 64 contradicts --max-num-batched-tokens 128"),
    (["--scheduler", "mnemosyne", "--mnemosyne-slo-class", "batch=ttft:30"],
     "--mnemosyne-slo-class batch ttft: expected a duration like 1.5s or 200ms, got '30'"),
    (["--scheduler", "mnemosyne", "--mnemosyne-slo-class", "batch"],
     "--mnemosyne-slo-class: 'batch' is not NAME=ttft:DURATION[,tbt:DURATION]"),
    (["--scheduler", "mnemosyne", "--mnemosyne-max-defer-steps", "-1"],
     "--mnemosyne-max-defer-steps must be >= 0, got -1"),
    (["--scheduler", "sarathi", "--mnemosyne-slo-class", "batch=ttft:1s"],
     "--mnemosyne-slo-class applies to --scheduler mnemosyne, which is not selected"),
], ids=["with-scheduler-cls", "option-without-scheduler", "budget-conflict", "bad-admission",
        "prefill-first-chunked", "vattention-premap", "attn-conflict", "mnemosyne-priority",
        "mnemosyne-slo", "mnemosyne-budget-conflict", "slo-class-duration", "slo-class-form",
        "max-defer-steps", "slo-class-without-mnemosyne"])
def test_bad_flags_exit_2_with_one_error_line(serve_parser, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        serve_parser(*args)
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors


@pytest.mark.parametrize("model_args", [["model-dir"], ["--model", "model-dir"]],
                         ids=["positional", "--model"])
def test_start_up_profile_gets_the_served_model(serve_parser, capsys, monkeypatch, tmp_path,
                                                model_args):
    """With no --sarathi-latency-model the engine is profiled before it starts; the model
    reaches the profiler however it was given, and a profile over the time limit is
    refused naming the command that makes one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("VLLMEXT_PROFILE_TIMEOUT_S", "0.05")
    with pytest.raises(SystemExit) as e:
        serve_parser.raw(*model_args, "--scheduler", "sarathi", "--sarathi-tbt-slo-ms", "200")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "profiling model-dir once" in err
    assert ("profiling model-dir for --sarathi-tbt-slo-ms took longer than 0.05 s "
            "(VLLMEXT_PROFILE_TIMEOUT_S); run `vllm-ext profile model-dir --out FILE`") in err
    assert not list(tmp_path.rglob("*.json")), "nothing half-made is cached"

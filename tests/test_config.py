"""`ExtConfig`: one engine's choices, typed and checked, as every vLLM process reads them
from the engine's `additional_config` (vllm_ext.config)."""

from __future__ import annotations

import copy

import pytest

from test_scheduler_properties import config, step_model_path  # noqa: F401  (fixtures)
from vllm_ext.allocators.settings import VAttentionSettings
from vllm_ext.config import (CONFIG_KEY, ConfigError, ExtConfig, MnemosyneSettings, NoSettings,
                             PodSettings)
from vllm_ext.frontend.selection import resolve
from vllm_ext.schedulers.mnemosyne import MnemosyneConfig
from vllm_ext.schedulers.sarathi import SarathiConfig
from vllm_ext.tools.driver import Driver


def _resolved(selected: dict, options: dict | None = None) -> dict:
    """The record the front end writes for this selection (vLLM's CPU platform)."""
    return resolve(selected, options or {}, {}, "cpu")["additional_config"][CONFIG_KEY]


def test_every_builtin_record_reads_back_typed():
    record = _resolved({"scheduler": "sarathi", "attn": "pod", "kv_allocator": "vattention"},
                       {"sarathi_token_budget": 64, "vattention_page_size": "128KiB"})
    ext = ExtConfig.from_record(record)
    assert ext.scheduler.settings == SarathiConfig(64, "full")
    assert ext.attn.settings == PodSettings("torch", 1)
    assert ext.kv_allocator.settings == VAttentionSettings("host", page_size=128 << 10)
    assert ext.settings("scheduler", "sarathi") is ext.scheduler.settings
    assert ext.settings("scheduler", "mnemosyne") is None
    assert ext.describe() == ("scheduler=sarathi(token_budget=64, kv_admission=full); "
                              "attn=pod(impl=torch, kvp=1); kv_allocator=vattention(backend=host, "
                              "layout=blocks, page_size=131072, premap=2, watermark=8, "
                              "physical_limit=None)")


def test_mnemosyne_splits_into_sarathi_steps_and_deadlines(step_model_path):  # noqa: F811
    record = _resolved({"scheduler": "mnemosyne"},
                       {"mnemosyne_token_budget": 128, "mnemosyne_ttft_slo_s": 1.5,
                        "mnemosyne_latency_model": step_model_path})
    settings = ExtConfig.from_record(record).scheduler.settings
    assert isinstance(settings, MnemosyneSettings)
    assert settings.deadlines == MnemosyneConfig(1.5, 1.0)
    # Without a TBT target the model only predicts prefill times: no adaptive chunking.
    assert settings.sarathi == SarathiConfig(128, "full")
    assert settings.latency_model == step_model_path


def test_choosing_nothing_is_an_empty_config():
    assert ExtConfig.from_additional_config(None).is_empty()
    assert ExtConfig.from_additional_config({"other": 1}) == ExtConfig()
    assert ExtConfig.of(None) == ExtConfig()
    assert ExtConfig.from_record({"scheduler": {"name": "vllm"}}).scheduler.settings == NoSettings()


@pytest.mark.parametrize("record, message", [
    ({"schedular": {"name": "sarathi"}},
     r"unknown key 'schedular'; allowed: scheduler, attn, kv_allocator"),
    ({"scheduler": {"name": "sarathi", "token_budget": 64, "chunk": 8}},
     r"\['scheduler'\] \(sarathi\): unknown key 'chunk'; allowed: token_budget, kv_admission"),
    ({"scheduler": {"name": "sarathi", "token_budget": "64"}},
     r"\['scheduler'\] \(sarathi\): 'token_budget' must be int, got '64'"),
    ({"scheduler": {"name": "sarathi", "token_budget": True}}, r"'token_budget' must be int"),
    ({"attn": {"name": "pod", "impl": "torch", "kvp": 1.5}}, r"'kvp' must be int, got 1.5"),
    ({"kv_allocator": {"name": "vattention", "page_size": None, "physical_limit": "1G"}},
     r"'physical_limit' must be int or null, got '1G'"),
    ({"scheduler": {"name": "sarathi"}}, r"\(sarathi\): .*token_budget"),
    ({"scheduler": {"name": "sarathi", "token_budget": 0}}, r"budget must be >= 1, got 0"),
    ({"attn": {"name": "pod", "impl": "cuda"}}, r"--pod-impl 'cuda': choose from torch, triton"),
    ({"attn": "pod"}, r"\['attn'\] must be a mapping with a 'name' string"),
    ([("scheduler", {})], r"must be a mapping, got list"),
])
def test_a_record_that_does_not_fit_names_the_key(record, message):
    with pytest.raises(ConfigError, match=message):
        ExtConfig.from_record(record)


def test_a_float_setting_takes_an_integer():
    record = {"scheduler": {"name": "mnemosyne", "token_budget": 64, "ttft_slo_s": 2}}
    assert ExtConfig.from_record(record).scheduler.settings.deadlines.ttft_slo_s == 2


def test_a_third_partys_settings_are_kept_for_it_to_check():
    ext = ExtConfig.from_record({"scheduler": {"name": "lottery", "tickets": 2}})
    assert ext.scheduler.name == "lottery" and dict(ext.scheduler.settings) == {"tickets": 2}
    with pytest.raises(TypeError):
        ext.scheduler.settings["tickets"] = 3  # read-only, as every other setting


def test_built_once_per_record_in_the_records_order():
    additional = {CONFIG_KEY: {"scheduler": {"name": "sarathi", "token_budget": 64,
                                             "kv_admission": "chunk"}}}
    first = ExtConfig.from_additional_config(additional)
    assert ExtConfig.from_additional_config(copy.deepcopy(additional)) is first
    # The start-up line says the settings as the front end resolved them.
    assert first.describe() == "scheduler=sarathi(token_budget=64, kv_admission=chunk)"


def test_vllms_scheduler_refuses_a_record_that_does_not_fit(config):  # noqa: F811
    cfg = copy.deepcopy(config(scheduler="sarathi", sarathi_token_budget=64))  # shared: a copy
    with Driver(cfg, 64) as driver:  # the record as the front end wrote it
        assert driver.scheduler.policy.config == SarathiConfig(64, "full")
    cfg.additional_config[CONFIG_KEY]["scheduler"]["token_budget"] = "64"
    with pytest.raises(ConfigError, match=r"'token_budget' must be int, got '64'"):
        Driver(cfg, 64)

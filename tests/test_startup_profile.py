"""The start-up profile's cache key: everything that changes step times, the device and
its driver included (no engine; the profile itself is tested in test_engine_adaptive.py)."""

from __future__ import annotations

from vllm_ext.frontend import startup_profile
from vllm_ext.frontend.startup_profile import ProfileTarget, cache_path, device_identity


def test_the_key_names_this_machines_device():
    found = device_identity()
    assert found["platform"] == "cpu"
    with open("/proc/cpuinfo") as f:
        model = next(line.partition(":")[2].strip() for line in f
                     if line.startswith("model name"))
    assert found["device"] == model


def test_another_device_or_driver_gets_another_profile(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    target = ProfileTarget("some/model", budget=256)
    paths = set()
    for device in ({"platform": "cuda", "device": "NVIDIA H100 80GB HBM3", "driver": "570.86"},
                   {"platform": "cuda", "device": "NVIDIA H100 80GB HBM3", "driver": "575.51"},
                   {"platform": "cuda", "device": "NVIDIA A100-SXM4-80GB", "driver": "570.86"}):
        monkeypatch.setattr(startup_profile, "device_identity", lambda d=device: d)
        paths.add(cache_path(target))
        assert cache_path(target) in paths  # the same device finds its own profile again
    assert len(paths) == 3

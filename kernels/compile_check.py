"""Compile POD-Attention for NVIDIA GPUs on a machine without one, and read what ptxas
says of each build: registers, spills, shared memory, and the occupancy they allow.

Triton compiles for a CUDA target with no device present (`triton.compile` with a
`GPUTarget`), and the ptxas it ships reports every function's resources (`ptxas -v`).
So every build the launcher can ask for (dtype, head size, KV shard or not: nothing
about a batch selects a build) is made for every target here, with the signature and
attributes Triton's own launch-time rule gives its arguments (`specialisation`), and a
spill or an over-large shared-memory request is caught before anyone runs the kernel on
a GPU.
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
    """One build of the kernel: what `pod_attention` launches a model of this shape with."""

    dtype: str
    head_dim: int
    sharded: bool = False  # one rank's share of the KV (--kvp)
    block_size: int = 16  # KV block (vLLM's default on GPUs)
    num_heads: int = 32
    num_kv_heads: int = 8
    num_sms: int = 132  # an H100's

    @property
    def name(self) -> str:
        return f"{self.dtype}-d{self.head_dim}" + ("-kvp" if self.sharded else "")

    @property
    def torch_dtype(self):
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]

    def launch(self):
        """(constexprs, launch options) exactly as the launcher computes them."""
        import torch

        from vllm_ext.kernels import pod

        return pod.launch_constants(self.head_dim, self.block_size, self.num_heads,
                                    self.num_kv_heads, self.torch_dtype,
                                    ieee=self.torch_dtype == torch.float32, num_sms=self.num_sms,
                                    sharded=self.sharded)

    def arguments(self) -> dict:
        """Stand-ins for a served launch's runtime arguments, made by the launcher's own
        `launch_arguments`: tiny tensors of the model's dtype, the KV cache in vLLM's
        Triton layout as the CUDA backend passes it, a one-decode plan. Triton specializes
        on a tensor's dtype and alignment and an integer's divisibility, never on sizes."""
        import torch

        from vllm_ext.kernels import pod

        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        query = torch.empty(1, heads, d, dtype=self.torch_dtype)
        kv_cache = torch.empty(2, kv_heads, self.block_size, 2 * d, dtype=self.torch_dtype)
        key_cache, value_cache = kv_cache.transpose(1, 2).split(d, dim=-1)
        seq_lens, qsl = torch.ones(1, dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
        block_m = pod.tile_for(d, self.torch_dtype, self.sharded).block_m
        p = pod.plan(qsl, seq_lens, 1, heads, kv_heads, block_m=block_m)
        ws = pod.Workspace.for_plan(p, 1, heads, kv_heads, d, torch.device("cpu"))
        return pod.launch_arguments(query, key_cache, value_cache, torch.empty_like(query), ws.lse,
                                    torch.zeros(1, 1, dtype=torch.int32), seq_lens, qsl, p, ws,
                                    d ** -0.5, (2, 0, 1) if self.sharded else (1, 0, 1))

    def key(self) -> tuple:
        """What tells this build from any other (`launch_key`): a launch whose key is
        one of the gate's runs a build the gate has checked."""
        constants, options = self.launch()
        return launch_key({**self.arguments(), **constants, **options})


def configs() -> list[Config]:
    return [Config(d, h, kvp) for kvp, d, h in
            itertools.product((False, True), DTYPES, SUPPORTED_HEAD_DIMS)]


def specialisation(args: dict, constants: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attributes) of the build Triton makes for a launch of the
    POD kernel with runtime `args` and `constants` (both by name), by Triton's own rule
    for each argument, as its launcher applies it: a pointer's dtype and 16-byte
    alignment, an integer's width and divisibility by 16, an integer 1 made a constant;
    nothing for the arguments the kernel does not specialize on (pod.RUNTIME_ARGS)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    from vllm_ext.kernels import pod

    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(_parameters()):
        if name in constants:
            signature[name], constexprs[(i,)] = "constexpr", constants[name]
            continue
        kind, attr = native_specialize_impl(BaseBackend, args[name], False,
                                            name not in pod.RUNTIME_ARGS, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = attr
        elif attr:
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return signature, constexprs, attrs


def launch_key(launch: dict) -> tuple:
    """What tells one build from another for a launch's keyword arguments (runtime
    arguments, constexprs and options together, as the launcher passes them)."""
    params = _parameters()
    constants = {k: v for k, v in launch.items() if params.get(k) == "constexpr"}
    options = {k: v for k, v in launch.items() if k not in params}
    signature, constexprs, attrs = specialisation(launch, constants)
    return (tuple(signature.items()), tuple(sorted(constexprs.items())),
            tuple(sorted((k, str(v)) for k, v in attrs.items())), tuple(sorted(options.items())))


def _parameters() -> dict[str, str]:
    """The kernel's parameters in order: "constexpr" or "runtime"."""
    import inspect

    from vllm_ext.kernels import pod

    kernel = pod.pod_attention_kernel
    return {name: "constexpr" if "constexpr" in str(p.annotation) else "runtime"
            for name, p in inspect.signature(kernel.fn).parameters.items()}


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
    signature, constexprs, attrs = specialisation(config.arguments(), constants)
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", target.capability, 32),
                              options=options)
    ptx = compiled.asm["ptx"]
    arch = re.search(r"^\.target (\S+)", ptx, re.MULTILINE).group(1)
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

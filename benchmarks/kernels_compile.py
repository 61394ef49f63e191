"""Make every POD-Attention build the launcher can ask for, for sm_80, sm_90 and sm_100,
on this machine (no GPU needed) and write what ptxas reports: registers, spills, shared
memory and the occupancy they allow.

    python benchmarks/kernels_compile.py [--out benchmarks/results] [--jobs 2]

Writes kernels-compile.md (the table) and kernels-compile.json. Exit status 1 if any
build spills or asks for more shared memory than its target has.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

from vllm_ext.kernels import compile_check as cc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    import triton

    started = time.monotonic()
    reports = cc.build_all(args.jobs)
    targets = {t.name: t for t in cc.TARGETS}
    problems = [f"{r.config} on {r.target}: {p}" for r in reports
                for p in r.problems(targets[r.target])]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = (f"{platform.machine()}, no GPU; Triton {triton.__version__} and the ptxas it "
               f"ships; {time.strftime('%Y-%m-%d')}")
    (out / "kernels-compile.json").write_text(json.dumps(
        {"machine": machine, "reports": [asdict(r) for r in reports], "problems": problems},
        indent=1))
    (out / "kernels-compile.md").write_text(
        "# POD-Attention builds for NVIDIA GPUs\n\n"
        f"`python benchmarks/kernels_compile.py` ({machine}). Every build the launcher asks "
        "for (dtype, head size, KV-sharded or not; 32 query / 8 KV heads, 16-token KV blocks, "
        "132 SMs: the decode split count is a runtime argument, so no batch selects a build) "
        "compiled for each target by Triton, with the signature and attributes a launch "
        "gives it, and read back from `ptxas -v`. Occupancy: "
        "resident warps over the SM's 64, from registers (allocated per warp in units of 256), "
        "shared memory and warps per block.\n\n"
        + ("No build spills or exceeds its target's shared memory.\n\n" if not problems else
           "Problems:\n\n" + "".join(f"- {p}\n" for p in problems) + "\n")
        + cc.table(reports) + "\n")
    print(f"{len(reports)} builds in {time.monotonic() - started:.0f} s; "
          f"{len(problems)} problems; wrote {out}/kernels-compile.md")
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

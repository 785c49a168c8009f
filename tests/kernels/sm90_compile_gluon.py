"""Compile the Gluon FP8 grouped GEMM for Hopper (sm_90a) without a GPU, and read what ptxas says.

    python -m tests.kernels.sm90_compile_gluon        # one line of JSON per configuration

Gluon kernels have no CPU interpreter, so this is the only check a machine without a GPU can make: the kernel
lowers through triton.compile (a GluonASTSource: the Gluon front end, then the NVIDIA backend) to PTX, and the
bundled ptxas reports registers and spills. It also reports what the design rests on: wgmma instructions, the
``wgmma.wait_group`` counts (a non-zero one is the wait that leaves the next K block's MMA running during the
promotion), warp specialisation (``setmaxnreg`` register hand-over between the producer and consumer warps),
TMA loads and mbarrier waits, whether ptxas serialised the wgmmas (its "Potential Performance Loss" note), and,
through the bundled cuobjdump, the machine code's fp8 MMAs (QGMMA) and ``WARPGROUP.DEPBAR.LE gsb0, 0x1`` waits.
Run it in a process without TRITON_INTERPRET=1.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from tests.kernels.sm90_compile import ptxas_path, toolchain_problem


def _desc_type(dtype: str, block: list[int], layout) -> str:
    """The signature string the launcher's specialisation gives a Gluon TensorDescriptor argument."""
    return f"tensordesc<{dtype}[{', '.join(map(str, block))}],{layout!r}>"


def _sass(cubin: str) -> str | None:
    """The cubin's machine code from Triton's bundled cuobjdump (None when it has none)."""
    tool = os.path.join(os.path.dirname(ptxas_path()), "cuobjdump")
    if not os.path.exists(tool):
        return None
    return subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout


def compile_down_kernel(block_m: int, block_n: int, num_stages: int, maxnreg: int, scatter: bool) -> dict:
    from indexcache.kernels.fp8_grouped_mm.gluon import GROUP_M, _grouped_fp8_ws_kernel, operand_layouts

    a_layout, w_layout = operand_layouts(block_m, block_n)
    num_warps = block_m // 16
    types = {"a_desc": _desc_type("fp8e4nv", [block_m, 128], a_layout),
             "w_desc": _desc_type("fp8e4nv", [block_n, 128], w_layout),
             "sa_ptr": "*fp32", "s_ptr": "*fp32", "out_ptr": "*bf16", "out_row_ptr": "*i32", "row_w_ptr": "*fp32",
             "tile_e_ptr": "*i32", "tile_row_ptr": "*i32", "row_end_ptr": "*i32"}
    # the launcher's specialisations at the model's shapes: x's scales column-major (stride 1 along rows), or
    # h's row-major scales (stride 1 along K blocks); out row-major
    constexprs = {"stride_sam": 1, "stride_sk": 1, "stride_on": 1, "GROUP_M": GROUP_M, "NUM_STAGES": num_stages,
                  "SCATTER_OUT": scatter, "num_warps": num_warps}
    fn = _grouped_fp8_ws_kernel
    names = fn.arg_names
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    div16 = ("N", "K", "stride_se", "stride_sn", "stride_om")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*") or n in div16}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                         attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 64),
                       options={"num_warps": num_warps, "maxnreg": maxnreg})
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        src_ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src_ptx, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas_path(), "-v", "--gpu-name=sm_90a", src_ptx, "-o", cubin], capture_output=True,
                           text=True, check=True)
        sass = _sass(cubin)
    regs = re.findall(r"Used (\d+) registers", r.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", r.stderr)
    waits = sorted({int(x) for x in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)})
    return {"config": f"{block_m}x{block_n} stages {num_stages} maxnreg {maxnreg} scatter {scatter}",
            "triton": triton.__version__, "registers": int(regs[0]), "spill_bytes": int(spills[0]) if spills else 0,
            "wgmma": ptx.count("wgmma.mma_async"), "wait_groups": waits,
            "setmaxnreg": len(re.findall(r"setmaxnreg", ptx)),
            "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
            "mbarrier_waits": len(re.findall(r"mbarrier\.try_wait", ptx)),
            "shared_bytes": k.metadata.shared,
            "wgmma_serialized": "wgmma.mma_async instructions are serialized" in r.stderr,
            # in the machine code: the fp8 MMAs and the waits that leave one MMA group in flight
            "sass_gmma": None if sass is None else len(re.findall(r"\bQGMMA\.", sass)),
            "sass_wait_1": None if sass is None else len(re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x1\b", sass)),
            "ptxas_notes": [ln for ln in r.stderr.splitlines() if "Performance" in ln or "arning" in ln]}


CONFIGS = [(64, 128, 4, 128, True), (128, 128, 4, 168, False)]


def main() -> int:
    problem = toolchain_problem("sm90_compile_gluon")
    if problem:
        print(problem)
        return 2
    for cfg in CONFIGS:
        print(json.dumps(compile_down_kernel(*cfg)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile the Gluon kernels (the FP8 grouped GEMM, the prefill indexer logits) for Hopper (sm_90a) without a GPU,
and read what ptxas says.

    python -m tests.kernels.sm90_compile_gluon            # one line of JSON per configuration
    python -m tests.kernels.sm90_compile_gluon --indexer  # the prefill indexer logits kernel at 32 and 64 heads,
                                                          # and its candidates form (the fused top-k's filter)
    python -m tests.kernels.sm90_compile_gluon --indexer-diagnose [--sass DIR]  # its diagnostic modes, per tile

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

import hashlib
import inspect
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


def constexprs_with_defaults(fn, constexprs: dict) -> dict:
    """``constexprs`` plus the defaults of ``fn``'s other constexpr parameters, as a launch fills them in. Left
    out, such a parameter would be compiled as a runtime integer: both sides of every branch on it, a kernel that
    never runs. One with no default must be given (ValueError naming it)."""
    out = dict(constexprs)
    for p in fn.params:
        if p.is_constexpr and p.name not in out:
            if p.default is inspect.Parameter.empty:
                raise ValueError(f"sm90_compile_gluon: constexpr {p.name!r} of {fn.__name__} has no default; pass it")
            out[p.name] = p.default
    return out


def _compile(fn, types: dict, constexprs: dict, div16: tuple[str, ...], num_warps: int, maxnreg: int,
             config: str, sass_path: str | None = None) -> dict:
    """Lower the Gluon kernel ``fn`` for sm_90a as the launcher specialises it (pointers and ``div16`` integers
    marked divisible by 16), assemble it with ptxas and read the PTX and machine code."""
    constexprs = constexprs_with_defaults(fn, constexprs)
    names = fn.arg_names
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*") or n in div16}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                         attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 64),
                       options={"num_warps": num_warps, "maxnreg": maxnreg})
    ptx = k.asm["ptx"]
    scores = score_expressions(ptx)
    with tempfile.TemporaryDirectory() as d:
        src_ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src_ptx, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas_path(), "-v", "--gpu-name=sm_90a", src_ptx, "-o", cubin], capture_output=True,
                           text=True, check=True)
        sass = _sass(cubin)
    if sass_path and sass is not None:
        with open(sass_path, "w") as f:
            f.write(sass)
    regs = re.findall(r"Used (\d+) registers", r.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", r.stderr)
    waits = sorted({int(x) for x in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)})
    return {"config": config,
            "triton": triton.__version__, "registers": int(regs[0]), "spill_bytes": int(spills[0]) if spills else 0,
            "wgmma": ptx.count("wgmma.mma_async"), "wait_groups": waits,
            "setmaxnreg": len(re.findall(r"setmaxnreg", ptx)),
            "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
            "mbarrier_waits": len(re.findall(r"mbarrier\.try_wait", ptx)),
            "shared_bytes": k.metadata.shared, "total_warps": k.metadata.num_warps,
            "wgmma_serialized": "wgmma.mma_async instructions are serialized" in r.stderr,
            # in the machine code: the fp8 MMAs and the waits that leave one MMA group in flight
            "sass_gmma": None if sass is None else len(re.findall(r"\bQGMMA\.", sass)),
            "sass_wait_1": None if sass is None else len(re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x1\b", sass)),
            "ptxas_notes": [ln for ln in r.stderr.splitlines() if "Performance" in ln or "arning" in ln],
            # the scores' arithmetic (``score_expressions``), as a digest: equal digests, equal bits
            "score_digest": hashlib.sha1("\n".join(scores).encode()).hexdigest()[:16],
            "scores_in_ptx": len(scores)}  # a thread's scores of a tile, both partitions


def score_expressions(ptx: str) -> list[str]:
    """The f32 arithmetic behind each score the PTX computes, as canonical expression strings, sorted: a symbolic
    run through the PTX where wgmma outputs are ``acc[i]`` (their place in the instruction), global loads ``ld``
    (renamed by first use inside each expression), shuffles and constants kept as written. A score is a ``mul``
    of a fused multiply-add chain (the head sum times the key scale). Two kernels that list the same expressions
    round every score the same way: which product an FMA contraction rounds first is visible here."""
    env: dict[str, tuple] = {}
    loads = 0
    scores = []
    for line in ptx.splitlines():
        s = line.strip()
        if m := re.match(r"wgmma\.mma_async\S*\s+\{([^}]*)\}", s):
            for i, r in enumerate(x.strip() for x in m.group(1).split(",")):
                env[r] = ("acc", i)
        elif m := re.match(r"(?:@%p\d+\s+)?ld\.global\S*\s+\{?\s*(%r\d+)\s*\}?,", s):
            env[m.group(1)] = ("ld", loads)
            loads += 1
        elif m := re.match(r"shfl\.sync\.(\w+)\.b32\s+(%r\d+),\s*(%r\d+),\s*(\w+)", s):
            env[m.group(2)] = ("shfl", m.group(1), env.get(m.group(3), m.group(3)), m.group(4))
        elif m := re.match(r"mov\.b32\s+(%r\d+),\s*(-?\d+|%r\d+);", s):
            env[m.group(1)] = env.get(m.group(2), ("const", m.group(2)))
        elif m := re.match(r"(max|min|mul|add|sub|fma\.rn)\.f32\s+(%r\d+),\s*([^;]*);", s):
            args = tuple(env.get(a.strip(), a.strip()) for a in m.group(3).split(","))
            env[m.group(2)] = (m.group(1),) + args
            if m.group(1) == "mul" and any(isinstance(a, tuple) and a[0] in ("fma.rn", "add") for a in args):
                scores.append(env[m.group(2)])

    def canonical(e) -> str:
        names: dict[str, str] = {}
        return re.sub(r"\('ld', (\d+)\)", lambda x: names.setdefault(x.group(1), f"ld{len(names)}"), repr(e))

    return sorted(canonical(e) for e in scores)


def _main_loop(sass: str) -> str:
    """The machine code of the longest loop before the first EXIT (a predicated branch back): the indexer's
    consumer loop, one key tile a pass. The mbarrier retry loops sit after EXIT and are left out."""
    code = sass[:sass.find("EXIT")] if "EXIT" in sass else sass
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", code)
    best = (0, 0)
    for addr, ins in lines:
        m = re.match(r"@!?U?P\d\s+BRA\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", ins.strip())
        if m and int(m.group(1), 16) < int(addr, 16):
            best = max(best, (int(addr, 16) - int(m.group(1), 16), int(m.group(1), 16)), key=lambda x: x[0])
    if best[0] == 0:
        return ""
    lo, hi = best[1], best[1] + best[0]
    return "\n".join(ins.strip() for addr, ins in lines if lo <= int(addr, 16) <= hi)


def loop_stats(sass: str, tiles_per_pass: int = 1) -> dict:
    """Per key tile of the main loop: instructions, fp8 MMAs, the wgmma waits' counts (DEPBAR.LE values), named
    barriers (BAR.SYNC), global stores, the epilogue's FFMA / FMNMX / FMUL, shuffles and shared-memory stores."""
    body = _main_loop(sass)
    ins = [ln for ln in body.splitlines() if ln and not ln.startswith("NOP")]

    def per_tile(pattern):
        return len([ln for ln in ins if re.search(pattern, ln)]) / tiles_per_pass

    return {"loop_instructions_per_tile": len(ins) / tiles_per_pass,
            "loop_qgmma_per_tile": per_tile(r"\bQGMMA\."),
            "loop_depbar_waits": sorted(int(x, 16) for x in re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*(0x[0-9a-f]+)",
                                                                       body)),
            "loop_bar_sync_per_tile": per_tile(r"\bBAR\.SYNC"),
            "loop_stg_per_tile": per_tile(r"\bSTG\."),
            "loop_ffma_per_tile": per_tile(r"\bFFMA\b"),
            "loop_fmnmx_per_tile": per_tile(r"\bFMNMX\b"),
            "loop_fmul_per_tile": per_tile(r"\bFMUL\b"),
            "loop_shfl_per_tile": per_tile(r"\bSHFL\."),
            "loop_sts_per_tile": per_tile(r"\bSTS\b"),
            "loop_tma_per_tile": per_tile(r"\bUTMALDG\b")}


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
    return _compile(_grouped_fp8_ws_kernel, types, constexprs, ("N", "K", "stride_se", "stride_sn", "stride_om"),
                    num_warps, maxnreg, f"{block_m}x{block_n} stages {num_stages} maxnreg {maxnreg} scatter {scatter}")


def compile_indexer_kernel(h: int, num_stages: int = 4, maxnreg: int = 168, modes: dict | None = None,
                           sass_path: str | None = None, cand: bool = False) -> dict:
    """The prefill indexer logits kernel (kernels/indexer/gluon.py) for H heads (BQ = 256 / H query rows a
    program); ``modes``: its diagnostic config keys (epilogue, mma, loads: "full" or "none"), all "full" if not
    given; ``cand``: its candidates form (the fused top-k's filter). Adds per key tile stats of the consumer loop
    (``loop_stats``)."""
    from indexcache.kernels.indexer.gluon import BKV, N_COLS, NUM_WARPS, _logits_ws_kernel, operand_layouts

    q_layout, k_layout = operand_layouts(N_COLS, BKV)
    types = {"q_desc": _desc_type("fp8e4nv", [N_COLS, 128], q_layout),
             "k_desc": _desc_type("fp8e4nv", [BKV, 128], k_layout),
             "w_ptr": "*fp32", "ks_ptr": "*fp32", "rs_ptr": "*i32", "re_ptr": "*i32", "out_ptr": "*fp32",
             "thr_ptr": "*fp32", "cnt_ptr": "*i32", "vals_ptr": "*fp32", "cols_ptr": "*i32"}
    modes = {"epilogue": "full", "mma": "full", "loads": "full", **(modes or {})}
    constexprs = {"H": h, "NUM_STAGES": num_stages, "num_warps": NUM_WARPS,
                  "EPILOGUE": modes["epilogue"] == "full", "MMA_ON": modes["mma"] == "full",
                  "LOADS": modes["loads"] == "full", "CAND": cand}
    off = "".join(f" {k} none" for k, v in modes.items() if v != "full")
    name = f"indexer{' candidates' if cand else ''} H {h} BQ {N_COLS // h} stages {num_stages} maxnreg {maxnreg}{off}"
    with tempfile.TemporaryDirectory() as d:
        path = sass_path or os.path.join(d, "k.sass")
        row = _compile(_logits_ws_kernel, types, constexprs, (), NUM_WARPS, maxnreg, name, sass_path=path)
        stats = loop_stats(open(path).read()) if os.path.exists(path) else {}
    return {"kernel": "indexer_logits", **row, **stats}


CONFIGS = [(64, 128, 4, 128, True), (128, 128, 4, 168, False)]
# the indexer's head counts (the models' 32 and 64) at its default config (gluon.config_for)
INDEXER_HEADS = (32, 64)
# the diagnostic modes the benchmark's --diagnose times
DIAGNOSTIC_MODES = [{}, {"epilogue": "none"}, {"mma": "none"}, {"epilogue": "none", "mma": "none"}]


def main() -> int:
    problem = toolchain_problem("sm90_compile_gluon")
    if problem:
        print(problem)
        return 2
    if "--indexer-diagnose" in sys.argv[1:]:
        sass_dir = sys.argv[sys.argv.index("--sass") + 1] if "--sass" in sys.argv else None
        for h in INDEXER_HEADS:
            for modes in DIAGNOSTIC_MODES:
                tag = "_".join(f"{k}-{v}" for k, v in modes.items()) or "full"
                path = os.path.join(sass_dir, f"indexer_h{h}_{tag}.sass") if sass_dir else None
                print(json.dumps(compile_indexer_kernel(h, modes=modes, sass_path=path)), flush=True)
        return 0
    if "--indexer" in sys.argv[1:]:
        for h in INDEXER_HEADS:
            for cand in (False, True):
                print(json.dumps(compile_indexer_kernel(h, cand=cand)), flush=True)
        return 0
    for cfg in CONFIGS:
        print(json.dumps(compile_down_kernel(*cfg)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

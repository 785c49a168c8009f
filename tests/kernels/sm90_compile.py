"""Compile Triton kernels for Hopper (sm_90a) on a machine without a GPU, and read what ptxas says.

    python -m tests.kernels.sm90_compile        # a table of the production kernels' registers, spills, wgmma
    python -m tests.kernels.sm90_compile --candidates   # the indexer candidates kernel and its append layout
    python -m tests.kernels.sm90_compile --topk-decode  # the decode top-k's three launches
    python -m tests.kernels.sm90_compile --rerank       # the re-rank candidate-scoring kernel
    python -m tests.kernels.sm90_compile --topk-prefill # the one-launch prefill top-k (fp32, bf16 logits)
    python -m tests.kernels.sm90_compile --topk-short   # topk_slots (a pool row in registers)
    python -m tests.kernels.sm90_compile --sparse-mla-fp8   # sparse MLA prefill from the FP8 latent cache
    python -m tests.kernels.sm90_compile --sparse-mla-gluon # its Gluon kernel (cp.async ring + wgmma), 20 heads
    python -m tests.kernels.sm90_compile --sparse-mla-gluon-all # ... at 16 and 20 heads, bf16 / fp16 / fp32 q

The interpreter runs our kernels on the CPU but says nothing about how they compile for the GPU: a kernel can
be exact in the interpreter and still fail to compile for sm_90, spill registers, or lose its cp.async
pipelining (the prefetched tiles then sit in registers). Triton compiles to PTX without a GPU and ships
ptxas, so this lowers a kernel as the launcher would (integer arguments that the launcher sees divisible by 16
marked so, as it specialises them) and reports ptxas's register and spill counts and the instructions that
matter here. Run it in a process without TRITON_INTERPRET=1 (the decorator then builds interpreter objects).
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def ptxas_path() -> str | None:
    import triton.backends.nvidia as nv

    path = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    return path if os.path.exists(path) else None


def compile_sm90(jit_fn, types: dict, constexprs: dict, *, num_warps: int, num_stages: int,
                 div16: tuple[str, ...] = (), ttgir: bool = False, maxnreg: int | None = None) -> dict:
    """Lower ``jit_fn`` for sm_90a. ``types``: Triton type per argument name ('*fp8e4nv', 'i32', ...; default
    'i32'); ``constexprs``: values of the constexpr arguments; ``div16``: argument names the launcher would see
    divisible by 16 (pointers are always added). Returns registers, spill bytes, instruction counts and the shared
    memory a program needs."""
    names = list(inspect.signature(jit_fn.fn).parameters)
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    marked = [n for n in names if sig[n].startswith("*") or n in div16]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in marked}
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:     # the launcher's register cap (ptx .maxnreg)
        options["maxnreg"] = maxnreg
    k = triton.compile(ASTSource(fn=jit_fn, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 64), options=options)
    ptx = k.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        r = subprocess.run([ptxas_path(), "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True,
                           text=True, check=True)
    finally:
        os.unlink(f.name)
    regs = re.findall(r"Used (\d+) registers", r.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", r.stderr)
    out = {"registers": int(regs[0]), "spill_bytes": int(spills[0]) if spills else 0,
           "wgmma": ptx.count("wgmma.mma_async"), "cp_async": len(re.findall(r"cp\.async\.c[ag]", ptx)),
           "shared_bytes": k.metadata.shared}
    if ttgir:
        out["ttgir"] = k.asm["ttgir"]
    return out


def production_kernels() -> list[tuple[str, dict]]:
    """The FP8 MoE prefill kernels at the configurations the model launches (glm-4.7-flash's experts: K 2048 for
    gate/up, 1536 for down), the expert plan at 64 and 256 experts, the prefill glue's norm and RoPE and the indexer's
    q quantisation."""
    from indexcache.kernels.expert_plan.triton import _plan_hist_kernel, _plan_scatter_kernel
    from indexcache.kernels.fp8_grouped_mm.triton import (_grouped_fp8_kernel, _grouped_fp8_swiglu_kernel, config_for,
                                                          swiglu_config_for)

    ptrs = {"a_ptr": "*fp8e4nv", "sa_ptr": "*fp32", "a_row_ptr": "*i32", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32",
            "out_ptr": "*bf16", "out_row_ptr": "*i32", "row_w_ptr": "*fp32", "tile_e_ptr": "*i32",
            "tile_row_ptr": "*i32", "row_end_ptr": "*i32", "h_ptr": "*fp8e4nv", "sh_ptr": "*fp32"}
    strides = ("stride_am", "stride_wn", "stride_we", "stride_om", "stride_hm", "N", "K", "I")
    out = []
    big = 8192 * 4  # pairs of an 8K-token chunk
    for m in (big, 512):
        cfg = dict(swiglu_config_for(m, 64))
        # x's scales come column-major from quantize_act (stride 1 along rows), h's scales row-major
        ce = {"stride_ak": 1, "stride_wk": 1, "stride_sam": 1, "stride_shb": 1, "BLOCK_M": cfg.pop("block_m"),
              "BLOCK_K": 128, "GROUP_M": 8, "GATHER_A": True, "DOT_F32": False, "TINY": 1e-12, "QMAX": 448.0}
        out.append((f"fp8_grouped_swiglu m={m}", compile_sm90(_grouped_fp8_swiglu_kernel, ptrs, ce, div16=strides,
                                                              **cfg)))
        cfg = dict(config_for(m, 64))
        ce = {"stride_ak": 1, "stride_wk": 1, "stride_on": 1, "stride_sak": 1, "BLOCK_M": cfg.pop("block_m"),
              "BLOCK_N": cfg.pop("block_n"), "BLOCK_K": 128, "GROUP_M": 8, "GATHER_A": False, "SCATTER_OUT": True,
              "DOT_F32": False}
        out.append((f"fp8_grouped_mm (down) m={m}", compile_sm90(_grouped_fp8_kernel, ptrs, ce, div16=strides,
                                                                 **cfg)))
    types = {"ids_ptr": "*i64", "w_ptr": "*fp32", "weight_ptr": "*fp32", "hist_ptr": "*i32", "counts_ptr": "*i32",
             "pair_ptr": "*i32", "token_ptr": "*i32", "end_ptr": "*i32", "te1_ptr": "*i32", "tr1_ptr": "*i32",
             "te2_ptr": "*i32", "tr2_ptr": "*i32"}
    for ep in (64, 256):
        chunk = max(16, min(512, 32768 // ep))
        out.append((f"expert plan hist E={ep}", compile_sm90(_plan_hist_kernel, types, {"EP": ep, "CHUNK": chunk},
                                                             num_warps=8, num_stages=1)))
        ce = {"EP": ep, "CHUNK": chunk, "B1": 128, "B2": 64, "TWO": True, "TCH": 128}
        out.append((f"expert plan scatter E={ep}", compile_sm90(_plan_scatter_kernel, types, ce, num_warps=8,
                                                                num_stages=1)))
    out += _prefill_glue_kernels()
    return out


def _prefill_glue_kernels() -> list[tuple[str, dict]]:
    """RMSNorm (glm-4.7-flash: the 2048-wide stream with its residual add, the 768-wide q_a norm), RoPE of the
    absorbed query (20 heads x 64) and the indexer's q quantisation (bf16 q, weights folded), as prefill launches
    them."""
    from indexcache.kernels.rms_norm.triton import _rms_norm_kernel
    from indexcache.kernels.rope.triton import _rope_kernel

    types = {"x_ptr": "*bf16", "r_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "s_ptr": "*bf16",
             "inv_d": "fp32", "eps": "fp32", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "o_ptr": "*bf16"}
    strides = ("stride_x", "stride_r", "stride_y", "stride_s", "D", "sx_t", "sx_h", "so_t", "so_h", "sc_t", "ss_t")
    out = []
    for d, res, bt in ((2048, True, 1), (768, False, 2)):
        ce = {"HAS_RESIDUAL": res, "BT": bt, "BLOCK_D": triton.next_power_of_2(d)}
        out.append((f"rms_norm d={d}{' +residual' if res else ''}",
                    compile_sm90(_rms_norm_kernel, types, ce, div16=strides, num_warps=4, num_stages=1)))
    ce = {"HALF": 32, "BT": 1, "BH": 32, "BP": 32, "INTERLEAVED": True}
    out.append(("rope 20 heads x 64", compile_sm90(_rope_kernel, types, ce, div16=strides, num_warps=4,
                                                   num_stages=1)))
    from indexcache.kernels.indexer.triton import QUANT_ROWS, _indexer_quantize_kernel

    types = {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp32", "w_ptr": "*bf16", "fold": "fp32"}
    ce = {"BR": QUANT_ROWS, "FOLD": True, "EMULATE": False}
    out.append(("indexer q quantise + fold", compile_sm90(_indexer_quantize_kernel, types, ce, div16=("stride_x",),
                                                          num_warps=4, num_stages=1)))
    return out


def append_owner_lanes_ok(ttgir: str) -> bool:
    """Whether the candidates kernel's inline-asm append sees its entries replicated exactly over lane bits 0-1:
    the layout of its operands must be a slice, over the reduced head axis, of a linear layout whose first two
    lane bases lie along that axis and whose other lane bases and warp bases do not (the asm lets the lane with
    (lane & 3) == 0 append, once per entry)."""
    m = re.search(r"tt\.elementwise_inline_asm \"[^\"]*atom\.relaxed[^\n]*?-> tensor<[^,]+, #ttg\.slice<\{dim = (\d+), "
                  r"parent = (#linear\d*)\}>>", ttgir)
    if not m:
        return False
    dim, name = int(m.group(1)), m.group(2)
    d = re.search(re.escape(name) + r" = #ttg\.linear<\{register = .*?, lane = (\[.*?\]\]), warp = (\[.*?\]\])",
                  ttgir)
    if not d:
        return False
    lanes = [[int(x) for x in b.split(",")] for b in re.findall(r"\[([\d, ]+)\]", d.group(1))]
    warps = [[int(x) for x in b.split(",")] for b in re.findall(r"\[([\d, ]+)\]", d.group(2))]
    along = [all(v == 0 for i, v in enumerate(b) if i != dim) for b in lanes]
    return len(lanes) == 5 and along[:2] == [True, True] and not any(along[2:]) and \
        not any(all(v == 0 for i, v in enumerate(b) if i != dim) for b in warps)


def candidates_kernels() -> list[tuple[str, dict]]:
    """The fused indexer candidates kernel with atomic slots at its default configs (H=32 and 64), with the
    check of ``append_owner_lanes_ok``."""
    from indexcache.kernels.indexer import triton as ixt

    types = {"q_ptr": "*fp8e4nv", "w_ptr": "*fp32", "k_ptr": "*fp8e4nv", "ks_ptr": "*fp32", "rs_ptr": "*i32",
             "re_ptr": "*i32", "thr_ptr": "*fp32", "cv_ptr": "*fp32", "cc_ptr": "*i32", "cnt_ptr": "*i32"}
    out = []
    for h in (32, 64):
        cfg = ixt.candidates_config(h)
        ce = {"H": h, "HP": h, "BQ": cfg["BQ"], "BKV": cfg["BKV"], "ASM": True}
        r = compile_sm90(ixt._prefill_candidates_atomic_kernel, types, ce, num_warps=cfg["num_warps"],
                         num_stages=cfg["num_stages"], ttgir=True)
        r["owner_lanes_ok"] = append_owner_lanes_ok(r.pop("ttgir"))
        out.append((f"indexer candidates atomic H={h}", r))
    return out


def topk_decode_kernels() -> list[tuple[str, dict]]:
    """The decode top-k's launches (``topk_rows_decode``, fp32 scores, int32 row ends) at their GPU constants."""
    from indexcache.kernels.topk import ops
    from indexcache.kernels.topk import triton as tk

    # no row starts: the launcher passes the logits in that slot (HAS_START False)
    types = {"x_ptr": "*fp32", "starts": "*fp32", "ends": "*i32", "hist": "*i32", "ctr": "*i64", "state": "*i32",
             "out": "*i32", "lists": "*i64"}
    win = {"BLOCK": ops._D_BLOCK, "NB1": ops._D_NB1, "HROW": ops._D_HROW, "HAS_START": False, "HAS_END": True}
    runs = [("dtopk hist", tk._dtopk_hist_kernel, win),
            ("dtopk filter1", tk._dtopk_filter1_kernel, {**win, "NB": ops._D_NB, "NREP": ops._D_NREP, "W": ops._D_W}),
            ("dtopk filter2_final", tk._dtopk_filter2_final_kernel,
             {"BLOCK": ops._D_BLOCK2, "TB": ops._D_TB, "TI": ops._D_TI, "FB": ops._D_FB, "NBIN": ops._D_NBIN})]
    return [(name, compile_sm90(fn, types, ce, num_warps=ops._D_WARPS, num_stages=1)) for name, fn, ce in runs]


def topk_prefill_kernels() -> list[tuple[str, dict]]:
    """The one-launch prefill top-k (``_topk1_kernel``) at its GPU constants and register cap, fp32 and bf16
    logits, and its two-output form (two row programs per SM need <= 128 registers)."""
    from indexcache.kernels.topk import ops
    from indexcache.kernels.topk import triton as tk

    out = []
    for dt, v, two in (("fp32", 4, False), ("bf16", 8, False), ("fp32", 4, True)):
        types = {"x_ptr": f"*{dt}", "starts": "*i32", "ends": "*i32", "ctr": "*i64", "out": "*i32", "scr": "*i64",
                 "out2": "*i32"}
        ce = dict(E=ops._ONE_BLOCK // (32 * ops._ONE_WARPS * v), T=32 * ops._ONE_WARPS, V=v, SB=ops._ONE_SB,
                  NTMAX=ops._ONE_NTMAX, FB=ops._ONE_FB, NBIN=ops._ONE_NBIN, ASM=True, TWO=two)
        name = f"topk prefill one-pass {dt}" + (" + pool (topk_and_pool_rows)" if two else "")
        out.append((name, compile_sm90(tk._topk1_kernel, types, ce, num_warps=ops._ONE_WARPS, num_stages=3,
                                       maxnreg=ops._ONE_MAXNREG)))
    return out


def topk_short_kernels(widths=(4096, 8192, 16384), configs: dict | None = None) -> list[tuple[str, dict]]:
    """``topk_slots``' kernel (a pool row in registers, fp32 logits; ties by pool entry and by tie id) at
    its GPU config for each pool width, or at ``configs`` (overrides of that config, e.g. num_warps) for each;
    widths and row strides divisible by 16, as the launcher specialises them."""
    from indexcache.kernels.candidate_topk import triton as ct

    types = {"x_ptr": "*fp32", "cand_ptr": "*i32", "tie_ptr": "*i32", "out_ptr": "*i32"}
    out = []
    for c in widths:
        for name, by_id in (("short", False), ("short by id", True)):   # ties by pool entry, by tie id (R layers)
            cfg = dict(ct.topk_slots_config(c, by_id), **(configs or {}))
            ce = {"W": ct._pow2(c), "LB": cfg["LB"], "PB": cfg["PB"], "ASM": cfg["ASM"], "BY_ID": by_id}
            out.append((f"topk {name} c={c} warps={cfg['num_warps']}",
                        compile_sm90(ct._topk_slots_kernel, types, ce, num_warps=cfg["num_warps"], num_stages=1,
                                     div16=("C", "sx", "sc", "st"))))
    return out


def rerank_kernels() -> list[tuple[str, dict]]:
    """The re-rank candidate-scoring kernel at its default config, H=32 and 64 (its gathers must stay cp.async
    copies feeding wgmma)."""
    from indexcache.kernels.candidate_topk import triton as ct

    types = {"q_ptr": "*fp8e4nv", "w_ptr": "*fp32", "kc8_ptr": "*fp8e4nv", "kcs_ptr": "*fp32", "cand_ptr": "*i32",
             "out_ptr": "*fp32"}
    cfg = ct.candidate_config()
    return [(f"rerank candidate logits H={h}",
             compile_sm90(ct._candidate_logits_kernel, types, {"H": h, "HP": h, "BC": cfg["BC"],
                                                               "STAGES": cfg["num_stages"]},
                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])) for h in (32, 64)]


def sparse_mla_fp8_kernels() -> list[tuple[str, dict]]:
    """The FP8-cache sparse MLA prefill at its default launches (20 heads: HB 32, 128 heads: HB 64), beside the
    bf16-cache kernel at 20 heads."""
    from indexcache.kernels.sparse_mla import ops
    from indexcache.kernels.sparse_mla import triton as tm

    types = {"q": "*bf16", "kv": "*bf16", "idx": "*i32", "out": "*bf16", "lse": "*fp32", "qk_scale": "fp32",
             "kv_u8": "*u8", "kv_f32": "*fp32", "kv_bf16": "*bf16"}
    div = ("sq_t", "sq_h", "skv", "si_t", "so_t", "so_h")
    runs = [("bf16 cache h=20", tm._sparse_mla_prefill_kernel, 32, ops.PREFILL_CFG_FEW_HEADS),
            ("fp8 cache h=20 (default)", tm._sparse_mla_prefill_fp8_kernel, 32, ops.PREFILL_FP8_CFG_FEW_HEADS),
            ("fp8 cache h=128 (default)", tm._sparse_mla_prefill_fp8_kernel, 64, ops.PREFILL_FP8_CFG)]
    return [(name, compile_sm90(fn, types, {"HB": hb, "BT": c["bt"], "UPCAST": False}, num_warps=c["num_warps"],
                                num_stages=c["num_stages"], div16=div)) for name, fn, hb, c in runs]


def sparse_mla_gluon_kernels(heads=(20,), dtypes=("bf16",), sass_dir: str | None = None) -> list[tuple[str, dict]]:
    """The Gluon FP8-cache sparse MLA prefill (kernels/sparse_mla/gluon.py) for each number of heads (20: the
    launch's HP 32, 16: HP 16) and q / out dtype (default: the 20-head bf16 launch): registers, spills, shared
    memory, wgmma count (serialised by ptxas or not), and from the machine code of its main loop (one tile a pass)
    the HGMMAs, cp.async copies (LDGSTS), CTA barriers and the cp.async waits (``DEPBAR.LE SB0, n``: n tiles stay
    in flight at the top of a tile, NUM_STAGES - 2: the stage that held P^T is refilled after its PV)."""
    import tempfile

    from tests.kernels.sm90_compile_gluon import _compile, _main_loop

    from indexcache.kernels.sparse_mla import gluon as sg

    out = []
    for h, dt in ((h, dt) for h in heads for dt in dtypes):
        types = {"q": f"*{dt}", "kv_u8": "*u8", "idx": "*i32", "out": f"*{dt}", "lse": "*fp32", "qk_scale": "fp32"}
        ce = {"HP": sg.heads_per_program(h), "NUM_STAGES": sg.NUM_STAGES, "num_warps": sg.NUM_WARPS}
        tag = f"h={h}{'' if dt == 'bf16' else ' ' + dt}"
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(sass_dir or d, f"sparse_mla_gluon_h{h}_{dt}.sass")
            r = _compile(sg._sparse_mla_prefill_fp8_gluon_kernel, types, ce, ("sq_t", "sq_h", "si_t", "so_t", "so_h"),
                         sg.NUM_WARPS, None, tag, sass_path=path)
            sass = open(path).read() if os.path.exists(path) else ""
        loop = _main_loop(sass)
        r.update(loop_hgmma=len(re.findall(r"\bHGMMA\.", loop)), loop_ldgsts=len(re.findall(r"\bLDGSTS\b", loop)),
                 loop_bar_sync=len(re.findall(r"\bBAR\.SYNC", loop)),
                 loop_cp_async_waits=sorted({int(x, 16) for x in re.findall(r"DEPBAR\.LE\s+SB0,\s*(0x[0-9a-f]+)",
                                                                             loop)}))
        out.append((f"sparse mla gluon {tag}", r))
    return out


def _gluon_columns(r: dict) -> str:
    return (f"  wgmma {r['wgmma']:2d}  smem {r['shared_bytes']:6d}  serialized {r['wgmma_serialized']}  loop: "
            f"HGMMA {r['loop_hgmma']}  LDGSTS {r['loop_ldgsts']}  BAR.SYNC {r['loop_bar_sync']}  cp.async waits "
            f"{r['loop_cp_async_waits']}")


def toolchain_problem(tool: str) -> str | None:
    """Why ``tool`` cannot compile for sm_90a here (None when it can)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return f"{tool}: unset TRITON_INTERPRET (the kernels would be built as interpreter objects)"
    if ptxas_path() is None:
        return f"{tool}: this Triton has no bundled ptxas"
    return None


def _mma_columns(r: dict) -> str:
    return f"  wgmma {r['wgmma']:2d}  cp.async {r['cp_async']:3d}"


# flag -> (the kernels it compiles, the columns printed after registers and spills)
_REPORTS = {
    "--rerank": (rerank_kernels, _mma_columns),
    "--candidates": (candidates_kernels, lambda r: f"  wgmma {r['wgmma']:2d}  owner lanes ok {r['owner_lanes_ok']}"),
    "--topk-prefill": (topk_prefill_kernels, lambda r: ""),
    "--topk-short": (topk_short_kernels, lambda r: ""),
    "--topk-decode": (topk_decode_kernels, lambda r: ""),
    "--sparse-mla-fp8": (sparse_mla_fp8_kernels, _mma_columns),
    "--sparse-mla-gluon": (sparse_mla_gluon_kernels, _gluon_columns),
    "--sparse-mla-gluon-all": (lambda: sparse_mla_gluon_kernels(heads=(16, 20), dtypes=("bf16", "fp16", "fp32")),
                               _gluon_columns),
}


def main() -> int:
    problem = toolchain_problem("sm90_compile")
    if problem:
        print(problem)
        return 2
    flag = next((a for a in sys.argv[1:] if a in _REPORTS), None)
    kernels, columns = _REPORTS[flag] if flag else (production_kernels, _mma_columns)
    print(f"triton {triton.__version__}", flush=True)
    for name, r in kernels():
        print(f"{name:36s} registers {r['registers']:3d}  spill bytes {r['spill_bytes']:4d}{columns(r)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

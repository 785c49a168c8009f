"""The Gluon prefill indexer logits kernel (kernels/indexer/gluon.py) and which kernel the prefill uses.

CPU: ``prefill_logits_kernel`` picks Gluon on Hopper (capability 9.x) for the head counts the kernel takes and
Triton elsewhere, and names bad input; the two-pass prefill passes its choice to ``indexer_logits``; the kernel
compiles for sm_90a on the installed Triton's Gluon front end and ptxas at 32 and 64 heads without spills, with
wgmma that ptxas does not serialise, two consumer partitions of one warpgroup (one m64n256 MMA group a key tile
each, waited for in full), a TMA producer warp, and a main loop without shared-memory stores (the head sum
stays in registers; at 32 heads without shuffles); its diagnostic modes drop exactly the MMA or the epilogue;
the launcher and ``indexer_logits(kernel=...)`` reject what they do not support with clear errors; the q-tile
permutation is a permutation of the rows.
GPU (``-m gpu``): against the PyTorch reference and the Triton kernel on fresh random inputs with ragged packed
windows (an empty row, a row clipped past S), T not a multiple of BQ, S not a multiple of the key tile, 16 to
128 heads, NaN-poisoned outputs (strided into a wider buffer whose other columns must stay untouched), windows
that leave -inf tiles on both sides, every window empty, int64 windows, rings that wrap many times; the two-pass
prefill on Hopper (Gluon logits) against the same path with Triton logits.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import indexcache.kernels.indexer.ops as ops
from indexcache.kernels.indexer import (indexer_logits, indexer_topk_prefill_two_pass, prefill_logits_kernel,
                                        quantize_indexer_k, quantize_indexer_q)
from indexcache.kernels.indexer.reference import indexer_logits_ref, topk_recall
from tests.helpers import poisoned

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _inputs(t, s, h, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q8, w = quantize_indexer_q(torch.randn(t, h, 128, generator=g).to(device),
                               torch.randn(t, h, generator=g).to(device))
    k8, ks = quantize_indexer_k((torch.randn(s, 128, generator=g) * 2).to(device))
    return q8, w, k8, ks


# ------------------------------------------------------------------------------------------------- dispatch (CPU)
@pytest.mark.parametrize("cap,h,want", [
    ((9, 0), 32, "gluon"), ((9, 0), 64, "gluon"), ((9, 0), 16, "gluon"), ((9, 0), 128, "gluon"),
    ((9, 1), 32, "gluon"),
    ((9, 0), 20, "triton"), ((9, 0), 48, "triton"), ((9, 0), 256, "triton"), ((9, 0), 1, "triton"),
    ((8, 0), 32, "triton"), ((8, 9), 64, "triton"), ((10, 0), 32, "triton"), ((12, 0), 64, "triton"),
    (None, 32, "triton"),
])
def test_prefill_logits_kernel_is_gluon_on_hopper_for_the_heads_it_takes(cap, h, want):
    assert prefill_logits_kernel(cap, h) == want


def test_prefill_logits_kernel_names_bad_input():
    with pytest.raises(ValueError, match="heads must be a positive int, got 0"):
        prefill_logits_kernel((9, 0), 0)
    with pytest.raises(ValueError, match="heads must be a positive int, got 32.0"):
        prefill_logits_kernel((9, 0), 32.0)
    with pytest.raises(ValueError, match="capability must be a \\(major, minor\\) pair of ints or None, got 9"):
        prefill_logits_kernel(9, 32)
    with pytest.raises(ValueError, match="got \\('9', '0'\\)"):
        prefill_logits_kernel(("9", "0"), 32)


def test_two_pass_prefill_passes_its_logits_kernel(monkeypatch):
    """The two-pass path hands ``indexer_logits`` its ``logits_kernel``, by default the device's choice (Triton
    for CPU tensors; the Hopper choice is covered above and on the GPU), and names a bad one."""
    seen = []
    real = ops.indexer_logits

    def spy(*a, kernel="triton", **kw):
        seen.append(kernel)
        return real(*a, **kw)  # the CPU path, whatever was asked

    monkeypatch.setattr(ops, "indexer_logits", spy)
    q8, w, k8, ks = _inputs(6, 40, 32, "cpu")
    rs, re = torch.zeros(6, dtype=torch.int32), torch.arange(35, 41, dtype=torch.int32)
    a = indexer_topk_prefill_two_pass(q8, w, k8, ks, rs, re, 8)
    assert seen and set(seen) == {"triton"}
    seen.clear()
    b = indexer_topk_prefill_two_pass(q8, w, k8, ks, rs, re, 8, logits_kernel="gluon")
    assert seen and set(seen) == {"gluon"} and torch.equal(a, b)
    with pytest.raises(ValueError, match="logits_kernel must be 'triton', 'gluon' or None, got 'cublas'"):
        indexer_topk_prefill_two_pass(q8, w, k8, ks, rs, re, 8, logits_kernel="cublas")


def test_indexer_logits_and_the_gluon_launcher_reject_what_they_do_not_support():
    from indexcache.kernels.indexer.gluon import indexer_logits_gluon

    q8, w, k8, ks = _inputs(4, 10, 32, "cpu")
    rs = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="kernel='gluon' needs CUDA tensors.*got cpu"):
        indexer_logits(q8, w, k8, ks, rs, rs + 10, kernel="gluon")
    with pytest.raises(ValueError, match="kernel must be 'triton' or 'gluon', got 'cutlass'"):
        indexer_logits(q8, w, k8, ks, rs, rs + 10, kernel="cutlass")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        indexer_logits_gluon(q8, w, k8, ks, rs, rs + 10)
    thr = torch.zeros(rs.shape[0])
    with pytest.raises(ValueError, match="indexer_candidates_gluon: needs CUDA tensors"):
        ops.indexer_prefill_candidates(q8, w, k8, ks, rs, rs + 10, thr, 8, kernel="gluon")
    with pytest.raises(ValueError, match="kernel must be 'triton' or 'gluon', got 'cutlass'"):
        ops.indexer_prefill_candidates(q8, w, k8, ks, rs, rs + 10, thr, 8, kernel="cutlass")
    with pytest.raises(ValueError, match="indexer_candidates_gluon: unknown config keys \\['BQ'\\]"):
        ops.indexer_prefill_candidates(q8, w, k8, ks, rs, rs + 10, thr, 8, kernel="gluon", config={"BQ": 4})
    with pytest.raises(ValueError, match="diagnostic modes are the logits form's only, got \\{'mma': 'none'\\}"):
        ops.indexer_prefill_candidates(q8, w, k8, ks, rs, rs + 10, thr, 8, kernel="gluon", config={"mma": "none"})
    with pytest.raises(ValueError, match="num_stages must be an int in \\[2, 8\\], got 9"):
        ops.indexer_prefill_candidates(q8, w, k8, ks, rs, rs + 10, thr, 8, kernel="gluon", config={"num_stages": 9})
    with pytest.raises(ValueError, match="candidates_kernel must be 'triton', 'gluon' or None, got 'x'"):
        ops.indexer_topk_prefill_fused(q8, w, k8, ks, rs, rs + 10, 4, candidates_kernel="x")
    with pytest.raises(ValueError, match="unknown config keys \\['BQ', 'schedule'\\]"):
        indexer_logits_gluon(q8, w, k8, ks, rs, rs + 10, config={"BQ": 8, "schedule": "pingpong"})
    with pytest.raises(ValueError, match="config mma must be one of \\['full', 'none'\\].*got 'off'"):
        indexer_logits_gluon(q8, w, k8, ks, rs, rs + 10, config={"mma": "off"})
    with pytest.raises(ValueError, match="num_stages must be an int in \\[2, 8\\], got 1"):
        indexer_logits_gluon(q8, w, k8, ks, rs, rs + 10, config={"num_stages": 1})
    with pytest.raises(ValueError, match="the append diagnostic is the candidates form's only, got append='none'"):
        indexer_logits_gluon(q8, w, k8, ks, rs, rs + 10, config={"append": "none"})
    with pytest.raises(ValueError, match="config append must be one of \\['full', 'none'\\].*got 'off'"):
        ops.indexer_prefill_candidates(q8, w, k8, ks, rs, rs + 10, thr, 8, kernel="gluon", config={"append": "off"})
    for h in (20, 256):
        qh, wh, _, _ = _inputs(4, 10, h, "cpu")
        with pytest.raises(ValueError, match=f"H must be a power of two in \\[16, 128\\].*got H={h}"):
            indexer_logits_gluon(qh, wh, k8, ks, rs, rs + 10)


@pytest.mark.parametrize("t,h", [(7, 32), (11, 64), (3, 16), (5, 128)])
def test_q_tiles_are_a_permutation_of_the_rows(t, h):
    """Tile b holds rows b*BQ.. of q (BQ = 256 / H) in two column groups of 128 rows (BQS = 128 / H query rows
    each); in group g row n = (j*BQS + q)*2 + e is q[b*BQ + g*BQS + q, 2j + e]; rows past T are zero."""
    from indexcache.kernels.indexer.gluon import N_COLS, _permute_q

    q8, _ = quantize_indexer_q(torch.randn(t, h, 128), torch.randn(t, h))
    bq = N_COLS // h
    got = _permute_q(q8, bq).view(torch.uint8).view(-1, N_COLS, 128)
    src = q8.view(torch.uint8)
    bqs = 128 // h
    assert got.shape[0] == -(-t // bq)
    for b in range(got.shape[0]):
        for n in range(N_COLS):
            g, c = divmod(n, bqs * h)
            e, q, j = c % 2, (c // 2) % bqs, c // (2 * bqs)
            row = b * bq + g * bqs + q
            want = src[row, 2 * j + e] if row < t else torch.zeros(128, dtype=torch.uint8)
            assert torch.equal(got[b, n], want), (b, n)


# ---------------------------------------------------------------------------------------------- sm_90a compile (CPU)
@pytest.fixture(scope="module")
def compiled():
    """One subprocess (no interpreter): the kernel at 32 and 64 heads as ``sm90_compile_gluon --indexer`` reports
    it (the logits form, then the candidates form, per head count), then the diagnostic modes epilogue none and
    mma none at 32 heads. Returned as the two logits rows, the two diagnostic rows, the two candidates rows."""
    from tests.kernels.sm90_compile import ptxas_path

    if ptxas_path() is None:
        pytest.skip("this Triton has no bundled ptxas")
    code = ("import json, sys\n"
            "from tests.kernels.sm90_compile_gluon import compile_indexer_kernel as c, main\n"
            "sys.argv[1:] = ['--indexer']\n"
            "assert main() == 0\n"
            "for m in ({'epilogue': 'none'}, {'mma': 'none'}): print(json.dumps(c(32, modes=m)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 6, r.stdout
    return [rows[0], rows[2], rows[4], rows[5], rows[1], rows[3]]


def test_gluon_indexer_kernel_compiles_for_sm90_as_a_pingpong(compiled):
    rows = compiled[:2]
    assert [r["config"].split(" BQ")[0] for r in rows] == ["indexer H 32", "indexer H 64"], rows
    for row in rows:
        assert row["spill_bytes"] == 0 and not row["wgmma_serialized"], row  # ptxas C7514: wgmmas one at a time
        assert row["wgmma"] == 8 and row["wait_groups"] == [0], row  # 4 k-steps of m64n256k32, 2 partitions
        assert row["setmaxnreg"] > 0 and row["tma_loads"] >= 2 and row["mbarrier_waits"] > 0, row
        assert row["total_warps"] == 12, row  # two consumer warpgroups and the producer warp (padded)
        if row["sass_gmma"] is not None:
            assert row["sass_gmma"] == 8 and row["loop_qgmma_per_tile"] == 4, row
            assert row["loop_sts_per_tile"] == 0, row  # no layout conversion through shared memory per tile
            assert row["loop_bar_sync_per_tile"] == 2, row  # partition barriers (128 threads), not the CTA's
            if "H 32 " in row["config"]:
                assert row["loop_shfl_per_tile"] == 0, row  # each thread holds all 32 heads of its query row


def test_gluon_candidates_form_compiles_as_the_same_pingpong(compiled):
    """The fused top-k's filter (``CAND``): the logits kernel's MMAs, waits and partitions, no spills, the logits
    stores replaced by the candidates' value and column stores."""
    for logits_row, row in zip(compiled[:2], compiled[4:]):
        assert "candidates" in row["config"], row
        assert row["spill_bytes"] == 0 and not row["wgmma_serialized"], row
        assert row["wgmma"] == 8 and row["wait_groups"] == [0] and row["total_warps"] == 12, row
        if row["sass_gmma"] is not None:
            assert row["loop_qgmma_per_tile"] == 4, row
            assert row["loop_ffma_per_tile"] == logits_row["loop_ffma_per_tile"], (row, logits_row)
            assert row["loop_stg_per_tile"] == 2 * logits_row["loop_stg_per_tile"], (row, logits_row)
        # the same arithmetic for every score (each FMA contraction rounding the same product): the fused top-k
        # selects exactly the two-pass path's sets only if the candidates' values are the logits' bits
        assert row["scores_in_ptx"] == logits_row["scores_in_ptx"] == 8, (row, logits_row)
        assert row["score_digest"] == logits_row["score_digest"], (row, logits_row)


def test_compile_checks_fill_in_the_kernels_constexpr_defaults():
    """A constexpr the compile check does not pass takes the kernel's default, as a launch does (left out, it was
    compiled as a runtime integer, both sides of every branch on it); one without a default is an error."""
    from indexcache.kernels.indexer.gluon import _logits_ws_kernel
    from tests.kernels.sm90_compile_gluon import constexprs_with_defaults

    given = {"H": 32, "NUM_STAGES": 4, "num_warps": 4, "CAND": True}
    full = constexprs_with_defaults(_logits_ws_kernel, given)
    assert full == {**given, "EPILOGUE": True, "MMA_ON": True, "LOADS": True, "APPEND": True}
    with pytest.raises(ValueError, match="NUM_STAGES"):
        constexprs_with_defaults(_logits_ws_kernel, {"H": 32, "num_warps": 4})


def test_score_expressions_tell_which_product_an_fma_rounds():
    """``score_expressions`` on hand-written PTX: a head sum whose first two products are contracted the other
    way round (fma(a, b, c*d) against fma(c, d, a*b)) is a different score; renamed registers are not."""
    from tests.kernels.sm90_compile_gluon import score_expressions

    def ptx(mul, fma, w0="%r10"):
        """relu-free head sum of two products (acc 0 times w0, acc 1 times w1) times a key scale"""
        prod = {"0": f"%r1, {w0}", "1": "%r2, %r11"}
        return "\n".join([
            "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%r1,%r2,%r3,%r4}, %rd1, %rd2, %p1, 1, 1;",
            f"@%p2 ld.global.b32 {{ {w0} }}, [ %rd3 + 0 ];", "@%p2 ld.global.b32 { %r11 }, [ %rd4 + 0 ];",
            "@%p2 ld.global.b32 { %r12 }, [ %rd5 + 0 ];",
            f"mul.f32 %r20, {prod[mul]};", f"fma.rn.f32 %r21, {prod[fma]}, %r20;", "mul.f32 %r22, %r21, %r12;"])

    a, b, renamed = ptx("1", "0"), ptx("0", "1"), ptx("1", "0", w0="%r13")
    assert len(score_expressions(a)) == 1
    assert score_expressions(a) == score_expressions(renamed)
    assert score_expressions(a) != score_expressions(b)


def test_gluon_indexer_diagnostic_modes_keep_or_drop_exactly_the_mma_or_the_epilogue(compiled):
    """The machine code behind benchmarks --diagnose: epilogue none keeps the 4 fp8 MMAs a tile and drops the
    relu / weight / head-sum arithmetic; mma none drops the MMAs and keeps that arithmetic instruction for
    instruction (relu's max against a loaded key scale, not against 0, so nothing folds)."""
    full, no_epi, no_mma = compiled[0], compiled[2], compiled[3]
    assert "epilogue none" in no_epi["config"] and "mma none" in no_mma["config"], (no_epi, no_mma)
    if full["sass_gmma"] is None:
        pytest.skip("this Triton has no bundled cuobjdump")
    for row in (full, no_epi, no_mma):
        assert row["spill_bytes"] == 0 and row["loop_stg_per_tile"] == full["loop_stg_per_tile"], row
    assert full["loop_qgmma_per_tile"] == no_epi["loop_qgmma_per_tile"] == 4, no_epi
    assert no_epi["loop_depbar_waits"] == full["loop_depbar_waits"], no_epi
    assert no_epi["loop_ffma_per_tile"] == 0 and no_epi["loop_fmnmx_per_tile"] == 0, no_epi
    assert no_mma["sass_gmma"] == 0 and no_mma["loop_depbar_waits"] == [], no_mma
    for op in ("loop_ffma_per_tile", "loop_fmnmx_per_tile"):
        assert no_mma[op] == full[op] > 0, (op, no_mma, full)


# ------------------------------------------------------------------------------------------------------- GPU
def _packed_windows(t, s, device, seed=0):
    """Rows of three packed sequences with causal windows, one empty row (rs == re), one row clipped past S."""
    g = torch.Generator().manual_seed(seed)
    lens = [s // 3, s // 3 + 5, s - 2 * (s // 3) - 5]
    starts = [0, lens[0], lens[0] + lens[1]]
    rs, re = [], []
    for i in range(t):
        j = i % 3
        rs.append(starts[j])
        re.append(starts[j] + int(torch.randint(0, lens[j], (1,), generator=g)) + 1)
    rs[1], re[1] = 7, 7
    re[min(2, t - 1)] = s + 40
    return (torch.tensor(rs, dtype=torch.int32, device=device), torch.tensor(re, dtype=torch.int32, device=device))


def _check(out, ref, tri=None):
    fin = torch.isfinite(ref)
    assert not out.isnan().any(), f"{int(out.isnan().sum())} logits never written"
    assert torch.equal(fin, torch.isfinite(out)), "-inf pattern differs from the reference"
    assert (out[~fin] == float("-inf")).all()
    if fin.any():
        scale = ref[fin].abs().max().clamp_min(1e-6)
        err = float((out[fin] - ref[fin]).abs().max() / scale)
        assert err < 1e-3, f"max error {err} of the largest |logit| (fp8 MMA bound 1e-3)"
        if tri is not None:  # the same fp8 MMAs, the heads summed in another order
            diff = float((out[fin] - tri[fin]).abs().max() / scale)
            assert diff < 1e-4, f"Gluon vs Triton {diff}"


# (T, S, H, config): T not a multiple of BQ, S not a multiple of the 64-key tile, 16 to 128 heads, rings of 2 to
# 6 stages; one key tile (the odd partition only fills -inf)
CASES = [
    (13, 203, 32, None),
    (7, 150, 64, None),
    (5, 40, 32, None),
    (21, 700, 16, None),
    (5, 333, 128, None),
    (30, 1000, 64, {"num_stages": 2}),
    (61, 3001, 32, {"num_stages": 6}),
    (61, 3001, 32, {"num_stages": 3}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("t,s,h,cfg", CASES)
def test_gluon_logits_match_reference_on_packed_windows(t, s, h, cfg):
    q8, w, k8, ks = _inputs(t, s, h, "cuda", seed=t + s + h)
    rs, re = _packed_windows(t, s, "cuda", seed=t)
    big = poisoned((t, s + 40), torch.float32, "cuda")
    out = big[:, 5:5 + s]  # row stride s + 40: the kernel writes exactly [T, S] and nothing else
    res = indexer_logits(q8, w, k8, ks, rs, re, out=out, config=cfg, kernel="gluon")
    torch.cuda.synchronize()
    assert res.data_ptr() == out.data_ptr()
    assert big[:, :5].isnan().all() and big[:, 5 + s:].isnan().all(), "wrote outside out"
    _check(out, indexer_logits_ref(q8, w, k8, ks, rs, re), indexer_logits(q8, w, k8, ks, rs, re))


@pytest.mark.gpu
@pytest.mark.parametrize("h", [32, 64])
def test_gluon_logits_causal_tail_with_left_and_right_inf_tiles(h):
    """The last rows of a causal prefill whose windows start late (whole -inf tiles on the left) and end before
    S (whole -inf tiles on the right), int64 windows; 700 rows: programs of many tiles, rings wrapping often."""
    t, s = 701, 8192 + 37
    q = torch.randn(t, h, 128, device="cuda", dtype=torch.bfloat16)
    q8, w = quantize_indexer_q(q, torch.randn(t, h, device="cuda"), hadamard=True)
    k8, ks = quantize_indexer_k(torch.randn(s, 128, device="cuda", dtype=torch.bfloat16), hadamard=True)
    re = torch.arange(s - t - 300, s - 300, dtype=torch.int64, device="cuda") + 1
    rs = 1000 + (torch.arange(t, device="cuda") * 3) % 500
    out = poisoned((t, s), torch.float32, "cuda")
    indexer_logits(q8, w, k8, ks, rs, re, out=out, kernel="gluon")
    ref = indexer_logits_ref(q8, w, k8, ks, rs, re)
    _check(out, ref, indexer_logits(q8, w, k8, ks, rs.int(), re.int()))
    fin = torch.isfinite(ref)
    err = (out[fin] - ref[fin]).norm() / ref[fin].norm()
    assert err < 1e-3, err


@pytest.mark.gpu
def test_gluon_logits_empty_windows_and_no_rows():
    t, s, h = 9, 300, 32
    q8, w, k8, ks = _inputs(t, s, h, "cuda", seed=5)
    rs = torch.full((t,), 100, dtype=torch.int32, device="cuda")
    out = poisoned((t, s), torch.float32, "cuda")
    indexer_logits(q8, w, k8, ks, rs, rs - 3, out=out, kernel="gluon")  # every window empty: no tile computed
    assert (out == float("-inf")).all()
    rs[4], re = 0, rs.clone()
    re[4] = s  # one full row among empty ones
    out = poisoned((t, s), torch.float32, "cuda")
    indexer_logits(q8, w, k8, ks, rs, re, out=out, kernel="gluon")
    _check(out, indexer_logits_ref(q8, w, k8, ks, rs, re))
    none = indexer_logits(q8[:0], w[:0], k8, ks, rs[:0], re[:0], kernel="gluon")
    assert none.shape == (0, s)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [{"epilogue": "none"}, {"mma": "none"}, {"loads": "none"},
                                 {"epilogue": "none", "mma": "none"}])
def test_gluon_diagnostic_modes_write_every_logit_with_the_window_pattern(cfg):
    """The timing diagnostics are not logits, but they run the same loops and stores: every logit written,
    finite exactly inside the windows."""
    t, s, h = 29, 1000, 32
    q8, w, k8, ks = _inputs(t, s, h, "cuda", seed=3)
    rs, re = _packed_windows(t, s, "cuda", seed=3)
    out = poisoned((t, s), torch.float32, "cuda")
    indexer_logits(q8, w, k8, ks, rs, re, out=out, config=cfg, kernel="gluon")
    ref = indexer_logits_ref(q8, w, k8, ks, rs, re)
    assert not out.isnan().any()
    assert torch.equal(torch.isfinite(ref), torch.isfinite(out))


@pytest.mark.gpu
def test_gluon_loads_none_is_exact_when_the_window_is_one_key_tile():
    """loads none runs every tile's MMA on key tile 0: with one tile that is the real computation."""
    t, s, h = 13, 60, 32
    q8, w, k8, ks = _inputs(t, s, h, "cuda", seed=4)
    rs, re = torch.zeros(t, dtype=torch.int32, device="cuda"), torch.full((t,), s, dtype=torch.int32, device="cuda")
    out = poisoned((t, s), torch.float32, "cuda")
    indexer_logits(q8, w, k8, ks, rs, re, out=out, config={"loads": "none"}, kernel="gluon")
    _check(out, indexer_logits_ref(q8, w, k8, ks, rs, re))


@pytest.mark.gpu
@pytest.mark.parametrize("h", [32, 64])
def test_gpu_two_pass_prefill_runs_gluon_on_hopper(h):
    """On Hopper the two-pass prefill scores with the Gluon kernel by default: its index sets are those of the
    same path with Triton logits (up to near-ties of the two kernels' head-sum order), in several chunks."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is Hopper's")
    assert prefill_logits_kernel(torch.cuda.get_device_capability(), h) == "gluon"
    t, s, topk = 1500, 7000, 2048
    q8, w, k8, ks = _inputs(t, s, h, "cuda", seed=h + 1)
    re = torch.arange(s - t + 1, s + 1, dtype=torch.int32, device="cuda")
    rs = (torch.arange(t, device="cuda", dtype=torch.int32) * 5) % 700
    out = poisoned((t, topk), torch.int32, "cuda")
    a = indexer_topk_prefill_two_pass(q8, w, k8, ks, rs, re, topk, workspace_bytes=16 << 20, out=out)
    b = indexer_topk_prefill_two_pass(q8, w, k8, ks, rs, re, topk, logits_kernel="triton")
    assert a.data_ptr() == out.data_ptr() and (a >= -1).all()
    assert topk_recall(a, b) > 0.999


@pytest.mark.gpu
@pytest.mark.parametrize("h", [32, 64])
def test_gluon_and_triton_logits_are_bit_reproducible(h):
    """Two calls on the same inputs give the same bits (H200 run 96 checked it once; the fused path's exactness
    against the two-pass path rests on it): long causal windows, ragged starts, all finite."""
    t, s = 1000, 20037
    q8, w, k8, ks = _inputs(t, s, h, "cuda", seed=h + 1)
    re = torch.arange(s - t + 1, s + 1, dtype=torch.int32, device="cuda")
    rs = (torch.arange(t, device="cuda", dtype=torch.int32) * 7) % 900
    for kernel in ("gluon", "triton"):
        a = indexer_logits(q8, w, k8, ks, rs, re, kernel=kernel)
        b = indexer_logits(q8, w, k8, ks, rs, re, kernel=kernel)
        assert torch.equal(a, b), kernel


# ------------------------------------------------------------------------------- the candidates form on the GPU
@pytest.mark.gpu
@pytest.mark.parametrize("h", [32, 64])
def test_gluon_candidates_match_the_reference_on_its_own_logits(h):
    """The fused top-k's filter as the Gluon kernel's epilogue: counts, and lists as sets, bit-identical values,
    against ``prefill_candidates_ref`` on the Gluon logits of the same inputs. Long causal windows, ragged
    starts, a NaN key scale (valid counts below the window length), overflowing rows, -inf thresholds,
    NaN-poisoned outputs."""
    from tests.kernels.test_indexer_candidates import _check_lists

    t, s, cap = 1000, 20000 + 37, 2048
    q8, w, k8, ks = _inputs(t, s, h, "cuda", seed=h + 1)
    ks = ks.clone()
    ks[12345] = float("nan")
    re = torch.arange(s - t + 1, s + 1, dtype=torch.int32, device="cuda")
    rs = (torch.arange(t, device="cuda", dtype=torch.int32) * 7) % 900
    logits = indexer_logits(q8, w, k8, ks, rs, re, kernel="gluon")
    thr = torch.where(torch.isfinite(logits), logits, float("nan")).nanquantile(0.95, dim=1)
    thr[:8] = float("-inf")  # overflowing rows: every valid score is a candidate
    out = (poisoned((t, cap), torch.float32, "cuda"), poisoned((t, cap), torch.int32, "cuda"),
           poisoned((t, 2), torch.int32, "cuda"))
    vals, cols, counts = ops.indexer_prefill_candidates(q8, w, k8, ks, rs, re, thr, cap, out=out, kernel="gluon")
    assert bool((counts[:8, 0] > cap).all()) and bool((counts[8:, 0] <= cap).all())
    assert bool((counts[:, 1] < (re - rs)).all())  # the NaN key is not a valid score
    _check_lists(vals, cols, counts, logits, thr, cap, poison=True)


@pytest.mark.gpu
@pytest.mark.parametrize("h", [32, 64])
def test_fused_topk_with_gluon_candidates_equals_the_two_pass_gluon_sets(h):
    """The fused prefill top-k with the Gluon filter selects exactly the two-pass path's sets over the Gluon
    logits (same scores bit for bit), rows with repeated keys (thousands of ties at the threshold: redone) and
    packed windows included."""
    from indexcache.kernels.indexer import indexer_topk_prefill_fused

    t, s, topk = 600, 30000, 2048
    q8, w, k8, ks = _inputs(t, s, h, "cuda", seed=h + 2)
    k8[1000:5000] = k8[3]
    ks[1000:5000] = ks[3]
    rs, re = _packed_windows(t, s, "cuda", seed=4)
    st = {}
    got = indexer_topk_prefill_fused(q8, w, k8, ks, rs, re, topk, candidates_kernel="gluon", stats=st)
    want = indexer_topk_prefill_two_pass(q8, w, k8, ks, rs, re, topk, logits_kernel="gluon")
    assert st["fallback_rows"] < t // 2, st["fallback_rows"]
    assert torch.equal(got.sort(1).values, want.sort(1).values)

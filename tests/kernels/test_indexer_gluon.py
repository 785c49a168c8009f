"""The Gluon prefill indexer logits kernel (kernels/indexer/gluon.py).

CPU: it compiles for sm_90a on the installed Triton's Gluon front end and ptxas at 32 and 64 heads (256 MMA
columns on two warpgroups) and at 128 columns on one, without
spills, with wgmma that ptxas does not serialise, a ``wgmma.wait_group 1`` (tile j's epilogue overlaps tile
j+1's MMA; in the machine code ``WARPGROUP.DEPBAR.LE gsb0, 0x1``), warp specialisation (TMA producer warp), and
a main loop without shared-memory stores (the head sum stays in registers; at 32 heads without shuffles);
its launcher and ``indexer_logits(kernel=...)`` reject what they do not support with clear errors; the q-tile
permutation is a permutation of the rows.
GPU (``-m gpu``): against the PyTorch reference and the Triton kernel on ragged packed windows with an empty
row and a row clipped past S, T not a multiple of BQ, S not a multiple of the key tile, 32 and 64 heads,
NaN-poisoned outputs (strided into a wider buffer whose other columns must stay untouched), windows that leave
-inf tiles on both sides, every window empty, int64 windows, rings that wrap many times, 64- and 128-key tiles.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from indexcache.kernels.indexer import indexer_logits, quantize_indexer_k, quantize_indexer_q
from indexcache.kernels.indexer.reference import indexer_logits_ref
from tests.helpers import poisoned

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gluon_indexer_kernel_compiles_for_sm90_with_overlapped_epilogue():
    from tests.kernels.sm90_compile import ptxas_path

    if ptxas_path() is None:
        pytest.skip("this Triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "tests.kernels.sm90_compile_gluon", "--indexer"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 3, r.stdout
    for row in rows:
        assert row["spill_bytes"] == 0, row
        assert row["wgmma"] >= 4, row  # 4 m64n128k32 instructions per 128-deep tile and issue site
        assert not row["wgmma_serialized"], row  # ptxas C7514: the wgmmas would run one at a time
        assert 1 in row["wait_groups"], row  # the next tile's MMA stays in flight during the epilogue
        assert row["setmaxnreg"] > 0 and row["tma_loads"] >= 2 and row["mbarrier_waits"] > 0, row
        assert row["shared_bytes"] <= 227 * 1024 // 2, row  # room for two CTAs an SM
        if row["sass_gmma"] is not None:
            assert row["sass_gmma"] >= 4 and row["sass_wait_1"] > 0, row
            assert row["sass_loop_sts"] == 0, row  # no layout conversion through shared memory per tile
            if "H 32 " in row["config"]:
                assert row["sass_loop_shfl"] == 0, row  # each thread holds all 32 heads of its query row


@pytest.mark.parametrize("t,h,bq", [(7, 32, 4), (11, 32, 8), (3, 64, 4)])
def test_q_tiles_are_a_permutation_of_the_rows(t, h, bq):
    """Tile b holds rows b*BQ.. of q in column groups of 128 rows (BQS = 128 / H query rows each); in group g
    row n = (j*BQS + q)*2 + e is q[b*BQ + g*BQS + q, 2j + e]; rows past T are zero."""
    from indexcache.kernels.indexer.gluon import _permute_q

    q8, _ = quantize_indexer_q(torch.randn(t, h, 128), torch.randn(t, h))
    n_cols = bq * h
    got = _permute_q(q8, bq).view(torch.uint8).view(-1, n_cols, 128)
    src = q8.view(torch.uint8)
    bqs = min(n_cols, 128) // h
    assert got.shape[0] == -(-t // bq)
    for b in range(got.shape[0]):
        for n in range(n_cols):
            g, c = divmod(n, bqs * h)
            e, q, j = c % 2, (c // 2) % bqs, c // (2 * bqs)
            row = b * bq + g * bqs + q
            want = src[row, 2 * j + e] if row < t else torch.zeros(128, dtype=torch.uint8)
            assert torch.equal(got[b, n], want), (b, n)


def test_gluon_launcher_rejects_what_it_does_not_support():
    from indexcache.kernels.indexer.gluon import indexer_logits_gluon

    q8, w, k8, ks = _inputs(4, 10, 32, "cpu")
    rs = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="kernel='gluon' needs CUDA tensors"):
        indexer_logits(q8, w, k8, ks, rs, rs + 10, kernel="gluon")
    with pytest.raises(ValueError, match="kernel must be 'triton' or 'gluon', got 'cutlass'"):
        indexer_logits(q8, w, k8, ks, rs, rs + 10, kernel="cutlass")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        indexer_logits_gluon(q8, w, k8, ks, rs, rs + 10)
    with pytest.raises(ValueError, match="unknown config keys \\['BKV'\\]"):
        indexer_logits_gluon(q8, w, k8, ks, rs, rs + 10, config={"BKV": 64})
    with pytest.raises(ValueError, match="num_warps must be 4 or 8"):
        indexer_logits_gluon(q8, w, k8, ks, rs, rs + 10, config={"num_warps": 2})
    with pytest.raises(ValueError, match="BQ\\*H in \\[64, 256\\].*H=32, BQ=16"):
        indexer_logits_gluon(q8, w, k8, ks, rs, rs + 10, config={"BQ": 16})
    with pytest.raises(ValueError, match="8 for BQ\\*H = 256; got 4"):
        indexer_logits_gluon(q8, w, k8, ks, rs, rs + 10, config={"num_warps": 4})
    q20, w20, _, _ = _inputs(4, 10, 20, "cpu")
    with pytest.raises(ValueError, match="H=20"):
        indexer_logits_gluon(q20, w20, k8, ks, rs, rs + 10)


# ------------------------------------------------------------------------------------------------------- GPU
def _inputs(t, s, h, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q8, w = quantize_indexer_q(torch.randn(t, h, 128, generator=g).to(device),
                               torch.randn(t, h, generator=g).to(device))
    k8, ks = quantize_indexer_k((torch.randn(s, 128, generator=g) * 2).to(device))
    return q8, w, k8, ks


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


# (T, S, H, config): T not a multiple of BQ, S not a multiple of 64 or 128, 32 and 64 heads; the default (256
# columns on two warpgroups, 64-key tiles), 128 columns on one warpgroup (64-key tiles, two CTAs an SM) or on
# two (128-key tiles), 64 columns; rings of 2 to 6 stages
ONE_WG = {"num_warps": 4, "maxnreg": 128}
CASES = [
    (13, 203, 32, None),
    (7, 150, 64, None),
    (13, 203, 32, {"BQ": 4, **ONE_WG}),
    (7, 150, 64, {"BQ": 2, **ONE_WG}),
    (29, 1000, 32, {"BQ": 4, "num_warps": 8, "evict_first": False}),
    (30, 1000, 64, {"num_stages": 2}),
    (61, 3001, 32, {"num_stages": 6}),
    (5, 4099, 64, {"BQ": 1, "num_stages": 3, **ONE_WG}),
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

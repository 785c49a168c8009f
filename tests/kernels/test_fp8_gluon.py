"""The Gluon grouped FP8 GEMM (kernels/fp8_grouped_mm/gluon.py).

CPU: it compiles for sm_90a on both the installed Triton's Gluon front end and ptxas, without spills, with
wgmma that ptxas does not serialise, a ``wgmma.wait_group 1`` (block k's promotion overlaps block k+1's MMA) and
warp specialisation (TMA producer warp); its launcher rejects what it does not support with clear errors.
GPU (``-m gpu``): against the PyTorch reference on ragged expert counts, empty experts (first, middle, last), N
and K tails, odd and even numbers of K blocks, rings that wrap many times, 64- and 128-row tiles, the scatter
with row weights, row- and column-major activation scales, NaN-poisoned outputs; and against the Triton kernel
at the model's down-projection shape through ``fp8_grouped_mm(..., gemm="gluon")``.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from indexcache.kernels.fp8_grouped_mm import fp8_grouped_mm, fp8_grouped_mm_reference
from indexcache.kernels.fp8_linear import quantize_act_reference, quantize_weight

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gluon_kernel_compiles_for_sm90_with_overlapped_promotion():
    from tests.kernels.sm90_compile import ptxas_path

    if ptxas_path() is None:
        pytest.skip("this Triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "tests.kernels.sm90_compile_gluon"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2, r.stdout
    for row in rows:
        assert row["spill_bytes"] == 0, row
        assert row["wgmma"] >= 4, row  # 4 m64nNk32 instructions per 128-deep K block and issue site
        assert not row["wgmma_serialized"], row  # ptxas C7514: the wgmmas would run one at a time
        assert 1 in row["wait_groups"], row  # the next block's MMA stays in flight during the promotion
        assert row["setmaxnreg"] > 0 and row["tma_loads"] >= 2 and row["mbarrier_waits"] > 0, row
        assert row["shared_bytes"] <= 227 * 1024, row
        if row["sass_gmma"] is not None:  # the machine code keeps the fp8 MMAs and the wait that leaves one running
            assert row["sass_gmma"] >= 4 and row["sass_wait_1"] > 0, row


def _weights(E, n, k, g, device):
    ws = [quantize_weight(torch.randn(n, k, generator=g, device=device) * torch.rand(1, k, generator=g, device=device)
                          / k ** 0.5) for _ in range(E)]
    return torch.stack([q for q, _ in ws]), torch.stack([s for _, s in ws])


def _inputs(counts, n, k, *, seed, device, col_major_scales=True):
    """Fresh random fp8 rows (quantised per 1x128 group; scales column-major as quantize_act gives them, or
    row-major as the gate/up kernel writes h's) and block-quantised expert weights."""
    g = torch.Generator(device).manual_seed(seed)
    m = sum(counts)
    a8, sa = quantize_act_reference(torch.randn(m, k, generator=g, device=device) * 3)
    if col_major_scales:
        sa = sa.t().contiguous().t()
    w, s = _weights(len(counts), n, k, g, device)
    return a8, sa, torch.tensor(counts, dtype=torch.int32, device=device), w, s


def _assert_within_fp8_bound(got, want, a8, sa, counts, w, s, *, bf16=False, out_rows=None, row_weight=None):
    """Every output written (no NaN left from the poisoned buffer) and within the bound of the fp8 tensor cores'
    reduced-precision accumulation inside each 128-deep block: 2^-10 of the same product on |a| and |W|
    (see test_fp8_grouped_mm), plus one bf16 rounding (2^-8 relative) for a bf16 output."""
    assert not got.isnan().any(), f"{int(got.isnan().sum())} outputs never written"
    mag = fp8_grouped_mm_reference(a8.float().abs().to(torch.float8_e4m3fn), counts, w.float().abs().to(w.dtype), s,
                                   sa, torch.float32, out_rows=out_rows,
                                   row_weight=None if row_weight is None else row_weight.abs())
    got, want = got.float(), want.float()
    tol = 2 ** -10 * mag + 1e-6 + (2 ** -8 * want.abs() if bf16 else 0)
    bad = (got - want).abs() > tol
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} outputs beyond the bound; max err "
                           f"{float((got - want).abs().max())}, first at {bad.nonzero()[0].tolist()}")


def _cfg(bm, bn=128, stages=4, maxnreg=128):
    return {"block_m": bm, "block_n": bn, "num_stages": stages, "maxnreg": maxnreg}


# (counts per expert, N, K, config): K blocks = ceil(K / 128): 3 (odd, tail of 80), 2, 1, 2 (tail of 32),
# 12 (the ring of 4 stages wraps 3 times), 13 with 3 stages (odd, wraps 4 times); N tails inside a column tile
# (200, 96, 1000) that read the next expert's weight rows; empty experts first, middle and last; tiles of 64 and
# 128 rows; more tiles than GROUP_M (8) so the grouped launch order wraps
CASES = [
    ([3, 0, 70, 1, 0, 129], 200, 336, _cfg(64)),
    ([0, 17, 0, 0, 2], 128, 256, _cfg(64)),
    ([1], 576, 128, _cfg(64)),
    ([40, 1, 0], 96, 160, _cfg(64, 64)),
    ([300, 5, 0, 260], 256, 1536, _cfg(128, maxnreg=168)),
    ([130, 0, 7, 600], 1000, 1664, _cfg(64, stages=3)),
    ([1000], 384, 512, _cfg(128, maxnreg=168)),  # one expert: the dense GEMM of a projection
]


@pytest.mark.gpu
@pytest.mark.parametrize("col_major", [True, False])
@pytest.mark.parametrize("counts,n,k,cfg", CASES)
def test_gluon_matches_reference(counts, n, k, cfg, col_major):
    from indexcache.kernels.fp8_grouped_mm.gluon import fp8_grouped_mm_gluon

    a8, sa, c, w, s = _inputs(counts, n, k, seed=n + k, device="cuda", col_major_scales=col_major)
    want = fp8_grouped_mm_reference(a8, c, w, s, sa, torch.float32)
    out = torch.full((a8.shape[0], n), float("nan"), device="cuda")
    got = fp8_grouped_mm_gluon(a8, c, w, s, sa, out=out, config=cfg)
    torch.cuda.synchronize()
    assert got.data_ptr() == out.data_ptr()
    _assert_within_fp8_bound(got, want, a8, sa, c, w, s)


@pytest.mark.gpu
@pytest.mark.parametrize("counts,n,k,cfg", [CASES[0], CASES[4], CASES[5]])
def test_gluon_scatter_with_row_weights(counts, n, k, cfg):
    """Sorted row r stored times row_weight[r] at out[out_rows[r]] (the down projection's pair order), bf16."""
    from indexcache.kernels.fp8_grouped_mm.gluon import fp8_grouped_mm_gluon

    a8, sa, c, w, s = _inputs(counts, n, k, seed=7 * n + k, device="cuda")
    g = torch.Generator("cuda").manual_seed(k)
    m = a8.shape[0]
    out_rows = torch.randperm(m, generator=g, device="cuda").to(torch.int32)
    rw = torch.rand(m, generator=g, device="cuda") + 0.1
    want = fp8_grouped_mm_reference(a8, c, w, s, sa, torch.float32, out_rows=out_rows, row_weight=rw)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    got = fp8_grouped_mm_gluon(a8, c, w, s, sa, out=out, config=cfg, out_rows=out_rows, row_weight=rw)
    _assert_within_fp8_bound(got, want, a8, sa, c, w, s, bf16=True, out_rows=out_rows, row_weight=rw)


@pytest.mark.gpu
def test_gluon_equals_triton_at_the_down_projection():
    """glm-4.7-flash's down projection (64 experts, K 1536 -> N 2048) on 2048 tokens x top-4 routed by
    expert_plan, through fp8_grouped_mm as moe.py calls it: Gluon and Triton run the same fp8 MMAs and promote
    per 128-deep block, so they agree far inside the fp8 bound; both are within it."""
    from indexcache.kernels.expert_plan import expert_plan
    from indexcache.kernels.fp8_grouped_mm import plan_block_sizes

    g = torch.Generator("cuda").manual_seed(0)
    tokens, top, E, n, k = 2048, 4, 64, 2048, 1536
    logits = torch.randn(tokens, E, generator=g, device="cuda")
    logits[:, 60:] -= 100  # four experts never chosen: empty groups at the end
    weights, ids = logits.softmax(-1).topk(top, dim=-1)
    plan = expert_plan(ids, weights, E, plan_block_sizes(tokens * top, E))
    h8, sh = quantize_act_reference(torch.randn(tokens * top, k, generator=g, device="cuda"))  # row-major, as h's
    w, s = _weights(E, n, k, g, "cuda")
    kw = dict(out_rows=plan.pair, row_weight=plan.weight, plan=plan)
    got = fp8_grouped_mm(h8, plan.counts, w, s, sh, torch.float32, gemm="gluon", **kw)
    tri = fp8_grouped_mm(h8, plan.counts, w, s, sh, torch.float32, **kw)
    want = fp8_grouped_mm_reference(h8, plan.counts, w, s, sh, torch.float32, out_rows=plan.pair,
                                    row_weight=plan.weight)
    _assert_within_fp8_bound(got, want, h8, sh, plan.counts, w, s, out_rows=plan.pair, row_weight=plan.weight)
    diff = float((got - tri).norm() / tri.norm())
    assert diff < 1e-4, f"Gluon vs Triton relative difference {diff}"


def test_gluon_launcher_rejects_what_it_does_not_support():
    from indexcache.kernels.fp8_grouped_mm.gluon import fp8_grouped_mm_gluon

    a8, sa, c, w, s = _inputs([2, 3], 256, 128, seed=1, device="cpu")
    with pytest.raises(ValueError, match="gemm='gluon' needs CUDA tensors"):
        fp8_grouped_mm(a8, c, w, s, sa, gemm="gluon")
    with pytest.raises(ValueError, match="gemm must be 'triton' or 'gluon', got 'cutlass'"):
        fp8_grouped_mm(a8, c, w, s, sa, gemm="cutlass")
    with pytest.raises(ValueError, match="a_rows"):
        fp8_grouped_mm_gluon(a8, c, w, s, sa, a_rows=torch.zeros(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="w must be a contiguous"):
        fp8_grouped_mm_gluon(a8, c, w[:, :128], s[:, :1], sa)
    with pytest.raises(ValueError, match="block_m and block_n must be 64 or 128, got 64, 256"):
        fp8_grouped_mm_gluon(a8, c, w, s, sa, config=_cfg(64, 256))
    a8k, sak, ck, wk, sk = _inputs([2, 3], 128, 200, seed=2, device="cpu")
    with pytest.raises(ValueError, match="K must be a multiple of 16"):
        fp8_grouped_mm_gluon(a8k, ck, wk, sk, sak)

"""The FP8 MoE prefill kernels, the expert plan, the prefill glue's norm and RoPE and the indexer q quantisation
compile for Hopper (sm_90a) without register spills, and the GEMMs keep their wgmma and cp.async pipelining:
checked on the CPU with Triton's compiler and bundled ptxas (tests/kernels/sm90_compile.py), in a subprocess
without the interpreter."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _compiled(*flags) -> tuple[list[str], str]:
    """``python -m tests.kernels.sm90_compile FLAGS`` without the interpreter: its "registers" lines and its
    stdout (skips where this Triton has no bundled ptxas)."""
    from tests.kernels.sm90_compile import ptxas_path

    if ptxas_path() is None:
        pytest.skip("this Triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "tests.kernels.sm90_compile", *flags], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return [line for line in r.stdout.splitlines() if "registers" in line], r.stdout


def test_production_kernels_compile_for_sm90_without_spills():
    lines, stdout = _compiled()
    assert len(lines) == 12, stdout
    for line in lines:
        assert "spill bytes    0" in line, line
        if "fp8_grouped" in line:  # tensor-core MMAs fed by asynchronous copies, not registers
            assert "wgmma  0" not in line and "cp.async   0" not in line, line


def test_indexer_candidates_kernel_compiles_and_append_sees_quad_replicas():
    """The fused candidates kernel (atomic slots) compiles without spills, and its inline-asm append gets its
    entries in the layout it assumes (replicated over lane bits 0-1 only): otherwise it would append an entry
    more than once or drop it."""
    lines, stdout = _compiled("--candidates")
    assert len(lines) == 2, stdout
    for line in lines:
        assert "spill bytes    0" in line and "owner lanes ok True" in line, line


def test_rerank_candidate_kernel_compiles_pipelined_without_spills():
    """The re-rank scoring kernel keeps its gathers as cp.async copies feeding wgmma, without spills."""
    lines, stdout = _compiled("--rerank")
    assert len(lines) == 2, stdout
    for line in lines:
        assert "spill bytes    0" in line and "wgmma  0" not in line and "cp.async   0" not in line, line


@pytest.mark.parametrize("flag,kernels", [
    ("--topk-decode", 3),   # the decode top-k's three launches (hist, filter1, filter2_final)
    ("--topk-prefill", 3),  # the one-pass prefill top-k, fp32 and bf16 rows, and its two-output form
    ("--topk-short", 6),    # topk_slots' kernel (a pool row in registers) at pools of 4096, 8192, 16384, 2 forms
])
def test_topk_kernels_compile_without_spills(flag, kernels):
    """The top-k kernels compile for sm_90a without spills; the one-pass prefill kernel within its 128-register
    cap (two row programs per SM), where Triton 3.6 spills at most 32 bytes (3.7 none)."""
    lines, stdout = _compiled(flag)
    assert len(lines) == kernels, stdout
    for line in lines:
        if flag == "--topk-prefill":
            regs, spill = (int(x) for x in re.findall(r"registers\s+(\d+)\s+spill bytes\s+(\d+)", line)[0])
            assert regs <= 128 and spill <= 32, line
        else:
            assert "spill bytes    0" in line, line

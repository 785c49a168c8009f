"""The interpreter's numpy XOR reduce (tests/interpreter_fastpaths.py) gives the bits of the interpreter's own
generic reduce, in real kernel launches, and tl.sort under the interpreter still sorts."""
import inspect

import pytest
import torch

from tests import interpreter_fastpaths

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _xor_kernel(x_ptr, y_ptr, A: tl.constexpr, B: tl.constexpr, AXIS: tl.constexpr, KEEP: tl.constexpr):
    offs = tl.arange(0, A)[:, None] * B + tl.arange(0, B)[None, :]
    r = tl.xor_sum(tl.load(x_ptr + offs), axis=AXIS, keep_dims=KEEP)
    if AXIS == 0:
        tl.store(y_ptr + tl.reshape(tl.arange(0, B), r.shape), r)
    else:
        tl.store(y_ptr + tl.reshape(tl.arange(0, A), r.shape), r)


@triton.jit
def _sort_kernel(x_ptr, y_ptr, N: tl.constexpr, DESC: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, tl.sort(tl.load(x_ptr + offs), descending=DESC))


@triton.jit
def _clamp_add(a, b, lo):
    return tl.maximum(a + b, lo)


@triton.jit
def _helpers_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(3):   # helper calls inside a launch: the lang is patched already
        acc = _clamp_add(acc, tl.math.exp(x) * i, -1.0)
    tl.store(y_ptr + offs, tl.where(m, acc, float("nan")), mask=m)


def _interpreting():
    from triton.runtime import interpreter
    if not torch.cuda.is_available() and interpreter_fastpaths.install():
        return interpreter
    pytest.skip("the fast path only exists under the CPU interpreter")


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
def test_xor_fast_path_equals_the_interpreters_generic_reduce(monkeypatch, axis, keep, dtype):
    interpreter = _interpreting()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256 if dtype == torch.uint8 else 2**31 - 1, (8, 16), generator=g).to(dtype)
    if dtype != torch.uint8:
        x[1::2] = -x[1::2]  # negatives: the sign bit takes part
    n = 16 if axis == 0 else 8
    fast = torch.full((n,), 77, dtype=dtype)
    _xor_kernel[(1,)](x, fast, A=8, B=16, AXIS=axis, KEEP=keep)
    monkeypatch.setattr(interpreter.ReduceOps, "apply_impl", interpreter.ReduceOps.apply_impl.slow)
    slow = torch.full((n,), 77, dtype=dtype)
    _xor_kernel[(1,)](x, slow, A=8, B=16, AXIS=axis, KEEP=keep)
    assert torch.equal(fast, slow)
    want = x[0] if axis == 0 else x[:, 0]
    for i in range(1, x.shape[axis]):
        want = want ^ (x[i] if axis == 0 else x[:, i])
    assert torch.equal(fast, want)


def test_tl_sort_under_the_interpreter():
    """A 256-entry tl.sort (the top-k sample kernel's size), ties and negatives included."""
    _interpreting()
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.int32, torch.float32):
        x = (torch.randn(256, generator=g) * 50).round().to(dtype)  # few distinct values: many ties
        for desc in (False, True):
            y = torch.full_like(x, -7777)
            _sort_kernel[(1,)](x, y, N=256, DESC=desc)
            assert torch.equal(y, x.sort(descending=desc).values), (dtype, desc)


def test_builtin_list_is_every_builtin_and_helpers_compute_the_same(monkeypatch):
    """The names listed at install cover every builtin getmembers finds now (no launch running), and a
    kernel calling jit helpers gives the same values with the interpreter's own patching."""
    interpreter = _interpreting()
    import triton.language as tl_mod
    n = 300   # masked tail: 3 programs of 128
    x = torch.randn(n, generator=torch.Generator().manual_seed(2))
    fast = torch.full((n,), -7777.0)
    _helpers_kernel[(3,)](x, fast, n, BLOCK=128)
    # every builtin still unwrapped now is listed (helpers from triton.language leave some wrapped after a launch)
    for pkg, names in interpreter._patch_builtin.names:
        now = {k for k, m in inspect.getmembers(pkg) if tl_mod.core.is_builtin(m)}
        assert names and now <= set(names), (pkg, now - set(names))
    assert {"load", "store", "where", "maximum"} <= set(dict(interpreter._patch_builtin.names)[tl_mod])
    monkeypatch.setattr(interpreter, "_patch_builtin", interpreter._patch_builtin.slow)
    slow = torch.full((n,), -7777.0)
    _helpers_kernel[(3,)](x, slow, n, BLOCK=128)
    assert torch.equal(fast, slow)
    assert torch.allclose(fast, (torch.exp(x) * 3).clamp(min=-1.0))

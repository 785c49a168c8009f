"""Two shortcuts for the Triton interpreter (CPU test runs only); kernels and what they compute are untouched.

* XOR reduce in numpy: ``tl.sort`` (the top-k sample kernel) calls ``xor_sum`` at every bitonic step; the
  interpreter has no fast path for it and runs its combine function once per element in Python (~16 ms per
  256-entry reduce). XOR is associative and commutative on integers, so ``np.bitwise_xor.reduce`` gives the same
  bits.
* Builtin lookup once: every launch and every call of a ``@triton.jit`` helper re-patches ``tl``, ``tl.core``,
  ``tl.tensor`` and ``tl.math`` through ``inspect.getmembers`` of each (a third of the top-k tests' time). The
  names of their builtins never change, so they are listed once here, before any launch; each patch still reads
  and wraps the current members exactly as the interpreter does.

``test_interpreter_fastpaths.py`` checks both against the interpreter's own paths.
"""
from __future__ import annotations

import inspect

import numpy as np


def install() -> bool:
    """Patch the interpreter once (call before any launch); False (nothing patched) when this Triton lacks the
    pieces."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    ops = getattr(interpreter, "ReduceOps", None)
    xor = getattr(getattr(tl, "standard", None), "_xor_combine", None)
    needed = (hasattr(ops, "generic_reduce"), xor is not None, hasattr(interpreter, "_patch_builtin"),
              hasattr(interpreter, "_patch_attr"), hasattr(tl.core, "is_builtin"))
    if not all(needed):
        return False
    if getattr(ops.apply_impl, "slow", None) is None:
        _fast_xor(ops, xor)
    if getattr(interpreter._patch_builtin, "slow", None) is None:
        _cached_builtins(interpreter, tl)
    return True


def _fast_xor(ops, xor):
    slow = ops.apply_impl

    def apply_impl(self, input):
        if self.combine_fn == xor and len(input) == 1 and np.issubdtype(input[0].handle.data.dtype, np.integer):
            data = input[0].handle.data
            if self.axis is None:   # as generic_reduce: all axes; keep_dims keeps each as size 1
                out = np.bitwise_xor.reduce(data, axis=None, keepdims=self.keep_dims)
                return self.to_tensor(out if self.keep_dims else out.item(), input[0].dtype)
            return self.to_tensor(np.bitwise_xor.reduce(data, axis=self.axis, keepdims=self.keep_dims),
                                  input[0].dtype)
        return slow(self, input)

    apply_impl.slow = slow   # the interpreter's own path (tests compare against it)
    ops.apply_impl = apply_impl


def _cached_builtins(interpreter, tl):
    slow = interpreter._patch_builtin
    pkgs = [tl, tl.core, tl.core.tensor, tl.math]
    if hasattr(tl.core, "tensor_descriptor_base"):
        pkgs.append(tl.core.tensor_descriptor_base)
    # listed while nothing is patched (no launch has run): every builtin name of each package
    names = {id(p): tuple(n for n, m in inspect.getmembers(p) if tl.core.is_builtin(m)) for p in pkgs}

    def patch_builtin(pkg, builder, scope):
        listed = names.get(id(pkg))
        if listed is None:
            return slow(pkg, builder, scope)
        for name in listed:
            member = getattr(pkg, name)
            if tl.core.is_builtin(member):   # not already wrapped by an enclosing launch
                interpreter._patch_attr(pkg, name, member, builder, scope)

    patch_builtin.slow, patch_builtin.names = slow, [(p, names[id(p)]) for p in pkgs]
    interpreter._patch_builtin = patch_builtin

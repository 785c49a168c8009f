"""The kernel folders share one layout (plus an optional Hopper gluon.py), and the imports among indexcache.kernels
modules have no cycle and never point up (to the model, engine, CLI or benchmarks). Static: reads the sources with
ast, imports nothing."""
import ast
from pathlib import Path

import indexcache.kernels

ROOT = Path(indexcache.kernels.__file__).parent
PKG = "indexcache.kernels"
OPS = ("indexer", "topk", "sparse_mla", "kv_store", "moe")


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join((PKG,) + parts)] = p
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of this package that ``path`` imports, at any depth (lazy imports inside functions count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(mods)
            out.update(subs if len(subs) == len(node.names) else {node.module} | subs)
    return out


def test_each_op_folder_has_the_same_four_files():
    """__init__, ops, reference and triton in every op folder, and optionally gluon.py (as fp8_grouped_mm has): a
    Gluon (Triton's explicit-layout dialect) kernel for Hopper beside the Triton one, behind the same dispatch in
    ops.py (Gluon has no CPU interpreter, so the Triton kernel stays: the CPU tests run it, other GPUs use it)."""
    for op in OPS:
        names = sorted(p.name for p in (ROOT / op).glob("*.py") if p.name != "gluon.py")
        assert names == ["__init__.py", "ops.py", "reference.py", "triton.py"], (op, names)


def test_op_init_only_reexports():
    for op in OPS:
        tree = ast.parse((ROOT / op / "__init__.py").read_text())
        for i, node in enumerate(tree.body):
            doc = i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            all_ = isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]
            assert doc or all_ or isinstance(node, (ast.Import, ast.ImportFrom)), (op, ast.dump(node)[:120])


def test_no_import_cycle_and_no_upward_import():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = _imports(path, mods)
        up = sorted(d for d in deps if d.startswith(("indexcache.", "benchmarks")) and not d.startswith(PKG))
        assert not up, (name, up)
        graph[name] = sorted(d for d in deps if d in mods and d != name)
    state = {}

    def visit(n, stack):
        state[n] = "open"
        for d in graph[n]:
            assert state.get(d) != "open", f"import cycle: {' -> '.join(stack[stack.index(d):] + [d])}"
            if d not in state:
                visit(d, stack + [d])
        state[n] = "done"

    for n in graph:
        if n not in state:
            visit(n, [n])

"""The import graph of indexcache/, read with ast (nothing is imported): no cycles, and no arrow that points up the
layers kernels <- model <- engine <- API (llm) / CLI / server, with offline tools beside the engine."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "indexcache"

# package -> top-level names under indexcache (or outside it) that it must never import
FORBIDDEN = {
    "kernels": {"model", "engine", "llm", "cli", "tools", "server"},
    "model": {"engine", "llm", "cli", "tools", "server"},
    "engine": {"llm", "cli", "tools", "server", "benchmarks"},
    "distributed": {"engine", "llm", "cli", "tools", "server", "benchmarks"},  # a model-level transform
    "tools": {"engine", "llm", "server", "benchmarks"},  # offline tools use the model and kernels
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules (of indexcache, or 'benchmarks...') that ``name`` imports anywhere in its file, lazily or not."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t.startswith("benchmarks"):
                out.add(t)
            while t and t not in known:  # `import indexcache.x.y` names a module; attributes fall back to it
                t = t.rpartition(".")[0]
            if t.startswith("indexcache") and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if parts[0] == "indexcache" and len(parts) > 1 else parts[0]


def test_graph_is_read():
    g = _graph()
    assert "indexcache.engine.runner" in g["indexcache.engine.engine"]
    assert "indexcache.kernels.indexer" in g["indexcache.engine.attention_backend"]
    assert "indexcache.model" in g["indexcache.engine.runner"]


def test_no_upward_imports():
    bad = []
    for mod, deps in sorted(_graph().items()):
        forbidden = FORBIDDEN.get(_layer(mod), set())
        bad += [f"{mod} -> {d}" for d in sorted(deps) if _layer(d) in forbidden]
    assert not bad, "imports that point up the layers:\n  " + "\n  ".join(bad)


def test_no_import_cycles():
    g = _graph()
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)

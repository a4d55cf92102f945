"""The package's shape (DESIGN.md, issue 13): every import points down the layers, no two modules import
each other, no module imports another's private name, and modules and functions stay short.

Imports are read from the source with `ast` (those inside functions included), so the check needs no
import of torch and sees the lazy imports that keep `--help` fast.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "facemeta"

# Layers from the top (DESIGN.md); a module may import its own package, any lower layer, and another
# package of its own layer as long as that one does not import it back.
LAYERS = {
    "cli": 1, "__main__": 1, "commands": 1, "serve": 1,
    "experiments": 2,
    "train": 3, "recognizer": 3, "recognizer_domains": 3, "embedder": 3, "model_files": 3,
    "eval": 4,
    "align": 5, "objectives": 5, "meta": 5, "models": 5, "data": 5, "gallery": 5,
    "images": 6, "errors": 6, "atomic": 6, "checks": 6, "paths": 6, "version": 6, "registry": 6,
}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[tuple[str, str | None]]]:
    """module -> {(imported module, imported name or None)} for every facemeta import in its source."""
    edges: dict[str, set[tuple[str, str | None]]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "facemeta":
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    edges[name].add((full, None) if full in modules else (node.module, alias.name))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "facemeta":
                        edges[name].add((alias.name, None))
    return edges


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


MODULES = _modules()
EDGES = _imports(MODULES)


def test_every_package_has_a_layer():
    assert {_top(m) for m in MODULES if _top(m)} <= set(LAYERS), set(map(_top, MODULES)) - set(LAYERS)


def test_imports_point_down():
    wrong = []
    for module, targets in EDGES.items():
        a = _top(module)
        for target, _ in targets:
            b = _top(target)
            if not a or a == b:
                continue
            if b == "":  # the package root re-exports the top layers: nothing inside may import it
                wrong.append(f"{module} -> facemeta")
            elif LAYERS[b] < LAYERS[a]:  # within a layer, one way only (test_no_import_cycles)
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that do not point down:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = {m: {t for t, _ in targets if t in MODULES} for m, targets in EDGES.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
    packages = defaultdict(set)
    for m, targets in graph.items():
        for t in targets:
            if _top(m) != _top(t):
                packages[_top(m)].add(_top(t))
    mutual = sorted({tuple(sorted((a, b))) for a in packages for b in packages[a] if a in packages.get(b, ())})
    assert not mutual, f"packages that import each other: {mutual}"


def test_no_private_name_crosses_modules():
    crossing = [f"{module} imports {target}.{name}" for module, targets in EDGES.items()
                for target, name in targets
                if name and name.startswith("_") and not name.startswith("__") and target != module]
    crossing += [f"{module} imports {target}" for module, targets in EDGES.items()
                 for target, _ in targets if target.rsplit(".", 1)[-1].startswith("_") and target in MODULES
                 and not target.endswith("__main__")]
    assert not crossing, crossing


def _long_ones() -> list[str]:
    found = []
    for name, path in MODULES.items():
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        doc = ast.get_docstring(tree) or ""
        if len(source.splitlines()) > MAX_MODULE_LINES and "must be longer" not in doc:
            found.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and "must be longer" not in (ast.get_docstring(node) or ""):
                    found.append(f"{name}.{node.name}: {length} lines")
    return found


def test_modules_and_functions_are_short():
    long = _long_ones()
    assert not long, f"over {MAX_MODULE_LINES} lines a module or {MAX_FUNCTION_LINES} a function " \
                     f"(or say why in its docstring: 'must be longer'): {long}"


@pytest.mark.parametrize("tool", sorted(p.name for p in (PACKAGE.parent / "tools").glob("*.py")))
def test_tools_use_the_public_api(tool):
    tree = ast.parse((PACKAGE.parent / "tools" / tool).read_text(encoding="utf-8"))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("facemeta"):
            if node.module.startswith("facemeta.commands") or any(a.name.startswith("_") for a in node.names):
                bad.append(f"from {node.module} import {', '.join(a.name for a in node.names)}")
    assert not bad, bad

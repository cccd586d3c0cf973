"""The package layering stays true: leaf libraries import downward only, and no two files import each other.

Layers (a module may import only from its own layer's package or the layers listed for it)::

    atv.cli                    the command line (builds every parser)
    atv.experiments            jobs, studies, demo, result log
    atv.suite, atv.default_model   the embedded default model and its offline suite
    mot_probe  evaluation  analysis   leaf libraries
    pruning                    the lowest leaf

Every import counts, including those inside functions (lazy imports are still dependencies).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pruning", "mot_probe", "evaluation", "analysis", "atv")

# unit -> the units it may import (besides itself)
ALLOWED = {
    "pruning": set(),
    "mot_probe": {"pruning"},
    "evaluation": {"pruning"},
    "analysis": {"pruning"},
    "atv.assets": {"pruning", "evaluation"},
    "atv.experiments": {"pruning", "mot_probe", "evaluation", "analysis", "atv.assets"},
    "atv.cli": {"pruning", "mot_probe", "evaluation", "analysis", "atv.assets", "atv.experiments"},
}


def _unit(module: str) -> str:
    """The layer a dotted module name belongs to."""
    parts = module.split(".")
    if parts[0] != "atv":
        return parts[0]
    if len(parts) == 1 or parts[1] == "cli":
        return "atv.cli"
    return "atv.experiments" if parts[1] == "experiments" else "atv.assets"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Dotted names of the project modules ``path`` imports (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            while imported and imported not in modules:  # `from pkg import name` -> pkg
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def test_imports_point_down_only():
    upward = sorted(f"{src} imports {dst}" for src, dsts in _graph().items() for dst in dsts
                    if _unit(dst) != _unit(src) and _unit(dst) not in ALLOWED[_unit(src)])
    assert upward == []


def test_no_import_cycle_between_files():
    graph = _graph()
    # a package's __init__ re-exporting its own modules is not a cycle of logic: ignore init -> own child
    edges = {src: {d for d in dsts if not (src + ".").startswith(d + ".") or d == src} for src, dsts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert cycles == []


@pytest.mark.parametrize("module, imported, expected", [
    ("pruning.engine", "analysis.tables", False),
    ("evaluation.harness", "mot_probe.surgery", False),
    ("analysis.drift", "evaluation.harness", False),
    ("atv.experiments.demo", "atv.suite", True),
    ("atv.suite", "atv.experiments.records", False),
])
def test_the_rule_itself_can_fail(module, imported, expected):
    """The checker above would catch each of these upward imports (so an empty list means something)."""
    assert (_unit(imported) == _unit(module) or _unit(imported) in ALLOWED[_unit(module)]) is expected

"""Every third-party package the code imports is declared in pyproject.toml: what a library module imports at
its top level in the core dependencies (importing the module needs it), everything else (lazy imports, tests,
benchmarks, scripts) in the core dependencies or an extra. A package that is present only because another one
pulls it (pyyaml through transformers, threadpoolctl through scikit-learn) breaks the day that one drops it."""

import ast
import functools
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("mot_probe", "pruning", "analysis", "evaluation", "atv")
OTHERS = ("tests", "benchmarks", "scripts")
# import name -> distribution name, for packages that need not be installed for this test to know them
KNOWN = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "lmms_eval": "lmms-eval"}
# peers a benchmark compares against, installed in their own environment and never declared: distribution ->
# the only folder allowed to import them
PEERS = {"llmcompressor": "benchmarks"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _normal(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec).group(1))


def declared() -> tuple[set[str], set[str]]:
    """(core dependencies, every declared distribution: core and all extras), normalised names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {_requirement_name(s) for s in project["dependencies"]}
    extras = {_requirement_name(s) for specs in project.get("optional-dependencies", {}).values() for s in specs}
    return core, core | extras


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(top-level names imported in the module body, top-level names imported anywhere) of one file; the names
    given to ``pytest.importorskip("...")`` count as imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def names(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name.split(".")[0] for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            return [node.module.split(".")[0]]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip"
                and node.args and isinstance(node.args[0], ast.Constant)):
            return [str(node.args[0].value).split(".")[0]]
        return []

    body = {n for stmt in tree.body if isinstance(stmt, (ast.Import, ast.ImportFrom)) for n in names(stmt)}
    anywhere = {n for node in ast.walk(tree) for n in names(node)}
    return body, anywhere


@functools.lru_cache(maxsize=1)
def _first_party() -> set[str]:
    local = {p.stem for folder in OTHERS for p in (ROOT / folder).glob("*.py")}
    return set(LIBRARIES) | local


def distribution(module: str) -> str:
    """The distribution a top-level import name comes from (installed metadata, else the table, else itself)."""
    if module in KNOWN:
        return _normal(KNOWN[module])
    found = _installed().get(module)
    return _normal(found[0] if found else module)


@functools.lru_cache(maxsize=1)
def _installed() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def third_party(names: set[str]) -> set[str]:
    return {n for n in names if n not in sys.stdlib_module_names and n not in _first_party() and n != "__future__"}


def undeclared() -> tuple[dict[str, str], dict[str, str]]:
    """(module-level imports of library files not in the core dependencies, imports declared nowhere):
    distribution -> one file that imports it."""
    core, everything = declared()
    not_core, nowhere = {}, {}
    for folder in LIBRARIES + OTHERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            body, anywhere = imports(path)
            where = str(path.relative_to(ROOT))
            for dist in map(distribution, third_party(anywhere)):
                if PEERS.get(dist) == folder:
                    continue
                if dist not in everything:
                    nowhere.setdefault(dist, where)
            if folder in LIBRARIES:
                for dist in map(distribution, third_party(body)):
                    if dist not in core:
                        not_core.setdefault(dist, where)
    return not_core, nowhere


def test_every_imported_package_is_declared():
    not_core, nowhere = undeclared()
    assert not nowhere, f"imported but not declared in pyproject.toml (add them to dependencies or an extra): {nowhere}"
    assert not not_core, f"imported at module level by the library but only in an extra (import lazily or make " \
                         f"them core dependencies): {not_core}"


def test_peers_stay_out_of_the_dependencies():
    """A peer compared in a benchmark is never a dependency or an extra of the toolkit."""
    _, everything = declared()
    assert not set(PEERS) & everything


def test_the_check_finds_an_undeclared_import(tmp_path):
    """The scan itself: an import of a package pyproject does not name, in the body or inside a function, and a
    string given to importorskip, are all found; the standard library and the project's own packages are not."""
    module = tmp_path / "m.py"
    module.write_text("import os\nfrom pruning import config\nimport yaml\n\n"
                      "def f():\n    import some_undeclared_pkg\n    pytest.importorskip('another_one.sub')\n")
    body, anywhere = imports(module)
    assert third_party(body) == {"yaml"}
    assert third_party(anywhere) == {"yaml", "some_undeclared_pkg", "another_one"}
    _, everything = declared()
    assert distribution("yaml") in everything  # pyyaml is declared
    assert distribution("some_undeclared_pkg") not in everything

"""The API reference is complete: every public function and class it documents has an ``Args:`` section naming
each of its parameters, and a ``Returns:`` section when it returns something (Google style, parsed by griffe as
mkdocstrings parses it for the site).

The documented objects are what the packages export (``__all__`` of ``pruning``, ``mot_probe``,
``evaluation``: a new export is checked without editing this file) plus the objects the reference pages name
with ``::: module.name``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

griffe = pytest.importorskip("griffe", reason="griffe comes with the docs extra (pip install -e '.[docs]')")

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pruning", "mot_probe", "evaluation", "analysis", "atv")
# Being restructured on other branches (per-method configs in pruning/config.py; the probe adapter in
# mot_probe/surgery.py): their sections are written after that merge, then these names leave this set.
PENDING: set[str] = set()


def _load():
    loader = griffe.GriffeLoader(docstring_parser=griffe.Parser.google, search_paths=[str(ROOT)])
    modules = {name: loader.load(name) for name in PACKAGES}
    loader.resolve_aliases(implicit=False, external=False)
    return modules


MODULES = _load()


def documented() -> list[str]:
    names = [f"{package}.{name}" for package in ("pruning", "mot_probe", "evaluation")
             for name in (MODULES[package].exports or [])]
    for page in sorted((ROOT / "docs" / "reference").glob("*.md")):
        for target in re.findall(r"^::: (\S+)$", page.read_text(encoding="utf-8"), re.MULTILINE):
            if target.count(".") and target not in PACKAGES:
                names.append(target)
    return sorted(set(names))


def resolve(path: str):
    package, _, rest = path.partition(".")
    obj = MODULES[package]
    for part in rest.split("."):
        obj = obj[part]
    return obj.final_target if obj.is_alias else obj


def sections(obj) -> dict[str, list]:
    found: dict[str, list] = {}
    for section in (obj.docstring.parsed if obj.docstring else []):
        found.setdefault(section.kind.value, []).extend(section.value if isinstance(section.value, list) else
                                                        [section.value])
    return found


def parameters(obj) -> list[str]:
    """The parameters a caller passes (a method's self or cls, *args and **kwargs aside); a class's are its
    __init__'s (a dataclass's fields included)."""
    method = obj.is_class or obj.parent.is_class
    return [p.name for p in obj.parameters if not (method and p.name in ("self", "cls")) and p.kind.value not in
            ("variadic positional", "variadic keyword")]


CHECKED = [name for name in documented() if name not in PENDING]


def test_the_reference_documents_the_exports():
    assert {"pruning.prune_", "pruning.compute_masks", "evaluation.evaluate", "mot_probe.RoutedLinear"} <= set(CHECKED)
    assert len(CHECKED) > 40


@pytest.mark.parametrize("name", CHECKED)
def test_public_object_has_parameter_sections(name):
    obj = resolve(name)
    if not (obj.is_function or obj.is_class):
        return  # constants: their description is the docstring (or the comment) they have
    assert obj.docstring is not None, f"{name} has no docstring"
    found = sections(obj)
    params = parameters(obj)
    if params:
        named = {p.name for p in found.get("parameters", [])}
        if obj.is_class:  # a subclass documents its own fields; the inherited ones are in its bases' Args
            named |= {p.name for base in obj.mro() for p in sections(base).get("parameters", [])}
        missing = [p for p in params if p not in named]
        assert not missing, f"{name}: Args: section lacks {missing}"
    if obj.is_function:
        returns = obj.returns
        if returns is not None and str(returns) not in ("None", "NoReturn"):
            assert "returns" in found or "yields" in found, f"{name}: no Returns: section"


def test_pending_names_still_exist():
    """Once the restructuring lands, a name that left the exports leaves PENDING too."""
    for name in PENDING:
        package, _, attr = name.partition(".")
        assert attr in (MODULES[package].exports or []), f"{name} is no longer exported: drop it from PENDING"

"""Who may import whom: the layout's dependency rules, checked on every import of every ``.py``.

Files are parsed, not imported; an import inside a function counts like one at the top. ``model.grid``
(the isotropic grid) and ``model.units`` (constants) import nothing of ours and are shared as below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("model", "dicomnode", "upete", "benchmarks", "tests")
LEAVES = ("model.grid", "model.units")
RULES = {  # importer: the modules of model it may import
    "model.networks": ("model.networks",),
    "model.physics": ("model.physics", "model.units"),
    "model.simulation": ("model.simulation", "model.physics", *LEAVES),
    "model.enhancers": ("model.enhancers", "model.networks", "model.physics", *LEAVES),
    "model.training": ("model.training", "model.networks", "model.physics", "model.simulation", *LEAVES),
    "model.enhance": ("model.enhance", "model.enhancers"),
    "model.evaluation": ("model",),
    **{leaf: (leaf,) for leaf in LEAVES},
}


def imports(source: str, package: list[str]) -> set[str]:
    """Every module ``source`` (a module of ``package``) imports, relative imports resolved."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) + 1 - node.level] if node.level else []
            module = ".".join([*base, *filter(None, [node.module])])
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return found


def _tree() -> dict[str, set[str]]:
    tree = {}
    for path in (p for top in OURS for p in sorted((ROOT / top).rglob("*.py"))):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        package = parts[:-1]
        tree[".".join(package if parts[-1] == "__init__" else parts)] = imports(path.read_text(), package)
    return tree


TREE = _tree()


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(importers: tuple[str, ...], allowed: tuple[str, ...], watched: tuple[str, ...],
               exempt: tuple[str, ...] = ()) -> list[str]:
    """``importer → module`` for each import of a ``watched`` module outside ``allowed``."""
    return sorted(f"{who} → {name}" for who, names in TREE.items()
                  if _within(who, importers) and not _within(who, exempt)
                  for name in names if _within(name, watched) and not _within(name, allowed))


def test_imports_inside_functions_and_relative_ones_count() -> None:
    source = "import os\nfrom . import sibling\ndef f():\n    from ..grid import AIR_HU\n"
    assert imports(source, ["model", "networks"]) >= {"os", "model.networks.sibling", "model.grid.AIR_HU"}
    assert "model.enhancers.diffusion" in TREE["model.enhance"]  # imported inside load_enhancer


@pytest.mark.parametrize("importer", sorted(RULES))
def test_each_model_package_imports_only_what_its_layer_allows(importer: str) -> None:
    assert violations((importer,), RULES[importer], watched=("model",)) == []


def test_model_never_imports_dicom_the_node_or_the_command_line() -> None:
    assert violations(("model",), (), watched=("pydicom", "dicomnode", "upete")) == []


def test_the_node_reaches_the_model_only_through_model_enhance() -> None:
    assert violations(("dicomnode",), ("model.enhance",), ("model",), exempt=("dicomnode.testing",)) == []


def test_benchmarks_and_tests_do_not_import_each_other() -> None:
    assert violations(("benchmarks",), (), ("tests",)) + violations(("tests",), (), ("benchmarks",)) == []

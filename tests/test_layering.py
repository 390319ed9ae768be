"""The package's import graph: lower layers never import higher ones, no import circle, no private names
imported across modules (function-level imports count: a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "circuit_breakers"

# Low to high. A module may import its own layer and the layers below it, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("config", "fileio", "locks", "recipes"),
    ("models",),
    ("adapters", "losses", "representations", "generation", "data"),
    ("training",),
    ("evaluation",),
    ("experiments",),
    ("guard",),
    ("cli",),
]


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def find_modules(src: Path = SRC) -> dict[str, Path]:
    return {module_name(p, src): p for p in sorted((src / PACKAGE).rglob("*.py"))}


MODULES = find_modules()


def layer(module: str) -> int | None:
    """Index of the layer a module belongs to (None for the package root, which is the public API)."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module}: in no layer; add it to LAYERS in {Path(__file__).name}")


def imports(module: str, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import of the package inside `module`."""
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith(PACKAGE)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith(PACKAGE):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, None, node.lineno) if sub in modules else (target, alias.name, node.lineno))
    return found


def upward_imports(modules: dict[str, Path]) -> list[str]:
    upward = []
    for module in modules:
        mine = layer(module)
        for target, _, line in imports(module, modules):
            theirs = layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module}:{line} imports {target}")
    return upward


def import_circles(modules: dict[str, Path]) -> list[list[str]]:
    edges = {m: {t for t, _, _ in imports(m, modules) if t in modules and t != m} for m in modules}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return circles


def private_imports(found: list[tuple[str, str | None, int]]) -> list[str]:
    return [
        f"{line}: {target}.{name}"
        for target, name, line in found
        if name is not None and name.startswith("_") and not name.startswith("__")
    ]


def private_imports_in(modules: dict[str, Path]) -> dict[str, list[str]]:
    bad = {module: private_imports(imports(module, modules)) for module in modules}
    return {k: v for k, v in bad.items() if v}


def test_every_module_is_in_a_layer():
    assert len(MODULES) > 40
    for module in MODULES:
        layer(module)


def test_lower_layers_import_nothing_above_them():
    assert upward_imports(MODULES) == []


def test_no_import_circle():
    assert import_circles(MODULES) == []


def test_no_private_name_imported_across_modules():
    assert private_imports_in(MODULES) == {}


@pytest.mark.parametrize("folder", ["tests", "benchmarks"])
def test_tests_and_benchmarks_import_public_names_only(folder):
    bad = {}
    for path in sorted((SRC.parent / folder).rglob("*.py")):
        found = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
                found += [(node.module, alias.name, node.lineno) for alias in node.names]
        if private_imports(found):
            bad[path.name] = private_imports(found)
    assert bad == {}


def test_the_checks_see_an_upward_import_a_circle_and_a_private_name(tmp_path):
    """A fake package where models imports training (upward, closing a circle) and a private helper."""
    pkg = tmp_path / PACKAGE
    (pkg / "training").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "training" / "__init__.py").write_text("")
    (pkg / "models.py").write_text("def load():\n    from .training.trainer import Trainer\n")
    (pkg / "training" / "trainer.py").write_text("from ..models import _helper\nclass Trainer: ...\n")
    fake = find_modules(tmp_path)
    assert upward_imports(fake) == [f"{PACKAGE}.models:2 imports {PACKAGE}.training.trainer"]
    assert import_circles(fake) == [[f"{PACKAGE}.models", f"{PACKAGE}.training.trainer", f"{PACKAGE}.models"]]
    assert private_imports_in(fake) == {f"{PACKAGE}.training.trainer": [f"1: {PACKAGE}.models._helper"]}

"""The house: within each Python package of the repo, modules import one
another without circles. Lazy imports and imports under `if TYPE_CHECKING:`
count too: a circle hidden in a function or in the types is still two
modules that cannot be understood one without the other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(
    p
    for pattern in ("services/*/src/*", "libs/*/src/*", "cli/src/*")
    for p in ROOT.glob(pattern)
    if (p / "__init__.py").exists()
)


def _module_name(package: Path, file: Path) -> str:
    parts = [package.name, *file.relative_to(package).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, current: str, is_package: bool, modules: set[str]) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = current.split(".")
                if not is_package:
                    anchor = anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import module` needs the module; `from pkg import name`, the package.
            found.update(
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            )
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph(package: Path) -> dict[str, set[str]]:
    files = {_module_name(package, f): f for f in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, file in files.items():
        tree = ast.parse(file.read_text(), str(file))
        targets = _imports(tree, name, file.name == "__init__.py", set(files))
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_every_package_is_found() -> None:
    names = {p.name for p in PACKAGES}
    assert {"marie_gateway", "marie_providers", "marie_memory", "marie_auth", "marie_kit"} <= names


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_no_import_circles(package: Path) -> None:
    assert _circles(_graph(package)) == []


def test_a_circle_is_seen(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n"
    )
    (package / "d.py").write_text("from pkg import c\n")
    assert _circles(_graph(package)) == [["pkg.a", "pkg.sub.b"], ["pkg.c", "pkg.d"]]

"""pyproject.toml lists every package: an editable install imports unlisted ones from the checkout,
a wheel silently leaves them out (then `fusion-distill` fails on the first import of one). And the
packages import without a circle. The wheel itself is built and run in tests/test_wheel.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = set(setuptools["package-data"])  # recipes/ and data/demo mapped in (package-dir): data, no __init__.py
    assert {name for name in data if name not in setuptools["package-dir"]} == {"distill.demo_corpus.audio"}
    listed = set(setuptools["packages"]) - data
    found = {".".join(init.parent.relative_to(REPO).parts)
             for top in ("distill", "teachers", "students") for init in (REPO / top).rglob("__init__.py")}
    assert found == listed, f"unlisted: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"


def _imports(path: Path, name: str, is_package: bool) -> set[str]:
    """Every module of ours that `path` imports, at module level or inside a function."""
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = ".".join(base[: len(base) - node.level + 1] + [node.module or ""]).strip(".") if node.level else node.module
            found |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_the_packages_import_without_a_circle():
    modules = {}
    for top in ("distill", "teachers", "students"):
        for path in (REPO / top).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    graph = {name: _imports(path, name, pkg) & set(modules) - {name} for name, (path, pkg) in modules.items()}

    def cycle_from(start: str) -> list[str] | None:  # depth-first; the first path back to `start`
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    circles = [" -> ".join(c) for c in map(cycle_from, sorted(graph)) if c]
    assert not circles, circles[0]

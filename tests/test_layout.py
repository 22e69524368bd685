"""The code's shape, checked from its syntax trees: short functions, and an engine that does not depend on export/.

Both rules are read from the source with `ast` (no import runs), so a violation anywhere fails here by name.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lowmem_merge"
MAX_LINES = 60
# The commands that run an export hand over to export/ inside the function that runs it; nothing else may, and
# no module of lowmem_merge imports export/ at import time.
EXPORT_CALLERS = {"cli.py": {"_add_export_command"}, "demo.py": {"_deploy", "_generate_text"}}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def long_functions(tree: ast.AST, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function or method, nested ones included, longer than ``limit`` lines."""
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


def export_imports(tree: ast.AST) -> list[tuple[str | None, int]]:
    """(enclosing top-level function or None, line) of every import of the export package."""
    found = []

    def visit(node: ast.AST, owner: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = owner
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and owner is None:
                inner = child.name
            names = ([a.name for a in child.names] if isinstance(child, ast.Import) else
                     [child.module or ""] if isinstance(child, ast.ImportFrom) and child.level == 0 else [])
            if any(n == "export" or n.startswith("export.") for n in names):
                found.append((owner, child.lineno))
            visit(child, inner)
    visit(tree, None)
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_is_longer_than_60_lines(path: Path) -> None:
    too_long = long_functions(ast.parse(path.read_text(), str(path)))
    assert not too_long, f"{path.relative_to(PACKAGE)}: " + ", ".join(f"{n} ({k} lines)" for n, k in too_long)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_in_lowmem_merge_imports_export(path: Path) -> None:
    allowed = EXPORT_CALLERS.get(str(path.relative_to(PACKAGE)), set())
    bad = [(owner, line) for owner, line in export_imports(ast.parse(path.read_text(), str(path)))
           if owner not in allowed]
    assert not bad, f"{path.relative_to(PACKAGE)} imports export/ at " + ", ".join(
        f"line {line} ({owner or 'module level'})" for owner, line in bad)


def test_the_checks_find_what_they_look_for() -> None:
    """Each rule, on a small source that breaks it and one that keeps it."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES - 1))
    assert long_functions(ast.parse(f"def f():\n{body}\n")) == []                         # 60 lines
    method = "\n".join("    " + line for line in body.splitlines())
    assert long_functions(ast.parse(f"class C:\n    def f(self):\n{method}\n        y = 0\n")) == [("f", 61)]
    tree = ast.parse("import export.cli\nfrom export import x\nimport exporter\nfrom .export import y\n"
                     "def g():\n    from export.pipeline import run\n    def h():\n        import export\n")
    assert export_imports(tree) == [(None, 1), (None, 2), ("g", 6), ("g", 8)]

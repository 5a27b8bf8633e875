"""The layer rules of design.md section 2 and the size budget of the style guide, enforced by ast."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "flowgrove"
MATH = ["types.py", "schedules.py", "samplers", "plans.py", "tree.py", "advantages.py", "losses.py", "selection.py",
        "diversity.py"]
MATH_MAY_IMPORT = {"torch", "math", "__future__", "dataclasses", "typing", "collections", "difflib", "functools"}


def _files(entries: list[str]) -> list[Path]:
    out = []
    for e in entries:
        p = SRC / e
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_math_layer_imports_only_torch_and_itself():
    math_modules = {"flowgrove." + str(p.relative_to(SRC).with_suffix("")).replace("/", ".") for p in _files(MATH)}
    math_modules |= {"flowgrove.samplers"}
    for path in _files(MATH):
        for name in _imports(path):
            ok = name.split(".")[0] in MATH_MAY_IMPORT or name in math_modules
            assert ok, f"{path.name} imports {name}: the math layer may import torch and other math modules only"


def test_size_budget():
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        assert text.count("\n") <= 400, f"{path.name} has more than 400 lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                assert size <= 60, f"{path.name}:{node.lineno} {node.name} is {size} lines (budget 60)"

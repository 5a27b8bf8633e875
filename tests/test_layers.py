"""The layer rules of docs/architecture.md (design.md section 2) and the size budget of the style guide, by ast.

Every import counts, the lazy ones inside functions and those under ``TYPE_CHECKING`` included: a lazy import that
runs back up is still a circle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "flowgrove"

# Subpackage -> layer, lowest first (docs/architecture.md). A module may import its own package and lower layers only.
LAYERS = {
    "": 0,  # the root modules below: messages, registry and the package face
    "samplers": 1,  # math: torch only (step families, solvers, schedules)
    "grpo": 2,  # math: torch and samplers (plans, tree, advantages, losses, selection)
    "tasks": 3,  # embedded tasks' data and shipped weight files
    "policies": 4, "rewards": 4,  # the model boundary
    "config": 5,
    "parallel": 6,
    "training": 7,
    "runs": 8,
    "evaluation": 9,
    "bench": 10,
    "recipes": 11,
    "cli": 12,  # the root modules cli and __main__
}
ROOT_MODULES = {"__init__", "__main__", "cli", "messages", "registry"}
TOP = {"cli", "__main__"}
MATH = ["samplers", "grpo", "evaluation/diversity.py", "evaluation/seeds.py"]
MATH_MAY_IMPORT = {"torch", "math", "__future__", "dataclasses", "typing", "collections", "difflib", "functools"}


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(("flowgrove", *parts)).removesuffix(".__init__")


def _modules() -> dict[str, Path]:
    return {_module(p): p for p in sorted(SRC.rglob("*.py"))}


def _files(entries: list[str]) -> list[Path]:
    out = []
    for e in entries:
        p = SRC / e
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (``from pkg import mod`` resolved to ``pkg.mod`` when that is a module)."""
    modules = _modules()
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import; flowgrove uses absolute imports"
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    return names


def _layer(module: str) -> tuple[int, str]:
    """(layer, package) of a flowgrove module."""
    parts = module.split(".")[1:]
    if len(parts) == 1 and parts[0] in TOP:
        return LAYERS["cli"], "cli"
    if not parts or (len(parts) == 1 and parts[0] in ROOT_MODULES):
        return LAYERS[""], ""
    assert parts[0] in LAYERS, f"{module}: package {parts[0]!r} has no layer in tests/test_layers.py (and docs/architecture.md)"
    return LAYERS[parts[0]], parts[0]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {n for n in _imports(p) if n in modules and n != m} for m, p in modules.items()}


def test_math_layer_imports_only_torch_and_itself():
    math_modules = {_module(p) for p in _files(MATH)} | {"flowgrove.samplers", "flowgrove.grpo"}
    for path in _files(MATH):
        for name in _imports(path):
            ok = name.split(".")[0] in MATH_MAY_IMPORT or name in math_modules
            assert ok, f"{path.name} imports {name}: the math layer may import torch and other math modules only"


def _violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports into a higher layer, or into another package of the same layer (the root modules excepted)."""
    bad = []
    for module, targets in graph.items():
        layer, package = _layer(module)
        for target in targets:
            t_layer, t_package = _layer(target)
            if t_package != package and (t_layer > layer or (t_layer == layer and t_package != "")):
                bad.append(f"{module} (layer {layer}) -> {target} (layer {t_layer})")
    return sorted(bad)


def test_no_import_runs_up_or_sideways():
    """A module imports its own package or a lower layer; never a higher layer nor another package of its own layer."""
    bad = _violations(_graph())
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return circles


def test_no_import_circles():
    circles = _circles(_graph())
    assert not circles, f"import circles: {circles}"


def test_the_root_holds_few_modules_and_every_package_says_its_layer():
    root = sorted(p.stem for p in SRC.glob("*.py"))
    assert len(root) <= 8 and set(root) <= ROOT_MODULES, f"modules directly in flowgrove/: {root}"
    packages = sorted(p.parent.name for p in SRC.glob("*/__init__.py"))
    assert set(packages) == set(LAYERS) - {"", "cli"}, f"packages {packages} against the layers {sorted(LAYERS)}"
    for name in packages:
        doc = ast.get_docstring(ast.parse((SRC / name / "__init__.py").read_text()))
        assert doc and "import" in doc, f"flowgrove/{name}/__init__.py must say what the layer is and what it may import"


def test_the_checks_catch_an_import_that_runs_up_a_sideways_one_and_a_circle():
    """The checkers themselves, on a hand-made graph."""
    graph = {"flowgrove.grpo.tree": {"flowgrove.training.trainer"}, "flowgrove.training.trainer": {"flowgrove.grpo.tree"},
             "flowgrove.policies.flux": {"flowgrove.rewards.base", "flowgrove.messages"}, "flowgrove.rewards.base": set(),
             "flowgrove.messages": set(), "flowgrove.cli": {"flowgrove.recipes.train"}, "flowgrove.recipes.train": set()}
    assert _violations(graph) == ["flowgrove.grpo.tree (layer 2) -> flowgrove.training.trainer (layer 7)",
                                  "flowgrove.policies.flux (layer 4) -> flowgrove.rewards.base (layer 4)"]
    assert _circles(graph) == [["flowgrove.grpo.tree", "flowgrove.training.trainer"]]


def test_size_budget():
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        assert text.count("\n") <= 400, f"{path.name} has more than 400 lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                assert size <= 60, f"{path.name}:{node.lineno} {node.name} is {size} lines (budget 60)"


def test_the_tests_mirror_the_package():
    """Every test folder is named after a package folder (tests/samplers for flowgrove/samplers, ...)."""
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert folders and folders <= set(LAYERS) - {"", "cli"}, f"test folders without a package: {sorted(folders - set(LAYERS))}"

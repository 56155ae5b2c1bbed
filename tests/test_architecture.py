"""The package's layers stay as docs/METHOD.md draws them: imports between shdcli modules form no cycle,
no function imports a project module to dodge one, and each layer imports only the layers below it.

Read from the source with ast (no import is executed), so a new module is checked the day it is added.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "shdcli"

# Bottom to top; a module may import its own layer and the layers below it.
LAYERS = [
    ("core", {"shdcli", "shdcli.errors", "shdcli.report", "shdcli.recipe", "shdcli.distributed"}),
    ("attention", "shdcli.attention"),
    ("models", "shdcli.models"),
    ("tasks", "shdcli.tasks"),
    ("students", "shdcli.students"),
    ("workflows", {"shdcli.train", "shdcli.checkpoint", "shdcli.evaluate", "shdcli.export",
                   "shdcli.model_card", "shdcli.demo", "shdcli.callbacks", "shdcli.progress", "shdcli.trackers",
                   "shdcli.plots", "shdcli.compare", "shdcli.optim", "shdcli.teacher",
                   "shdcli.memory", "shdcli.heads", "shdcli.heads.measure", "shdcli.heads.run", "shdcli.heads.report",
                   "shdcli.heads.plots"}),
    ("cli", {"shdcli.cli", "shdcli.__main__"}),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.AST, known: set[str]) -> list[str]:
    """The shdcli modules an import statement names (`from shdcli.x import y` names shdcli.x.y when that
    is a module, else shdcli.x)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("shdcli")]
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shdcli"):
        out = []
        for a in node.names:
            sub = f"{node.module}.{a.name}"
            out.append(sub if sub in known else node.module)
        return out
    return []


@functools.cache
def graph() -> dict[str, set[str]]:
    known = set(modules())
    edges: dict[str, set[str]] = {}
    for name, path in modules().items():
        tree = ast.parse(path.read_text(), str(path))
        edges[name] = {m for node in tree.body for m in imported(node, known) if m != name}
    return edges


def layer_of(module: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        if isinstance(members, str) and (module == members or module.startswith(members + ".")):
            return i
        if isinstance(members, set) and module in members:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: add it to LAYERS (and the docs)")


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    colour = dict.fromkeys(edges, 0)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if colour.get(nxt) == 0 and (found := visit(nxt)):
                return found
        stack.pop()
        colour[node] = 2
        return None

    for start in sorted(edges):
        if colour[start] == 0 and (found := visit(start)):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_imports_form_no_cycle():
    assert find_cycle(graph()) is None


def test_no_function_imports_a_project_module():
    offenders = []
    for path in modules().values():
        tree = ast.parse(path.read_text(), str(path))
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top and imported(node, set(modules())):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not offenders, "function-local imports of shdcli modules: " + ", ".join(offenders)


@pytest.mark.parametrize("module", sorted(modules()))
def test_each_module_imports_only_its_layer_and_below(module):
    mine = layer_of(module)
    above = sorted(m for m in graph()[module] if layer_of(m) > mine)
    assert not above, f"{module} ({LAYERS[mine][0]}) imports higher layers: {above}"


def test_every_folder_says_what_lives_there():
    for folder in [p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()]:
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert doc and "import" in doc, f"{folder.name}/__init__.py needs a docstring saying what it may import"


def test_benchmarks_use_only_public_shdcli_names():
    """Benchmarks drive training through its public seams (train.run_distillation's callbacks, public
    functions): importing a private name or assigning into an shdcli module breaks silently on a refactor."""
    offenders = []
    for path in sorted((PACKAGE.parent / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shdcli"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                offenders += [f"{path.name}:{node.lineno} imports {name}" for name in private]
                aliases |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("shdcli")}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    offenders.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
                if isinstance(node.ctx, ast.Store):
                    offenders.append(f"{path.name}:{node.lineno} assigns {node.value.id}.{node.attr}")
    assert not offenders, "benchmarks reach into shdcli internals: " + ", ".join(offenders)

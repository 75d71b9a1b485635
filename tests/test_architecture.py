"""The package's layering (docs/architecture.md), read from its imports: no import circle, no lower layer
importing a higher one, no private name used across modules, and a mode's name compared only in the registry."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedmnist"
# Code that builds or runs a round's parts; it must not reach up to what consumes them.
LOWER = ("fedmnist.data", "fedmnist.model", "fedmnist.aggregation", "fedmnist.privacy", "fedmnist.algorithms",
         "fedmnist.client_tensors", "fedmnist.process", "fedmnist.evaluation", "fedmnist.clients",
         "fedmnist.config", "fedmnist.registry", "fedmnist.errors", "fedmnist.schema", "fedmnist.values")
HIGHER = ("fedmnist.outputs", "fedmnist.loop", "fedmnist.train", "fedmnist.experiment", "fedmnist.bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The fedmnist modules a module imports, anywhere in it (TYPE_CHECKING blocks included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("fedmnist")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedmnist"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
    return found


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.unit
def test_there_is_no_import_circle():
    trees = modules()
    graph = {name: imports(tree, set(trees)) - {name} for name, tree in trees.items()}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            if target in graph and not state.get(target):
                visit(target, path + [target])
        state[name] = 2

    for name in graph:
        if not state.get(name):
            visit(name, [name])


@pytest.mark.unit
def test_lower_layers_never_import_outputs_the_loop_or_the_commands():
    trees = modules()
    offenders = [f"{name} imports {target}" for name, tree in trees.items() if within(name, LOWER)
                 for target in imports(tree, set(trees)) if within(target, HIGHER)]
    assert offenders == []


@pytest.mark.unit
def test_no_private_name_is_used_across_modules():
    offenders = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedmnist"):
                offenders += [f"{name}: from {node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__version__"]
    assert offenders == []


@pytest.mark.unit
def test_only_the_registry_names_the_aggregation_modes():
    modes = ("plain", "compressed", "dp", "secure", "secure_dp")
    comparison = re.compile(r"""(==|!=|\bin)\s*\(?\s*["'](%s)["']""" % "|".join(modes))
    offenders = [f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
                 for path in PACKAGE.rglob("*.py") for number, line in enumerate(path.read_text().splitlines(), 1)
                 if comparison.search(line) and "aggregation" in line]
    assert offenders == []

"""The package layout (README, "Development"): every module of medtune imports, medtune's own imports form no cycle
(module-level and function-level imports both count), no module reaches into another's private names
(``from medtune.x import _name`` or ``x._name``), and each folder imports only the layers it may.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import medtune

PACKAGE = Path(medtune.__file__).resolve().parent

# folder (or top-level module) -> the folders and modules it may import from medtune. Bottom to top.
MAY_IMPORT = {
    "compat": set(),
    "families": set(),
    "io": {"io"},
    "settings": {"settings", "io", "families"},
    "llama4": {"llama4", "families", "compat"},
    "stages": {"settings", "io", "stages", "evaluation", "llama4", "families", "compat"},
    "evaluation": {"settings", "io", "stages", "evaluation", "llama4", "families", "compat"},
    "bench": {"bench", "llama4", "evaluation", "stages", "families", "compat"},
    "reports": {"reports", "settings", "stages", "io"},
    "pipeline": {"settings", "reports"},
    "lab": set(),
}


def module_files() -> dict[str, Path]:
    """``{dotted module name: file}`` for every .py file of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if "__pycache__" in parts:
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = module_files()


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module name of a ``from ... import`` (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> tuple[set[str], list[str]]:
    """The medtune modules that ``module`` imports anywhere in its file, and its accesses to other modules' private
    names (each as ``"<file>:<line>: <what>"``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    edges: set[str] = set()
    private: list[str] = []
    aliases: dict[str, str] = {}  # local name -> the medtune module it is bound to
    where = f"{path.relative_to(PACKAGE.parent)}"

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    edges.add(alias.name)
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node, is_package)
            if source != "medtune" and not source.startswith("medtune."):
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in known:  # from medtune.stages import data
                    edges.add(submodule)
                    aliases[alias.asname or alias.name] = submodule
                    continue
                if source in known:
                    edges.add(source)
                if _is_private(alias.name) and source != module:
                    private.append(f"{where}:{node.lineno}: from {source} import {alias.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and _is_private(node.attr) and aliases[node.value.id] != module):
            private.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr} ({aliases[node.value.id]})")
    edges.discard(module)
    return edges, private


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    known = set(MODULES)
    graph, private = {}, []
    for name, path in MODULES.items():
        graph[name], found = imports_of(name, path, known)
        private += found
    return graph, private


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer(module: str) -> str | None:
    """``medtune.stages.data`` -> ``stages``; the root package itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_the_graph_sees_module_and_function_level_imports():
    graph, _ = import_graph()
    assert "medtune.settings.config" in graph["medtune.settings.runs"]  # module level
    assert "medtune.io.sources" in graph["medtune.stages.data"]  # inside a function
    assert "medtune.llama4" in graph["medtune.stages.train"]  # `from medtune import llama4`, inside a function


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    graph, _ = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_names_across_modules():
    _, private = import_graph()
    assert not private, "private names used across modules (make them public in their module, or move them):\n" + \
        "\n".join(private)


def test_each_folder_imports_only_what_it_may():
    graph, _ = import_graph()
    wrong = []
    for module, targets in sorted(graph.items()):
        allowed = MAY_IMPORT.get(layer(module))
        if allowed is None:
            continue
        wrong += [f"{module} -> {t}" for t in sorted(targets) if layer(t) not in allowed]
    assert not wrong, "imports against the layout in README (Development):\n" + "\n".join(wrong)

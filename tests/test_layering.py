"""Layers point one way, read statically from the source (every import, inside functions too).

core (adaptive_kv.*) < policies < training < services < the CLI (adaptive_kv.cli): a layer never
imports one above it, and the service does not import training. Unlike a run-time check of
`sys.modules`, this sees imports that only run inside a function.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the package it installs as (pyproject's package-dir)
PACKAGES = {"adaptive_kv": "adaptive_kv", "policies": "adaptive_kv.policies", "training": "adaptive_kv.training",
            "services": "adaptive_kv.services"}
CLI = "adaptive_kv.cli"
POLICIES, TRAINING, SERVICES = "adaptive_kv.policies", "adaptive_kv.training", "adaptive_kv.services"
# the layer a module belongs to -> the packages it must not import
FORBIDDEN = {
    "core": (POLICIES, TRAINING, SERVICES, CLI),
    "policies": (TRAINING, SERVICES, CLI),
    "training": (SERVICES, CLI),
    "services": (TRAINING, CLI),
    "cli": (),
}


def module_name(path: Path) -> str:
    """The dotted name `path` installs as (a package's __init__ is the package)."""
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [*PACKAGES[folder].split("."), *rest]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """core, policies, training, services or cli."""
    if module == CLI:
        return "cli"
    for layer, package in (("policies", POLICIES), ("training", TRAINING), ("services", SERVICES)):
        if module == package or module.startswith(package + "."):
            return layer
    return "core"


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module `source` (the text of `module`) imports, at any depth, relative ones resolved.

    `from pkg import name` counts as importing `pkg.name` too (name may be a submodule), and
    `import_module("literal")` counts as an import.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def _violations() -> list[str]:
    out = []
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            module = module_name(path)
            imports = imported_modules(path.read_text(), module, path.name == "__init__.py")
            for forbidden in FORBIDDEN[layer_of(module)]:
                for name in sorted(imports):
                    if name == forbidden or name.startswith(forbidden + "."):
                        out.append(f"{module} ({layer_of(module)}) imports {name}")
    return out


def test_layers_point_one_way():
    assert _violations() == []


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports; `from pkg import sub` is an edge to `pkg.sub` only."""
    sources = {module_name(p): p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py")}
    graph = {}
    for module, path in sources.items():
        imports = imported_modules(path.read_text(), module, path.name == "__init__.py")
        submodules = {name.rpartition(".")[0] for name in imports if name in sources}
        graph[module] = {name for name in imports if name in sources and name != module and name not in submodules}
    return graph


def first_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph`, or [] when it has none."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        return error.args[1]
    return []


def test_no_module_imports_itself_through_others():
    # a cycle means two modules are one idea split in two files (or a layer calling back up)
    assert first_cycle(import_graph()) == []


def test_a_cycle_is_found():
    assert first_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (
        ["a", "c", "b", "a"], ["a", "b", "c", "a"], ["b", "a", "c", "b"], ["b", "c", "a", "b"], ["c", "b", "a", "c"],
        ["c", "a", "b", "c"])
    assert first_cycle({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("source, module, expected", [
    ("def f():\n    from adaptive_kv.training import tracking\n", "adaptive_kv.policies.x", "adaptive_kv.training.tracking"),
    ("from . import cli\n", "adaptive_kv.evaluation", "adaptive_kv.cli"),
    ("from ..services.engine import Engine\n", "adaptive_kv.training.train", "adaptive_kv.services.engine"),
    ("from adaptive_kv import policies\n", "adaptive_kv.cache", "adaptive_kv.policies"),
    ("import adaptive_kv.services.app as app\n", "adaptive_kv.training.x", "adaptive_kv.services.app"),
    ("import_module('adaptive_kv.cli')\n", "adaptive_kv.report", "adaptive_kv.cli"),
])
def test_imports_are_read_at_any_depth_and_resolved(source, module, expected):
    assert expected in imported_modules(source, module)


def test_files_map_to_their_installed_names():
    assert module_name(ROOT / "policies" / "base.py") == "adaptive_kv.policies.base"
    assert module_name(ROOT / "adaptive_kv" / "tasks" / "__init__.py") == "adaptive_kv.tasks"
    assert layer_of("adaptive_kv.cli_args") == "core" and layer_of(CLI) == "cli"

"""catdog's library modules form layers: no import cycle, counting imports inside functions.

A function-level import hides a cycle from Python (it only fails if both modules are half-loaded at
once) but not from a reader: the two modules still depend on each other.  So every ``import`` and
``from ... import`` anywhere in a module counts as an edge here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = "catdog"
# The layers above the library: catdog must never import them.
ABOVE = ("jobs", "bench", "gpu_kit", "tests")


def module_names(package_dir: Path) -> set[str]:
    return {f"{PACKAGE}.{path.stem}" for path in package_dir.glob("*.py")}


def imported_names(tree: ast.AST, module: str) -> set[str]:
    """Every dotted name that ``module`` imports, at any depth (top level, functions, TYPE_CHECKING)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package of ``module``
                parent = module.rsplit(".", node.level)[0]
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # ``from catdog import tracking``
    return names


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module → the catdog modules it imports."""
    modules = module_names(package_dir)
    graph = {}
    for module in sorted(modules):
        path = package_dir / f"{module.split('.')[-1]}.py"
        names = imported_names(ast.parse(path.read_text(), str(path)), module)
        graph[module] = {name for name in names if name in modules} - {module}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The shortest cycle ``[start, ..., start]`` (breadth-first), or None."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for target in sorted(graph[path[-1]]):
            if target == start:
                return path + [start]
            if target not in seen:
                seen.add(target)
                paths.append(path + [target])
    return None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per group of modules that import each other (directly or through others)."""
    cycles, covered = [], set()
    for node in sorted(graph):
        if node in covered:
            continue
        cycle = cycle_through(graph, node)
        if cycle:
            cycles.append(cycle)
            covered |= {other for other in reachable(graph, node) if node in reachable(graph, other)}
    return cycles


def test_find_cycles_reports_each_cycle():
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["d", "e", "d"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_function_level_imports_are_edges():
    tree = ast.parse("def f():\n    from catdog.report import write_report\n\nfrom catdog import tracking\n")
    names = imported_names(tree, "catdog.inference")
    assert {"catdog.report", "catdog.tracking"} <= names


def test_catdog_modules_have_no_import_cycle():
    graph = import_graph(REPO / PACKAGE)
    assert len(graph) > 10, f"found only {sorted(graph)} under {REPO / PACKAGE}"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_catdog_never_imports_the_layers_above():
    for path in sorted((REPO / PACKAGE).glob("*.py")):
        names = imported_names(ast.parse(path.read_text(), str(path)), f"{PACKAGE}.{path.stem}")
        above = sorted(name for name in names if name.split(".")[0] in ABOVE)
        assert not above, f"{path.name} imports {above}: jobs/, bench/, gpu_kit/ and tests/ sit on top of catdog"


def modules_loaded_by(code: str) -> set[str]:
    """The top-level modules a fresh interpreter has loaded after running ``code``."""
    script = f"import sys; {code}; print(' '.join(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(proc.stdout.split())


def test_what_trains_controller_and_dataset_manager_unpickle_imports_no_torchvision():
    """Ray Train's controller and dataset manager unpickle the train function and the dataset config,
    importing their modules, for every training.  torchvision (with the torch._dynamo it imports)
    cost each training about 5 CPU-s there (bench/NOTES.md, "What Train's helper actors import"); only a Train worker
    building a model needs it."""
    from catdog.train_job import ShardConfig, train_loop_per_worker

    modules = modules_loaded_by(f"import {ShardConfig.__module__}")
    assert "torch" not in modules and not {m for m in modules if m.startswith("catdog.")} - {ShardConfig.__module__}
    modules = modules_loaded_by(f"import {train_loop_per_worker.__module__}")
    assert "torch" in modules and "torchvision" not in modules and "catdog.train_job" not in modules
    modules = modules_loaded_by("from catdog.models import build_model; build_model('resnet18')")
    assert "torchvision" in modules  # the probe can see it

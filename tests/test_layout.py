"""The package's layout holds: no import cycles among sempa_exp modules (imports inside functions count), entry points
that are thin wrappers around their pipeline, and no registration in Hydra's ConfigStore by importing one."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGES = ("sempa_exp", "hydra_plugins")
# entry point -> its pipeline: the one heavy thing the entry may import
ENTRY_POINTS = {
    "sempa_exp.train": "sempa_exp.pipelines.training",
    "sempa_exp.evaluate": "sempa_exp.pipelines.evaluation",
    "sempa_exp.select": "sempa_exp.pipelines.selection",
    "sempa_exp.gen_eval": "sempa_exp.pipelines.generation",
    "sempa_exp.sync_wandb": "sempa_exp.records.wandb_sync",
    "sempa_exp.gen_report": "sempa_exp.evaluation.generation_table",
    "sempa_exp.archive": "sempa_exp.records.archive",
}
HEAVY = {"torch", "transformers", "trl", "peft", "datasets", "accelerate", "wandb", "lm_eval", "numpy", "scipy",
         "matplotlib", "sentence_transformers", "submitit", "gguf", "sklearn", "pandas"}
LIGHT_THIRD_PARTY = {"hydra", "omegaconf"}  # what a wrapper around a Hydra entry needs besides the standard library


# ------------------------------------------------------------------------------------------------ the import graph


@dataclass(frozen=True)
class Edge:
    target: str  # a module of the package, or a third-party top-level name
    line: int
    at_import: bool  # runs when the module is imported (not inside a function or a __main__ block)


def module_names(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _is_main_guard(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value == "__main__"
                                                   for c in test.comparators))


def _imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it runs at import time; ``if TYPE_CHECKING:`` blocks never run."""
    def walk(node: ast.AST, at_import: bool) -> Iterator[tuple[ast.AST, bool]]:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            inner = at_import and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if _is_main_guard(child):
                inner = False
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, at_import
            yield from walk(child, inner)

    yield from walk(tree, True)


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, list[Edge]]:
    """module -> its imports: modules of ``packages`` (a package's parents included, as Python imports them) and
    third-party top-level names."""
    modules = module_names(root, packages)

    def resolve(name: str) -> list[str]:
        """The modules that importing ``name`` runs: its parent packages and itself."""
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules]

    graph: dict[str, list[Edge]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = []
        for node, at_import in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    targets += resolve(alias.name) or [alias.name.split(".")[0]]
            else:
                base = node.module or ""
                if node.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                own = resolve(base)
                if not own:
                    targets.append(base.split(".")[0])
                else:
                    targets += own
                    targets += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            # a package importing its own submodule names itself as a parent: not an edge
            edges += [Edge(t, node.lineno, at_import) for t in dict.fromkeys(targets) if t != module]
        graph[module] = edges
    return graph


def cycles(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    inner = {m: sorted({e.target for e in edges if e.target in graph}) for m, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in inner[v]:
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
                found.append(sorted(component))

    for v in sorted(inner):
        if v not in index:
            visit(v)
    return found


def describe(graph: dict[str, list[Edge]], component: list[str]) -> str:
    members = set(component)
    return "\n".join(f"  {m} line {e.line} imports {e.target}{'' if e.at_import else ' (inside a function)'}"
                     for m in component for e in graph[m] if e.target in members)


def test_no_import_cycles_among_the_packages_modules():
    graph = import_graph(SRC, PACKAGES)
    assert len(graph) > 40 and "sempa_exp.pipelines.training" in graph  # the scan sees the package
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n\n".join(describe(graph, c) for c in found)


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    """The checker itself, on a package whose only cycle goes through an import inside a function."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("import json\n\ndef f():\n    from pkg import c\n    return c\n")
    (pkg / "c.py").write_text("from . import a\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n")
    (pkg / "e.py").write_text("import pkg.d\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert Edge("json", 1, True) in graph["pkg.sub.b"] and Edge("pkg.c", 4, False) in graph["pkg.sub.b"]
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]  # d -> e is type-checking only: no cycle
    (pkg / "sub" / "b.py").write_text("import json\n")
    assert cycles(import_graph(tmp_path, ("pkg",))) == []


# ------------------------------------------------------------------------------------------------- entry points


def import_time_reach(graph: dict[str, list[Edge]], start: str) -> set[str]:
    """Every module and third-party top-level name that importing ``start`` imports."""
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += [e.target for e in graph.get(module, []) if e.at_import]
    return seen


@pytest.mark.parametrize(("entry", "pipeline"), list(ENTRY_POINTS.items()))
def test_an_entry_point_is_main_around_its_pipeline(entry, pipeline):
    graph = import_graph(SRC, PACKAGES)
    path = module_names(SRC, PACKAGES)[entry]
    tree = ast.parse(path.read_text())
    defined = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    assert defined == ["main"], f"{path.name} defines {defined}; the logic belongs in {pipeline}"
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Lambda)]
    for statement in tree.body:  # docstring, imports, main, the __main__ block: nothing else runs at import
        assert (isinstance(statement, (ast.Import, ast.ImportFrom, ast.FunctionDef)) or _is_main_guard(statement)
                or (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant))), (
            f"{path.name} line {statement.lineno}: {ast.unparse(statement)[:80]}")

    assert pipeline in {e.target for e in graph[entry]}, f"{entry} does not import {pipeline}"
    direct = {e.target for e in graph[entry] if e.at_import}
    third_party = {t for t in direct if t not in graph and t != "__future__"}
    assert third_party <= LIGHT_THIRD_PARTY | set(sys.stdlib_module_names), third_party - LIGHT_THIRD_PARTY
    # `--help` and `--cfg job` answer before main runs: they must not wait for torch (nor print what transformers
    # prints on import, e.g. under WANDB_MODE=offline, into a `--cfg job` YAML)
    heavy = import_time_reach(graph, entry) & HEAVY
    assert not heavy, f"importing {entry} imports {sorted(heavy)}; import its pipeline inside main"


PROBE = """
import importlib, json, sys
from hydra.core.config_store import ConfigStore

def stored():
    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, prefix + key + "/")
            else:
                yield prefix + key
    return sorted(walk(ConfigStore.instance().repo, ""))

for entry in sys.argv[1:]:
    importlib.import_module(entry)
imported = stored()
from sempa_exp.config.registry import register_all
register_all()
print(json.dumps({"imported": imported, "registered": stored()}))
"""


def test_importing_an_entry_point_registers_nothing_in_hydras_config_store():
    """Registration happens in ``if __name__ == "__main__"`` (register_all), never as a side effect of an import."""
    done = subprocess.run([sys.executable, "-c", PROBE, *ENTRY_POINTS], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    store = json.loads(done.stdout.strip().splitlines()[-1])
    ours = {"config_schema.yaml", "run_identity.yaml", "objective/sempa_schema.yaml", "method/method_schema.yaml",
            "trainer/trainer_schema.yaml"}
    assert ours <= set(store["registered"])  # the probe sees what register_all stores
    assert not ours & set(store["imported"])
    assert set(store["imported"]) < set(store["registered"])

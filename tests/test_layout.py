"""The package's shape: no import cycle among its modules (imports inside functions count), click
only in the command line, no function longer than a screen, and every stored key spelt once, by the
module that owns it."""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "optimize")
CLI_MODULES = {"cli"}
MAX_FUNCTION_LINES = 60
# stored keys -> the module that owns their spelling (study attrs, trial attrs, fingerprint fields)
OWNED_KEYS = {
    "optimize_sd": "study", "constraints": "study", "speedup": "study", "score_loss": "study",
    "time_per_image": "study", "clip_score": "study", "reused_from": "study", "baseline_time": "study",
    "fingerprint": "study", "time_median": "study", "baseline_spread": "study",
    "per_prompt": "study", "intervals": "study", "loss_interval": "study", "speedup_interval": "study",
    "interval_level": "study", "prompt_source": "study",
}


def _modules() -> dict[str, ast.Module]:
    trees = {}
    for name in sorted(os.listdir(PACKAGE)):
        if name.endswith(".py"):
            with open(os.path.join(PACKAGE, name), encoding="utf-8") as f:
                trees[name[:-3]] = ast.parse(f.read(), name)
    return trees


def _sibling_imports(name: str, tree: ast.Module, modules) -> set[str]:
    """Modules of the package that ``name`` imports anywhere, functions included."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("optimize"):
            parts = node.module.split(".")
            found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names if a.name in modules])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("optimize."))
    found.discard(name)
    return {m for m in found if m in modules or m == "__init__"}


def test_no_import_cycle_counting_imports_inside_functions():
    modules = _modules()
    graph = {name: _sibling_imports(name, tree, modules) - {"__init__"} for name, tree in modules.items()}
    graph["__init__"] = graph.get("__init__", set())
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_click_is_imported_by_the_command_line_alone():
    users = set()
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "click" for n in names):
                users.add(name)
    assert users <= CLI_MODULES, users - CLI_MODULES


def test_every_function_fits_on_a_screen():
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_stored_keys_are_spelt_by_their_owner_alone():
    stray = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                owner = OWNED_KEYS.get(node.value)
                if owner is not None and owner != name:
                    stray.append(f"{name}:{node.lineno}: {node.value!r}")
    assert not stray, stray

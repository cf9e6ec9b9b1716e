"""The package's shape: layers that import one way (runtime <- levers <- study <- measure <- search <-
app), no import cycle among modules (imports inside functions count), nothing outside a lever's module
naming that lever, click only in the command line, no function longer than a screen, and every stored
key spelt once, by the module that owns it."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "optimize")
# bottom to top: a module may import its own layer and the ones below
LAYERS = ("runtime", "levers", "study", "measure", "search", "app")
CLI_MODULES = {"optimize.app.cli"}
MAX_FUNCTION_LINES = 60
# stored keys -> the module that owns their spelling (study attrs, trial attrs, fingerprint fields)
OWNED_KEYS = {key: "optimize.study.record" for key in (
    "optimize_sd", "constraints", "speedup", "score_loss", "time_per_image", "clip_score", "reused_from",
    "baseline_time", "fingerprint", "time_median", "baseline_spread", "per_prompt", "intervals", "loss_interval",
    "speedup_interval", "interval_level", "prompt_source")}


def _modules() -> dict[str, tuple[str, ast.Module]]:
    """Every module of the package: dotted name -> (path, tree)."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".").removesuffix(".__init__")
                with open(path, encoding="utf-8") as fh:
                    out[name] = (path, ast.parse(fh.read(), path))
    return out


def _imports(name: str, path: str, tree: ast.Module, modules) -> set[str]:
    """Modules of the package that ``name`` imports anywhere, functions included."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t:
                found.add(t)
                break
    found.discard(name)
    return found


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def _graph():
    modules = _modules()
    return modules, {name: _imports(name, path, tree, modules) for name, (path, tree) in modules.items()}


def test_layers_import_downwards_only():
    _, graph = _graph()
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
              if _layer(a) is not None and _layer(b) is not None and _layer(b) > _layer(a)]
    assert not upward, upward
    # the layers are all there, and the package's public face (optimize/__init__.py) sits on top of levers
    assert {n.split(".")[1] for n in graph if _layer(n) is not None} == set(LAYERS)
    assert graph["optimize"] <= {"optimize.levers", "optimize.runtime", "optimize.runtime.testbed"}


def test_no_import_cycle_counting_imports_inside_functions():
    _, graph = _graph()
    # a package's __init__ importing its own modules is not a cycle with them
    edges = {a: {b for b in targets if not (b == a.rpartition(".")[0] or a == b.rpartition(".")[0])}
             for a, targets in graph.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_nothing_outside_a_lever_names_it():
    """A lever's module is the only place that imports it or spells its class: the rest loops over the
    registry (the package's public face and the registry itself list them)."""
    from optimize.levers import LEVERS

    modules, graph = _graph()
    own = {f"optimize.levers.{lever.name}" for lever in LEVERS}
    allowed = {"optimize", "optimize.levers", "optimize.levers.registry"}
    stray = [f"{a} imports {b}" for a, targets in graph.items() for b in targets & own if a not in allowed | {b}]
    assert not stray, stray


def test_click_is_imported_by_the_command_line_alone():
    users = set()
    for name, (_, tree) in _modules().items():
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "click" for n in names):
                users.add(name)
    assert users <= CLI_MODULES, users - CLI_MODULES


def test_every_function_fits_on_a_screen():
    long = []
    for name, (_, tree) in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_stored_keys_are_spelt_by_their_owner_alone():
    stray = []
    for name, (_, tree) in _modules().items():
        exports = {id(c) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                   and any(getattr(t, "id", None) == "__all__" for t in node.targets) for c in ast.walk(node.value)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in exports:
                owner = OWNED_KEYS.get(node.value)
                if owner is not None and owner != name:
                    stray.append(f"{name}:{node.lineno}: {node.value!r}")
    assert not stray, stray


def test_every_package_has_a_small_public_face():
    for layer in LAYERS:
        mod = __import__(f"optimize.{layer}", fromlist=["__all__"])
        assert mod.__doc__ and isinstance(getattr(mod, "__all__", None), list), layer
        for name in mod.__all__:
            assert hasattr(mod, name), f"optimize.{layer}.__all__ names {name}, which it does not have"

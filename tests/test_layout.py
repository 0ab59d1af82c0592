"""The package's layers: imports point down only, verbs do not import each other, and there is no import cycle.

Layers, lowest first: `core/` (config, errors, run folder, runtime) < `data/` < `models/` < `engine/` < `verbs/` <
the front (`cli`, `docs`, `testing`, `__init__`). Imports inside functions count: they hid a cycle once.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tlkit")
LAYERS = {"core": 0, "data": 1, "models": 2, "engine": 3, "verbs": 4}
FRONT = 5


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return out


MODULES = _modules()


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], FRONT) if len(parts) > 1 else FRONT


def _resolve(name: str) -> str | None:
    """The tlkit module an import names (`from tlkit.models import backbones` names `tlkit.models.backbones`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    tree = ast.parse(open(MODULES[module]).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for n in names:
            if n.split(".")[0] == "tlkit":
                target = _resolve(n)
                if target and target != module:
                    found.add(target)
    # `from tlkit.models import backbones` also names the package `tlkit.models`: drop packages imported for their
    # submodules
    return {t for t in found if not any(o.startswith(t + ".") for o in found) or t == "tlkit"}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_the_layers_exist():
    for pkg in LAYERS:
        assert f"tlkit.{pkg}" in MODULES, pkg
    assert layer("tlkit.core.config") < layer("tlkit.data.sources") < layer("tlkit.models.backbones") \
        < layer("tlkit.engine.loop") < layer("tlkit.verbs.finetune") < layer("tlkit.cli")


def test_imports_point_down_only():
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
              if t != "tlkit" and layer(t) > layer(m)]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_below_the_front_nothing_imports_the_package_root_or_the_cli():
    bad = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
           if layer(m) < FRONT and (t == "tlkit" or layer(t) == FRONT)]
    assert not bad, "\n".join(sorted(bad))


def test_verbs_do_not_import_each_other():
    bad = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
           if layer(m) == layer(t) == LAYERS["verbs"] and t != "tlkit.verbs"]
    assert not bad, "verbs share code only through the layers below:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for t in sorted(GRAPH.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_hidden_upward_import(tmp_path):
    """The check itself can fail: an import inside a function is found."""
    src = "def f():\n    from tlkit.verbs.finetune import finetune\n"
    tree = ast.parse(src)
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert _resolve(names[0]) == "tlkit.verbs.finetune" and layer("tlkit.verbs.finetune") > layer("tlkit.engine.loop")

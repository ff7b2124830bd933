"""The package's layers, checked against the real import graph.

The README's "Architecture" section draws the rules; ``ALLOWED`` writes them down (which layer may
import which).  Every ``moesnap`` import in ``src/moesnap`` is read with ``ast`` (lazy imports inside
functions and ``TYPE_CHECKING`` imports included) into a module graph; from it:

- the layer graph (a layer: a subpackage, or a top-level module) is acyclic, and its floors, counted
  by the longest chain of layers importing layers, are at most ``MAX_FLOORS``;
- every import between layers is one ``ALLOWED`` permits (a forbidden one fails naming the module
  and what it imports);
- no cycle runs between the modules of one layer (one fails naming the cycle).

Each check is a function of a graph, also fed small made-up graphs below, so that each is seen to
fail.  ``python tests/test_architecture.py`` prints the layers by floor.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "moesnap"

#: a graph: node -> the nodes it imports
Graph = Mapping[str, Iterable[str]]

# layer -> layers it may import (a module may always import its own layer)
ALLOWED: dict[str, set[str]] = {
    "moesnap": {"run", "model", "judge", "case", "store", "errors", "_version"},   # the public API, lazily
    "_version": set(),
    "errors": set(),
    "stages": set(),
    "case": set(),                                      # the Case value: numpy only
    "util": {"_version", "errors"},
    "gguf": {"errors"},
    "model": {"gguf", "case", "errors", "stages", "util"},
    "store": {"case", "errors", "stages", "util"},
    "judge": {"case", "errors", "stages", "util"},      # no store: the judge needs the value, not its I/O
    "testing": {"judge", "store", "case", "stages", "errors"},
    "capture": {"gguf", "model", "case", "errors", "stages", "util"},   # other engines' forwards and dumps
    "run": {"capture", "gguf", "model", "store", "judge", "case", "errors", "stages", "util", "_version"},
    "cli": {"run", "gguf", "model", "store", "judge", "case", "errors", "stages", "util", "_version"},
    "__main__": {"cli"},
    # the moesnap_snapshot fixture: a use-case layer for pytest (loaded through the pytest11 entry point)
    "pytest_plugin": {"run", "model", "judge", "store", "case", "errors", "stages", "util", "_version"},
}
MAX_FLOORS = 7

#: imports inside a layer known to close a cycle, each with its way out; they are left out of the
#: cycle check, and a test fails once one no longer closes a cycle (then delete it here).
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}


# ---------------------------------------------------------------- the real graph

def modules(src: Path = SRC) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    out = {}
    for p in src.rglob("*.py"):
        parts = list(p.relative_to(src.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports_of(name: str, source: str, *, is_package: bool, known: set[str]) -> set[str]:
    """The moesnap modules the module ``name`` (of text ``source``) imports, wherever the import
    statement is (top level, inside a function, under ``if TYPE_CHECKING``); ``from .x import y``
    counts ``x.y`` when that is a module, else ``x``."""
    pkg = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "moesnap":
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "moesnap"}
    return {m for m in found if m != name}


def real_graph(src: Path = SRC) -> dict[str, set[str]]:
    """The module graph of ``src``: every module -> the package's modules it imports."""
    mods = modules(src)
    return {name: imports_of(name, path.read_text(encoding="utf-8"), is_package=path.name == "__init__.py",
                             known=set(mods)) & set(mods)
            for name, path in mods.items()}


# ---------------------------------------------------------------- the checks, on any graph

def layer_of(module: str) -> str:
    """``moesnap.judge.compare`` -> ``judge``; ``moesnap.errors`` -> ``errors``; ``moesnap`` -> ``moesnap``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_graph(graph: Graph) -> dict[str, set[str]]:
    """Every layer -> the other layers its modules import."""
    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        mine = layer_of(module)
        out.setdefault(mine, set()).update(t for t in map(layer_of, targets) if t != mine)
    return out


def find_cycle(graph: Graph) -> list[str] | None:
    """A cycle of ``graph`` as its path (``[a, b, a]``), the same one every run; None when acyclic."""
    state: dict[str, int] = {}          # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for t in sorted(graph.get(node, ())):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t in graph and t not in state and (cycle := visit(t)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def floors(layers: Graph) -> dict[str, int]:
    """Each layer's floor: 1 for a layer that imports none, else one above the highest floor it
    imports (the longest chain of imports below it).  ``layers`` must be acyclic."""
    cycle = find_cycle(layers)
    if cycle is not None:
        raise ValueError("the layers import in a cycle: " + " -> ".join(cycle))
    out: dict[str, int] = {}

    def floor(layer: str) -> int:
        if layer not in out:
            out[layer] = 1 + max((floor(t) for t in layers.get(layer, ())), default=0)
        return out[layer]

    for layer in layers:
        floor(layer)
    return out


def forbidden_imports(graph: Graph, allowed: Mapping[str, set[str]]) -> list[str]:
    """Every import from one layer into another that ``allowed`` does not permit, as a sentence."""
    bad = []
    for module, targets in graph.items():
        mine = layer_of(module)
        for t in sorted(targets):
            theirs = layer_of(t)
            if theirs != mine and theirs not in allowed.get(mine, set()):
                bad.append(f"{module} imports {t} (layer {mine} may import {sorted(allowed.get(mine, ()))})")
    return sorted(bad)


def layer_cycles(graph: Graph, known: Iterable[tuple[str, str]] = ()) -> dict[str, list[str]]:
    """Per layer, a cycle between its own modules (the graph restricted to the layer), the ``known``
    edges left out."""
    skip = set(known)
    out = {}
    for layer in sorted({layer_of(m) for m in graph}):
        sub = {m: {t for t in ts if layer_of(t) == layer and (m, t) not in skip}
               for m, ts in graph.items() if layer_of(m) == layer}
        if (cycle := find_cycle(sub)) is not None:
            out[layer] = cycle
    return out


def describe(graph: Graph) -> str:
    """``16 layers in 7 floors`` and the layers of each floor, bottom first."""
    fl = floors(layer_graph(graph))
    top = max(fl.values(), default=0)
    return f"{len(fl)} layers in {top} floors: " + "; ".join(
        f"{k}: {', '.join(sorted(layer for layer, f in fl.items() if f == k))}" for k in range(1, top + 1))


# ---------------------------------------------------------------- the package

@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return real_graph()


def test_every_module_belongs_to_a_known_layer(graph):
    unknown = sorted(m for m in graph if layer_of(m) not in ALLOWED)
    assert not unknown, f"modules outside the known layers (add them to ALLOWED and the README): {unknown}"


def test_no_forbidden_import(graph):
    bad = forbidden_imports(graph, ALLOWED)
    assert not bad, "imports that break the layers:\n" + "\n".join(bad)


def test_the_layers_import_in_no_cycle_and_stack_in_few_floors(graph):
    layers = layer_graph(graph)
    cycle = find_cycle(layers)
    assert cycle is None, "the layers import in a cycle: " + " -> ".join(cycle or ())
    fl = floors(layers)
    assert len(fl) > 10 and max(fl.values()) <= MAX_FLOORS, describe(graph)
    assert fl["errors"] == 1 and fl["__main__"] == max(fl.values()), describe(graph)


def test_no_import_cycle_inside_a_layer(graph):
    cycles = layer_cycles(graph, KNOWN_CYCLE_EDGES)
    assert not cycles, "import cycles inside a layer:\n" + "\n".join(
        f"{layer}: {' -> '.join(c)}" for layer, c in cycles.items())


def test_each_known_cycle_edge_still_closes_a_cycle(graph):
    """An exception that no longer applies is removed, not kept."""
    for (a, b), why in KNOWN_CYCLE_EDGES.items():
        assert b in graph.get(a, ()), f"{a} no longer imports {b} ({why}): delete it from KNOWN_CYCLE_EDGES"
        assert layer_of(a) in layer_cycles(graph, set(KNOWN_CYCLE_EDGES) - {(a, b)}), \
            f"{a} -> {b} ({why}) closes no cycle any more: delete it from KNOWN_CYCLE_EDGES"


# ---------------------------------------------------------------- each check can fail

def test_imports_are_read_wherever_they_are():
    source = ("from __future__ import annotations\nfrom typing import TYPE_CHECKING\nimport numpy\n"
              "from . import tolerances\nfrom ..errors import UsageError\nimport moesnap.case\n"
              "if TYPE_CHECKING:\n    from .suite import Report\n"
              "def f():\n    from ..store.zarr import ZarrStore\n    return ZarrStore\n")
    known = {"moesnap.judge.tolerances", "moesnap.errors", "moesnap.case", "moesnap.judge.suite",
             "moesnap.store.zarr", "moesnap.store"}
    got = imports_of("moesnap.judge.x", source, is_package=False, known=known)
    assert got == {"moesnap.judge.tolerances", "moesnap.errors", "moesnap.case", "moesnap.judge.suite",
                   "moesnap.store.zarr"}


def test_a_cycle_of_layers_is_reported():
    g = {"moesnap.judge.a": {"moesnap.store.b"}, "moesnap.store.b": {"moesnap.case"}, "moesnap.case": {"moesnap.judge.c"},
         "moesnap.judge.c": set()}
    assert find_cycle(layer_graph(g)) == ["case", "judge", "store", "case"]
    with pytest.raises(ValueError, match="case -> judge -> store -> case"):
        floors(layer_graph(g))
    assert layer_cycles(g) == {}                          # no cycle between the modules of one layer


def test_floors_are_the_longest_chain_and_too_many_are_seen():
    # a diamond: top imports mid and bottom directly; top's floor is counted over the longer way
    assert floors({"top": {"mid", "bottom"}, "mid": {"bottom"}, "bottom": set()}) == {"top": 3, "mid": 2, "bottom": 1}
    chain = {f"moesnap.l{i}": {f"moesnap.l{i - 1}"} if i else set() for i in range(MAX_FLOORS + 1)}
    fl = floors(layer_graph(chain))
    assert max(fl.values()) == MAX_FLOORS + 1 > MAX_FLOORS
    assert describe(chain).startswith(f"{MAX_FLOORS + 1} layers in {MAX_FLOORS + 1} floors: 1: l0; 2: l1")


def test_a_forbidden_import_is_named():
    g = {"moesnap.judge.compare": {"moesnap.store.zarr", "moesnap.case"}, "moesnap.store.zarr": set(), "moesnap.case": set()}
    assert forbidden_imports(g, ALLOWED) == [
        "moesnap.judge.compare imports moesnap.store.zarr (layer judge may import ['case', 'errors', 'stages', 'util'])"]


def test_a_cycle_inside_a_layer_is_named():
    g = {"moesnap.judge.a": {"moesnap.judge.b", "moesnap.case"}, "moesnap.judge.b": {"moesnap.judge.c"},
         "moesnap.judge.c": {"moesnap.judge.a"}, "moesnap.case": set(), "moesnap.store.x": {"moesnap.case"}}
    assert find_cycle(layer_graph(g)) is None
    assert layer_cycles(g) == {"judge": ["moesnap.judge.a", "moesnap.judge.b", "moesnap.judge.c", "moesnap.judge.a"]}
    assert layer_cycles(g, {("moesnap.judge.c", "moesnap.judge.a")}) == {}


if __name__ == "__main__":
    print(describe(real_graph()))

"""The package's layers, checked: which subpackage may import which, and no import cycle.

The README's "Architecture" section draws the same rules.  Every ``moesnap`` import in
``src/moesnap`` is read with ``ast`` (lazy imports inside functions included), so a forbidden
import fails here, naming the module and what it imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "moesnap"

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
#: import edges known to close a cycle, each with its way out.  judge.report re-exports write_html
#: lazily (a module __getattr__) for cli/_options.py, which still imports it from there: drop the
#: re-export and this entry once it imports moesnap.judge.html.
KNOWN_CYCLE_EDGES = {("moesnap.judge.report", "moesnap.judge.html")}


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The moesnap modules ``name`` imports (``from .x import y`` counts ``x.y`` when that is a module)."""
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
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


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "moesnap"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_belongs_to_a_known_layer(graph):
    unknown = sorted(m for m in graph if _layer(m) not in ALLOWED)
    assert not unknown, f"modules outside the known layers (add them to ALLOWED and the README): {unknown}"


def test_no_forbidden_import(graph):
    bad = []
    for module, targets in graph.items():
        mine = _layer(module)
        for t in targets:
            theirs = _layer(t)
            if theirs == mine:
                continue
            allowed = ALLOWED[mine]
            if theirs in allowed:
                continue
            bad.append(f"{module} imports {t}")
    assert not bad, "imports that break the layers:\n" + "\n".join(sorted(bad))


def test_no_import_cycle(graph):
    seen: dict[str, int] = {}     # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if t not in graph or (m, t) in KNOWN_CYCLE_EDGES:
                continue
            if seen.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in seen:
                visit(t)
        stack.pop()
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m)


def test_layers_stack_in_few_floors():
    floors: dict[str, int] = {}

    def floor(layer: str) -> int:
        if layer not in floors:
            floors[layer] = 1 + max((floor(d.split(".")[0]) for d in ALLOWED[layer]), default=0)
        return floors[layer]

    assert max(floor(layer) for layer in ALLOWED) <= MAX_FLOORS, floors

"""The floors of the house: data flows one way, and no module imports from a floor above its own.

    0  errors, devices, paths, atomic      1  encoders       2  indexer       3  retrieval
    4  evaluation (datasets, metrics shared by benchmarks and training)
    5  benchmarks | training (siblings: neither imports the other)       6  server (HTTP API)       7  cli

Every import counts, including the ones inside functions (they keep torch off the query path, but a
lazy import uphill is still uphill), and no two modules import each other, even through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR = {"__init__": 0, "errors": 0, "devices": 0, "paths": 0, "atomic": 0, "encoders": 1, "indexer": 2, "retrieval": 3,
         "evaluation": 4, "benchmarks": 5, "training": 5, "server": 6,
         "cli": 7}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {"tests", ".venv", "build"} or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(["simsearch", *parts])] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The simsearch modules `path` imports (`from simsearch.x import y` counts y if it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        found |= {n for n in names if n == "simsearch" or n.startswith("simsearch.")}
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_floor():
    assert {_package(m) for m in _modules()} <= set(FLOOR)


def test_no_import_runs_uphill_or_sideways():
    modules = _modules()
    bad = []
    for module, path in modules.items():
        mine = _package(module)
        for target in _imports(path, modules):
            theirs = _package(target)
            if theirs == mine or FLOOR[theirs] == 0 and FLOOR[mine] == 0:
                continue
            if FLOOR[theirs] >= FLOOR[mine]:
                bad.append(f"{module} (floor {FLOOR[mine]}) imports {target} (floor {FLOOR[theirs]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    modules = _modules()
    graph = {m: {t for t in _imports(p, modules) if t in modules and t != m} for m, p in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)

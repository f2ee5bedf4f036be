"""The import graph of `service/`, from the code's own import statements (Python's ast; nothing is imported or run).

    python scripts/import_graph.py            # the package graph, lowest layer first, and the checks
    python scripts/import_graph.py --modules  # every module-to-module edge

Every import counts, also the ones inside functions (a lazy import is still a dependency). Exits 1 when the graph
has a cycle between packages or between modules, when serving/ imports api/, or when anything but an entry point
imports gateway.py (the composition root).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "service"
# What may import the composition root: the commands and the offline tools (they run a gateway of their own).
ENTRY_POINTS = ("service.cli", "service.__main__", "service.offline")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            named = [prefix + "." + a.name for a in node.names]
            # `from . import x` depends on the submodule x, `from .x import y` on the module x itself.
            targets = [t for t in named if t in known] or [prefix]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith(PACKAGE + "."):
                found.add(target)
    return found


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layers(graph: dict[str, set[str]]) -> list[list[str]]:
    """Longest-path layering: a node sits one above the highest thing it imports (0: imports nothing inside)."""
    level: dict[str, int] = {}

    def depth(v: str, seen: frozenset[str] = frozenset()) -> int:
        if v not in level:
            below = [depth(w, seen | {v}) for w in graph.get(v, ()) if w not in seen]
            level[v] = 1 + max(below) if below else 0
        return level[v]

    for v in graph:
        depth(v)
    out: list[list[str]] = [[] for _ in range(max(level.values()) + 1)]
    for v, lv in level.items():
        out[lv].append(v)
    return [sorted(row) for row in out]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modules", action="store_true", help="print every module-to-module edge")
    args = ap.parse_args(argv)
    known = modules()
    graph = {m: imports(m, p, known) for m, p in known.items()}
    packages: dict[str, set[str]] = {}
    for m, targets in graph.items():
        src = package_of(m)
        packages.setdefault(src, set())
        packages[src] |= {package_of(t) for t in targets if package_of(t) != src and t != PACKAGE}
    packages.pop(PACKAGE, None)

    short = lambda name: name.removeprefix(PACKAGE + ".")  # noqa: E731
    if args.modules:
        for m in sorted(graph):
            for t in sorted(graph[m]):
                print(f"{short(m)} -> {short(t)}")
    else:
        print("layer  package: what it imports (lowest layer first)")
        for i, row in enumerate(layers(packages)):
            for p in row:
                deps = ", ".join(sorted(short(d) for d in packages[p])) or "-"
                print(f"{i:>5}  {short(p)}: {deps}")

    problems = []
    for c in cycles(packages):
        problems.append("package cycle: " + " <-> ".join(short(p) for p in c))
    for c in cycles(graph):
        problems.append("module cycle: " + " <-> ".join(short(m) for m in c))
    for m, targets in sorted(graph.items()):
        if m.startswith(PACKAGE + ".serving") and any(t.startswith(PACKAGE + ".api") for t in targets):
            problems.append(f"serving imports api: {short(m)}")
        if f"{PACKAGE}.gateway" in targets and not m.startswith(ENTRY_POINTS):
            problems.append(f"{short(m)} imports the composition root gateway.py")
    print("\n" + ("\n".join(problems) if problems else "no cycles; serving never imports api; only entry points "
                                                         "import gateway"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

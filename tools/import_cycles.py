"""List the import cycles among the modules of cfvit_deploy/, exporters/ and runtimes/.

Every import counts, function-local ones included (a lazy import only hides a cycle until the
function runs); imports under ``if TYPE_CHECKING:`` do not (they never run). The import graph comes
from grimp, the library import-linter is built on. Prints one cycle per strongly connected group of
modules (the shortest round trip through its first module, and the whole group) and exits 1 when
there is any, else 0.

    .venv/bin/python tools/import_cycles.py
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cfvit_deploy", "exporters", "runtimes")


def import_graph(packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules of `packages` it imports (anywhere in its code, TYPE_CHECKING aside)."""
    import grimp

    graph = grimp.build_graph(*packages, cache_dir=None, exclude_type_checking_imports=True)
    return {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that reach each other (Tarjan's algorithm, iterative), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                groups.append(sorted(group))
    return sorted(group for group in groups if len(group) > 1 or group[0] in graph[group[0]])


def round_trip(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """The shortest import path from the group's first module back to itself (breadth first)."""
    start, members = group[0], set(group)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{group} is not a cycle")


def find_cycles(packages: Iterable[str] = PACKAGES) -> list[tuple[list[str], list[str]]]:
    """(the modules, one closed import path through them) per group of modules that import each other."""
    graph = import_graph(packages)
    return [(group, round_trip(graph, group)) for group in strongly_connected(graph)]


def main() -> int:
    sys.path.insert(0, str(ROOT))  # the packages of this checkout, installed or not
    cycles = find_cycles()
    for group, cycle in cycles:
        print(f"{' -> '.join(cycle)}   (group: {', '.join(group)})")
    print(f"{len(cycles)} import cycle(s) among the modules of {', '.join(PACKAGES)}")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())

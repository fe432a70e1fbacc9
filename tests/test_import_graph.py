"""The package's import graph: no module reaches itself through its imports.

``lint-imports`` (``make lint``, contracts in pyproject.toml) checks the layers and that no
sibling modules or packages import each other in a circle. A circle through a package's
``__init__`` (a module importing its own package, whose ``__init__`` imports the module) is
not between siblings, so this test checks every module-level circle exactly. Imports inside
functions count: deferring one does not break a circle, it only hides it until run time.
"""

from __future__ import annotations

import pytest

grimp = pytest.importorskip("grimp")


def import_circles(imports: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each one a circle),
    iteratively (Tarjan), so deep import chains do not hit the recursion limit."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in sorted(imports):
        if root in index:
            continue
        work = [(root, iter(sorted(imports[root])))]
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
                    work.append((child, iter(sorted(imports.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert import_circles(graph) == [["a", "b", "c"]]
    assert import_circles({"p": {"p.x"}, "p.x": {"p"}}) == [["p", "p.x"]]


def test_act_plugin_has_no_import_circle():
    graph = grimp.build_graph("act_plugin")
    imports = {m: {i for i in graph.find_modules_directly_imported_by(m) if i in graph.modules} for m in graph.modules}
    assert import_circles(imports) == []

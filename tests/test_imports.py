"""The import graph of the package: no circle, every arrow points down the floors, and the library never
imports the command faces.

Every ``featinv.*`` import is collected, module-level AND function-level (a lazy import still ties
two modules together), by parsing each featinv/**/*.py with ``ast`` (nothing is imported). Package
``__init__`` edges count too: importing ``featinv.a.b`` runs ``featinv/a/__init__.py`` first, so it
is an edge to ``featinv.a`` as well (except from inside ``featinv.a``, which is loading already), and
``from featinv.a import b`` is an edge to ``featinv.a`` itself."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "featinv"
FACES = ("featinv.commands", "featinv.app")  # command-line and app faces: the library must not import them
# The floors of the house, lowest first: a module may import its own package and the packages on lower
# floors, never one beside it or above it. The leaves (floor 0) import only leaves. A new top-level module
# or package must be given its floor here.
FLOORS = {
    "featinv": 0, "featinv.registry": 0, "featinv.config": 0, "featinv.io": 0, "featinv.runtime": 0,
    "featinv.data": 0, "featinv.visualize": 0,
    "featinv.nets": 1,                                           # tensors in, tensors out
    "featinv.metrics": 2,                                        # scores over a backbone's outputs
    "featinv.diffusion": 3,                                      # schedule, samplers, guidance, reconstruction
    "featinv.checkpoint": 4,                                     # the only place that knows foreign keys
    "featinv.pair": 5, "featinv.testing": 5,                     # the one loader; random models for tests
    "featinv.training": 6, "featinv.jobs": 6, "featinv.analysis": 6,
    "featinv.demo": 7,                                           # uses training and the pair
    "featinv.app": 8,                                            # the explorer (a face)
    "featinv.commands": 9, "featinv.cli": 9,                     # the command line (commands/app.py serves the app)
    "featinv.__main__": 10,
}


def group(module: str) -> str:
    """featinv.a.b -> featinv.a (the top-level module or package a module belongs to)."""
    return ".".join(module.split(".")[:2])


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parents(module: str) -> set[str]:
    """featinv.a.b.c -> {featinv.a, featinv.a.b} (the packages whose __init__ runs first; not featinv itself)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(2, len(parts))}


def import_graph() -> dict[str, set[str]]:
    """module -> the featinv modules it imports (``from featinv.x import y`` counts as featinv.x, and
    featinv.x.y too when that is a module itself), with the package __init__ edges described above."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps, explicit = set(), set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("featinv")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("featinv"):
                explicit.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
        loading = parents(name) | ({name} if path.name == "__init__.py" else set())
        implicit = set().union(*(parents(d) for d in deps | explicit)) - loading
        graph[name] = (deps | explicit | implicit) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search with an on-stack mark)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_package_init_edges_are_seen():
    """A submodule importing its own package (``from featinv.app import panels``) while the package's
    __init__ imports a module that imports that submodule is a circle; the graph must show the edges."""
    graph = import_graph()
    assert "featinv.nets" in graph["featinv.pair"]  # importing featinv.nets.model runs featinv/nets/__init__.py
    assert "featinv.analysis" in graph["featinv.commands.steer"]


def test_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle():
    graph = import_graph()
    assert "featinv.config" in graph and "featinv.commands.reconstruct" in graph  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_arrow_points_down():
    graph = import_graph()
    assert set(map(group, graph)) <= set(FLOORS), f"give these a floor: {sorted(set(map(group, graph)) - set(FLOORS))}"
    upward = [f"{a} -> {b}" for a, deps in graph.items() for b in deps
              if group(a) != group(b) and FLOORS[group(b)] >= FLOORS[group(a)] and FLOORS[group(a)] > 0]
    assert not upward, "imports that do not point down: " + "; ".join(sorted(upward))
    sideways = [f"{a} -> {b}" for a, deps in graph.items() for b in deps if FLOORS[group(a)] == 0 and FLOORS[group(b)] > 0]
    assert not sideways, "leaves importing the house: " + "; ".join(sorted(sideways))


def test_floor_check_sees_a_planted_upward_arrow():
    graph = {"featinv.nets.model": {"featinv.diffusion.schedule"}}
    assert [(a, b) for a, deps in graph.items() for b in deps if FLOORS[group(b)] >= FLOORS[group(a)]]


def test_registry_and_config_sit_lowest_and_library_does_not_import_faces():
    graph = import_graph()
    assert graph["featinv.registry"] == set()
    assert graph["featinv.config"] <= {"featinv.registry"}
    for name, deps in graph.items():
        if name.startswith(FACES) or name == "featinv.cli":
            continue
        faces = sorted(d for d in deps if d.startswith(FACES))
        assert not faces, f"library module {name} imports {faces}"

"""The import graph of the package: no circle, and the library never imports the command faces.

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


def test_config_is_a_leaf_and_library_does_not_import_faces():
    graph = import_graph()
    assert graph["featinv.config"] == set()
    for name, deps in graph.items():
        if name.startswith(FACES) or name == "featinv.cli":
            continue
        faces = sorted(d for d in deps if d.startswith(FACES))
        assert not faces, f"library module {name} imports {faces}"

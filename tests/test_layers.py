"""Layers without circles: the ``gpuadam`` import graph, read from the source (imports inside
functions included), has no cycle, so data flows one way and each module can be read after the ones
it imports. Imports under ``if TYPE_CHECKING:`` are left out of the package-wide check (annotations
only), but ``bench`` keeps none that loop either."""

from __future__ import annotations

import ast
from pathlib import Path

import gpuadam

PACKAGE = Path(gpuadam.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's __init__)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = (path, is_package)
    return found


def _type_checking_only(tree: ast.AST) -> set[int]:
    """The ids of every node under an ``if TYPE_CHECKING:`` (its body, not its ``else``)."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING":
                inside.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return inside


def import_graph(with_type_checking: bool = False) -> dict[str, set[str]]:
    """Each ``gpuadam`` module -> the ``gpuadam`` modules it imports, at any depth of its code.
    ``from gpuadam import backends`` counts as importing ``gpuadam.backends``; ``from gpuadam import
    Adam`` as importing ``gpuadam`` (its ``__init__``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = set() if with_type_checking else _type_checking_only(tree)
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets.update(f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module
                               for a in node.names)
        deps = set()
        for target in targets:
            while target and target not in modules:  # gpuadam.kernels.rules.adam.X -> ...rules.adam
                target = target.rpartition(".")[0]
            if target and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
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
                    work.append((child, iter(sorted(graph[child]))))
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
                    found.append(sorted(component))
    return found


def test_the_graph_is_read():
    """The reader sees what is there: module-level, function-level and relative imports."""
    graph = import_graph()
    assert "gpuadam.bench.problems" in graph["gpuadam.bench.suite"]
    assert "gpuadam" in graph["gpuadam.bench.ours"]  # `import gpuadam` inside functions
    assert "gpuadam.backends" in graph["gpuadam.bench.report"]  # `from gpuadam import backends`
    assert "gpuadam.kernels.cupy_lowp" in graph["gpuadam.kernels.cupy_elementwise"]


def test_a_circle_is_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_gpuadam_modules():
    found = circles(import_graph())
    assert not found, "import circles (move what is shared down into the lower module): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_bench_has_no_circle_even_in_annotations():
    graph = import_graph(with_type_checking=True)
    bench = {k: {d for d in v if d.startswith("gpuadam.bench")} for k, v in graph.items()
             if k.startswith("gpuadam.bench")}
    assert circles(bench) == []


#: Each backend's compiled kernels, and who may import them: the backend object that runs them,
#: and the tools that compile or time them (``machine_code``, ``bench``). Everything else goes
#: through ``backends``.
BACKEND_KERNELS = {
    "gpuadam.kernels.numba_cpu": "numba-cpu",
    "gpuadam.kernels.numba_cuda": "numba-cuda",
    "gpuadam.kernels.cupy_elementwise": "cupy",
    "gpuadam.kernels.cupy_bookkeeping": "cupy",
}
MAY_IMPORT_KERNELS = ("gpuadam.backends", "gpuadam.machine_code", "gpuadam.bench")


def sideways(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a backend's kernels by a module that is not allowed to."""
    return sorted(f"{module} imports {kernels} ({BACKEND_KERNELS[kernels]}'s)"
                  for module, deps in graph.items() for kernels in deps & set(BACKEND_KERNELS)
                  if not module.startswith((*MAY_IMPORT_KERNELS, "gpuadam.kernels.")))


def test_no_module_outside_a_backend_imports_its_kernels():
    reaches = sideways(import_graph())
    assert not reaches, "backend-specific work goes through the backend object: " + "; ".join(reaches)


def test_a_sideways_reach_is_found():
    """The check above can fail: on_device reaching into Numba CUDA's kernels, as it once did."""
    graph = import_graph()
    graph["gpuadam.on_device"].add("gpuadam.kernels.numba_cuda")
    assert sideways(graph) == ["gpuadam.on_device imports gpuadam.kernels.numba_cuda (numba-cuda's)"]

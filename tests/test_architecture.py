"""mmprep's import graph: no cycle anywhere, and a lower layer never imports a higher one.

The graph is read from the source with `ast`, not by importing: an edge is every `import mmprep...` /
`from mmprep... import ...` in a module, wherever it stands — at the top, inside a function (a lazy
import hides a cycle but does not remove it), under `if TYPE_CHECKING:` (a type-only cycle still ties the
two modules together) or in a PEP 562 `__getattr__`. Relative imports are resolved. `from pkg import
name` is an edge to the submodule `pkg.name` when there is one (a .py file or a native extension),
else to `pkg`. The implicit edge from a submodule to its parent package (Python runs `pkg/__init__.py`
before `pkg/mod.py`) is not counted: otherwise every `__init__` that re-exports its submodules would be
a cycle with them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "mmprep"

# Layers, lowest first: a module may import its own layer and those below, never one above.
LAYERS: list[set[str]] = [
    {"version", "errors", "keys", "settings", "extras", "faults"},  # foundation: nothing of mmprep above it
    {"manifest", "fetch", "imaging"},  # the loading stages
    {"models"},
    {"store"},
    {"pipeline", "engines", "export", "serving"},  # runs of the stages; readers of the store
    {"report"},  # the terminal: progress bars and summaries
    {"cli", "__main__"},
]  # fmt: skip
ROOT_LAYER = 4  # `mmprep/__init__.py`: the public facade (cache_key, EmbeddingCache)


def modules(package: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package), for every .py file under `package`."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def native(name: str) -> bool:
    """Whether `name` is a native extension module of the package (its C source or a built library)."""
    folder = PACKAGE.parent.joinpath(*name.split(".")[:-1])
    leaf = name.rpartition(".")[2]
    return (folder / f"{leaf}.c").exists() or any(folder.glob(f"{leaf}.*.so"))


def import_graph(found: Mapping[str, tuple[Path, bool]], missing: list[str] | None = None) -> dict[str, set[str]]:
    """Module -> the mmprep modules it imports anywhere in its source (see the module docstring); each
    import of a module that does not exist is appended to `missing` as `importer: name`."""
    graph: dict[str, set[str]] = {name: set() for name in found}
    for name, (path, is_package) in found.items():
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
                named = targets
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parent + ([base] if base else []))
                named = [base]
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in found or native(sub) else base)
            else:
                continue
            for module in named:
                if module.split(".")[0] == "mmprep" and module not in found and missing is not None:
                    missing.append(f"{name}: {module}")
            for target in targets:
                if target.split(".")[0] != "mmprep" or native(target):
                    continue
                while target not in found:  # `import mmprep.store.index.x`: the longest known prefix
                    target = target.rpartition(".")[0]
                if target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
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


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    if not top:
        return ROOT_LAYER
    for level, names in enumerate(LAYERS):
        if top in names:
            return level
    raise AssertionError(f"{module}: not in any layer of tests/test_architecture.py (add it to LAYERS)")


def upward_imports(graph: Mapping[str, Iterable[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def test_the_cycle_finder_finds_cycles() -> None:
    """The checks below can fail: a two-module cycle, a longer one and a self-contained DAG."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}, "g": set()}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert upward_imports({"mmprep.errors": {"mmprep.cli.common"}}) == ["mmprep.errors -> mmprep.cli.common"]


def test_the_graph_sees_lazy_type_checking_relative_and_native_imports() -> None:
    graph = import_graph(modules())
    assert "mmprep.store.reader" in graph["mmprep"]  # PEP 562 __getattr__ in mmprep/__init__.py
    assert "mmprep.version" in graph["mmprep.fetch.fetcher"]
    assert all(not target.endswith("_resample") for targets in graph.values() for target in targets)
    assert len(graph) > 80


def test_no_import_cycle() -> None:
    assert cycles(import_graph(modules())) == []


def test_no_layer_imports_a_higher_one() -> None:
    assert upward_imports(import_graph(modules())) == []


def test_every_import_names_a_module_that_exists() -> None:
    """A relative import left behind by a move (`from .errors import ...` in a file moved one level down)
    names a module that is not there."""
    missing: list[str] = []
    import_graph(modules(), missing)
    assert missing == []


def test_the_foundation_imports_only_the_foundation() -> None:
    graph = import_graph(modules())
    for name in ("version", "errors", "keys", "settings", "extras", "faults"):
        assert {layer_of(target) for target in graph[f"mmprep.{name}"]} <= {0}, (name, graph[f"mmprep.{name}"])


def test_tests_share_one_cli_helper_and_one_http_server_and_import_no_test_module() -> None:
    """typer's CliRunner only in tests/_cli.py, http.server only in tests/_http.py, and no `import test_x`."""
    tests = REPO / "tests"
    found: list[str] = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                rel = path.relative_to(tests).as_posix()
                if name == "typer.testing" and rel != "_cli.py":
                    found.append(f"{rel}: {name} (use tests/_cli.py)")
                if name == "http.server" and rel != "_http.py":
                    found.append(f"{rel}: {name} (use tests/_http.py)")
                if name.split(".")[-1].startswith("test_"):
                    found.append(f"{rel}: imports the test module {name}")
    assert found == []

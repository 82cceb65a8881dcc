"""The import graph of training/: read from the source with `ast`, it must have no cycle, and the modules
import at the top of the file so that the graph can be read there.

Every import statement counts, also one inside a function (a cycle hidden in a function is still a cycle);
imports under `if TYPE_CHECKING:` do not (they never run). `python -m training` picks a command's module with
importlib, which is no import statement, so the dispatcher adds no edge.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "training"
# Modules whose job is to pick what to import: the command dispatcher of `python -m training benchmark` loads
# one runner module (and its client library) per run.
DISPATCHERS = {"training.benchmark.__main__"}
# Folders kept apart by their owners: the speed benchmark.
NOT_CHECKED_FOR_LATE_IMPORTS = ("training.speed",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def training_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _statements(tree: ast.AST):
    """(import statement, whether it sits inside a function) for every import that can run."""
    def visit(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            yield from visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
    yield from visit(tree, False)


def imported_modules(name: str, path: Path, statement: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The training modules `statement` (in module `name`) imports: `from pkg import sub` names the submodule."""
    if isinstance(statement, ast.Import):
        return {alias.name for alias in statement.names if alias.name in known}
    base = statement.module or ""
    if statement.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        package = package[:len(package) - (statement.level - 1)]
        base = ".".join(package + ([base] if base else []))
    found = {f"{base}.{alias.name}" for alias in statement.names if f"{base}.{alias.name}" in known}
    if base in known and len(found) < len(statement.names):
        found.add(base)
    return found


def module_imports(name: str, path: Path, known: set[str]) -> tuple[set[str], list[str]]:
    """(training modules `name` imports, 'line: statement' of its imports inside functions)."""
    imports: set[str] = set()
    late: list[str] = []
    for statement, in_function in _statements(ast.parse(path.read_text(), str(path))):
        imports |= imported_modules(name, path, statement, known) - {name}
        if in_function:
            late.append(f"{statement.lineno}: {ast.unparse(statement)}")
    return imports, late


def import_graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """(module -> training modules it imports, module -> its imports inside functions)."""
    modules = training_modules()
    graph: dict[str, set[str]] = {}
    late: dict[str, list[str]] = {}
    for name, path in modules.items():
        graph[name], lines = module_imports(name, path, set(modules))
        if lines:
            late[name] = lines
    return graph, late


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_import_graph_of_training_has_no_cycle():
    graph, _ = import_graph()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 60  # the graph was read, not found empty
    found = cycles(graph)
    assert not found, "import cycles in training/: " + "; ".join(" <-> ".join(c) for c in found)


def folder_of(module: str) -> str:
    """training.data.replica -> training.data; a top-level module (training.params) is its own folder."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (PACKAGE / parts[-1]).is_dir() else module


def test_the_folders_of_training_import_one_way():
    graph, _ = import_graph()
    folders: dict[str, set[str]] = {}
    for module, targets in graph.items():
        folders.setdefault(folder_of(module), set()).update(folder_of(t) for t in targets)
    for folder, targets in folders.items():
        targets.discard(folder)
    assert folders["training.run"] >= {"training.data", "training.models", "training.scoring"}  # read, not empty
    found = cycles(folders)
    assert not found, "import cycles between folders of training/: " + "; ".join(" <-> ".join(c) for c in found)


def test_training_modules_import_at_the_top_of_the_file():
    _, late = import_graph()
    checked = {name: lines for name, lines in late.items()
               if name not in DISPATCHERS and not name.startswith(NOT_CHECKED_FOR_LATE_IMPORTS)}
    assert not checked, "imports inside functions:\n" + "\n".join(
        f"  {name}:{line}" for name, lines in sorted(checked.items()) for line in lines)


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path):
    sources = {"a": "import p.b\n", "b": "def f():\n    from p import c\n", "c": "from . import a\n"}
    known = {f"p.{name}" for name in sources}
    graph = {}
    for name, text in sources.items():
        path = tmp_path / f"{name}.py"
        path.write_text(text)
        graph[f"p.{name}"], _ = module_imports(f"p.{name}", path, known)
    assert graph == {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}}
    assert cycles(graph) == [["p.a", "p.b", "p.c"]]

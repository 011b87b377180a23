"""The methods package imports like a tree: no cycle between its modules, and no import hidden in a
function or below the code (the registry is filled by ``methods/__init__.py``, not by import tricks)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "stylediffusion" / "methods"
PREFIX = "stylediffusion.methods."


def sibling_imports(path: Path, modules: set[str]) -> list[tuple[str, int]]:
    """(module of this package, line) for every import statement of ``path`` that names one."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:  # from . import a, b
                found += [(alias.name, node.lineno) for alias in node.names if alias.name in modules]
            elif node.level == 1:  # from .a import x
                found.append((node.module.split(".")[0], node.lineno))
            elif node.level == 0 and node.module and node.module.startswith(PREFIX):
                found.append((node.module[len(PREFIX):].split(".")[0], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name[len(PREFIX):].split(".")[0], node.lineno) for a in node.names if a.name.startswith(PREFIX)]
    return [(name, line) for name, line in found if name in modules]


def import_graph() -> dict[str, set[str]]:
    files = {p.stem: p for p in PACKAGE.glob("*.py")}
    return {name: {dep for dep, _ in sibling_imports(path, set(files))} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_methods_package_has_no_import_cycle():
    graph = import_graph()
    assert {"registry", "common", "builtin", "nulltext"} <= set(graph)
    assert "registry" in graph["builtin"]  # the parser sees the imports it should
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    # the shape this package had: the built-ins imported the other modules, which imported the registry,
    # which imported the built-ins to fill itself
    assert find_cycle({"registry": {"builtin"}, "builtin": {"npi"}, "npi": {"registry"}}) is not None


def test_imports_are_at_the_top_of_every_module():
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        first_code = next((k for k, n in enumerate(body) if not isinstance(n, (ast.Import, ast.ImportFrom))), len(body))
        late = [n.lineno for n in body[first_code:] if isinstance(n, (ast.Import, ast.ImportFrom))]
        nested = [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                  and n not in tree.body]
        assert not late and not nested, f"{path.name}: imports below the code (lines {late}) or inside it ({nested})"

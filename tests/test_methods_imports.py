"""The methods package imports like a tree: no cycle between its modules, and no import hidden in a
function or below the code (the registry is filled by ``methods/__init__.py``, not by import tricks).
The whole package's graph and late imports are checked by ``test_layers.py``, whose parser this reuses."""
import ast
from pathlib import Path

from tests.test_layers import find_cycle, import_graph

PACKAGE = Path(__file__).resolve().parent.parent / "stylediffusion" / "methods"
PREFIX = "stylediffusion.methods."


def methods_graph() -> dict[str, set[str]]:
    """The graph between the methods' own modules (``registry``, ``common``...)."""
    return {name[len(PREFIX):]: {dep[len(PREFIX):] for dep in deps if dep.startswith(PREFIX)}
            for name, deps in import_graph().items() if name.startswith(PREFIX)}


def test_the_methods_package_has_no_import_cycle():
    graph = methods_graph()
    assert {"registry", "common", "builtin", "nulltext"} <= set(graph)
    assert "registry" in graph["builtin"]  # the parser sees the imports it should
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_the_shape_this_package_had():
    # the built-ins imported the other modules, which imported the registry, which imported the built-ins
    # to fill itself
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

"""The package's layers point one way, read from the source with ``ast`` (nothing is imported):

- no cycle in the import graph of the package's own modules, imports inside functions counted too;
- no import inside a function: optional dependencies go through ``optional.load``, the one guarded place;
- no ``print`` in the library, and one logger per module, ``logging.getLogger(__name__)``.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "stylediffusion"

# The only dynamic imports: the optional dependencies, and the package's lazy ``StyleDiffusionEditor`` etc.
DYNAMIC_IMPORTS = {"stylediffusion.optional", "stylediffusion"}
# The one logger named otherwise: the command lines' handler for the whole package's messages.
PACKAGE_LOGGER = {"stylediffusion.runner"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node, name: str, is_package: bool) -> list[str]:
    """The modules an import statement of module ``name`` names (absolute, submodules resolved by the caller)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    target = ".".join(base + ([node.module] if node.module else []))
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def import_graph(trees: dict[str, ast.Module] | None = None) -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in its code (``from . import x`` of a submodule
    ``x`` is an edge to ``x``; of a name, an edge to the package). The package's lazy attributes
    (``stylediffusion._LAZY``) count as imports of ``stylediffusion``."""
    trees = modules() if trees is None else trees
    graph = {}
    for name, tree in trees.items():
        is_package = name.count(".") == 0 or any(  # a package's __init__
            other.startswith(name + ".") for other in trees)
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = imported(node, name, is_package)
                submodules = {n for n in names[1:] if n in trees}
                deps |= submodules if submodules and isinstance(node, ast.ImportFrom) else {names[0]}
                if isinstance(node, ast.ImportFrom) and len(submodules) < len(names) - 1:
                    deps.add(names[0])  # some names are attributes of the module itself
            if name == "stylediffusion" and isinstance(node, ast.Assign) and \
                    any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
                deps |= {"stylediffusion" + target for target in ast.literal_eval(node.value).values()}
        deps = {d if d in trees else _owner(d, trees) for d in deps if d.split(".")[0] == "stylediffusion"}
        graph[name] = deps - {name, None}
    return graph


def _owner(dotted: str, trees) -> str | None:
    while dotted and dotted not in trees:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


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


def imports_inside_functions(tree: ast.Module) -> list[tuple[int, list[str]]]:
    found = []

    def walk(node, inside):
        for child in ast.iter_child_nodes(node):
            if inside and isinstance(child, ast.Import):
                found.append((child.lineno, [a.name for a in child.names]))
            elif inside and isinstance(child, ast.ImportFrom):
                found.append((child.lineno, ["." * child.level + (child.module or "")]))
            walk(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    walk(tree, False)
    return found


def _absolute(name: str, module: str, is_package: bool) -> str:
    level = len(name) - len(name.lstrip("."))
    if not level:
        return name
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name.lstrip(".")] if name.lstrip(".") else []))


def calls(tree: ast.Module, *names: str) -> list[ast.Call]:
    """Calls of ``f(...)`` or ``x.f(...)`` for the given function names."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and
            ((isinstance(n.func, ast.Name) and n.func.id in names) or
             (isinstance(n.func, ast.Attribute) and n.func.attr in names))]


def runnable(tree: ast.Module) -> bool:
    """The module has an ``if __name__ == "__main__":`` block."""
    return any(isinstance(n, ast.If) and isinstance(n.test, ast.Compare) and isinstance(n.test.left, ast.Name)
               and n.test.left.id == "__name__" for n in tree.body)


# ----------------------------------------------------------------------------- the tests
def test_the_package_has_no_import_cycle_even_through_late_imports():
    graph = import_graph()
    assert {"stylediffusion.cli", "stylediffusion.api", "stylediffusion.methods.registry"} <= set(graph)
    # the parser sees the edges it should (relative, from-package, and the lazy attributes)
    assert "stylediffusion.errors" in graph["stylediffusion.files"]
    assert "stylediffusion.methods.registry" in graph["stylediffusion.methods.builtin"]
    assert "stylediffusion.api" in graph["stylediffusion.cli"]
    assert "stylediffusion.api" in graph["stylediffusion"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_surfaces_do_not_import_each_other():
    graph = import_graph()
    surfaces = {"stylediffusion.cli", "stylediffusion.app", "stylediffusion.convert_elite",
                "stylediffusion.bench.__main__"}
    for name, deps in graph.items():
        leaning = deps & (surfaces - {name})
        assert not leaning or name in ("stylediffusion.__main__", "stylediffusion.bench.__main__"), (name, leaning)
    assert "stylediffusion.cli" not in graph["stylediffusion.bench.__main__"] | graph["stylediffusion.bench.options"]


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    # the shapes this package had, hidden by imports inside functions
    assert find_cycle(import_graph({"stylediffusion": ast.parse(""),
                                    "stylediffusion.errors": ast.parse("def f():\n    from .files import x\n"),
                                    "stylediffusion.files": ast.parse("from .errors import UserError\n")}))


def test_no_import_inside_a_function_but_the_optional_dependencies():
    trees = modules()
    late = {}
    for name, tree in trees.items():
        is_package = any(other.startswith(name + ".") for other in trees)
        found = {(line, _absolute(m, name, is_package)) for line, ms in imports_inside_functions(tree) for m in ms}
        if found:
            found = sorted(found)
            late[name] = found
    assert not late, f"imports inside functions (import at the top, or through optional.load): {late}"
    dynamic = {name for name, tree in trees.items() if calls(tree, "import_module", "__import__")}
    assert dynamic <= DYNAMIC_IMPORTS, dynamic - DYNAMIC_IMPORTS


def test_the_optional_place_names_the_extras_of_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    tree = modules()["stylediffusion.optional"]
    missing = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "MISSING")
    for package, line in ast.literal_eval(missing.value).items():
        extra = line.split("[")[-1].split("]")[0]
        assert f'"{package}>=' in text.split("[project.optional-dependencies]")[1], package
        assert f"\n{extra} = [" in text, (package, extra)


def test_the_optional_place_says_which_extra_to_install(monkeypatch):
    import sys

    import pytest

    from stylediffusion import optional
    from stylediffusion.errors import UserError

    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'stylediffusion\[metrics\]'"):
        optional.load("torchmetrics")
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(UserError, match=r"pip install -e '.\[demo\]'"):
        optional.load("gradio")
    with pytest.raises(ValueError, match="not an optional dependency"):
        optional.load("torch")


def test_no_print_in_the_library():
    found = {name: [c.lineno for c in calls(tree, "print")] for name, tree in modules().items()}
    found = {name: lines for name, lines in found.items() if lines}
    assert not found, f"print in the library (use the module's logger): {found}"


def test_one_logger_per_module_named_after_it():
    for name, tree in modules().items():
        for call in calls(tree, "getLogger"):
            arg = call.args[0] if call.args else None
            own = isinstance(arg, ast.Name) and arg.id == "__name__"
            # a module also run with -m (its __name__ is then "__main__") names itself by __spec__.name
            own = own or (runnable(tree) and isinstance(arg, ast.Attribute) and arg.attr == "name"
                          and isinstance(arg.value, ast.Name) and arg.value.id == "__spec__")
            package = isinstance(arg, ast.Constant) and arg.value == "stylediffusion" and name in PACKAGE_LOGGER
            assert own or package, f"{name}:{call.lineno}: use logging.getLogger(__name__)"
        loggers = [n for n in tree.body if isinstance(n, ast.Assign) and calls(n, "getLogger")]
        assert len(loggers) <= 1 and all(t.id == "logger" for n in loggers for t in n.targets), name
        if any(isinstance(n, ast.Attribute) and n.attr in ("info", "warning") and isinstance(n.value, ast.Name)
               and n.value.id == "logger" for n in ast.walk(tree)):
            assert loggers, f"{name} logs without its module logger"

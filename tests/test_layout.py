"""The repository's shape (docs/conventions.md): scripts and research files at the top, machinery in one
package; no module imports an entry script, nothing imports in a circle, functions fit on a screen."""
import ast

import pytest

from conftest import ROOT

PACKAGE = "machinery"
MAX_TOP_LEVEL = 16
MAX_FUNCTION_LINES = 60


def parsed() -> dict[str, ast.Module]:
    """Every module of the repository by dotted name: `train`, `machinery.fast`."""
    files = {p.stem: p for p in ROOT.glob("*.py")}
    files |= {f"{PACKAGE}.{p.stem}": p for p in (ROOT / PACKAGE).glob("*.py") if p.stem != "__init__"}
    return {name: ast.parse(path.read_text(), str(path)) for name, path in files.items()}


MODULES = parsed()


def imported(name: str, tree: ast.Module) -> set[str]:
    """The repository's modules that `name` imports, wherever in it the import stands."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: inside the package
                base = ".".join(x for x in (PACKAGE, base) if x)
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return found & set(MODULES)


def is_entry(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)


def test_the_top_level_holds_at_most_16_python_files():
    assert len(list(ROOT.glob("*.py"))) <= MAX_TOP_LEVEL


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_an_entry_script(name):
    entries = {n for n, tree in MODULES.items() if is_entry(tree)}
    assert imported(name, MODULES[name]) & entries == set()


def test_the_package_imports_its_own_modules_relatively():
    def by_name(node) -> bool:
        if isinstance(node, ast.ImportFrom):
            return not node.level and (node.module or "").split(".")[0] == PACKAGE
        return isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names)

    absolute = [f"{name}:{node.lineno}" for name, tree in MODULES.items() if name.startswith(PACKAGE + ".")
                for node in ast.walk(tree) if by_name(node)]
    assert absolute == []


def test_nothing_imports_in_a_circle():
    graph = {name: imported(name, tree) - {name} for name, tree in MODULES.items()}
    done, path = set(), []

    def visit(name):
        assert name not in path, " -> ".join(path[path.index(name):] + [name])
        if name in done:
            return
        path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_functions_fit_on_a_screen():
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, tree in MODULES.items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
            and not node.name.startswith(("build_parser", "parse_args"))]
    assert long == []

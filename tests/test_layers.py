"""The shape of the code: imports go one way down. The command scripts sit on top and import no other command
script; the library modules below never import a command script, and their imports form no circle (lazy
imports inside functions included); the shared leaves import nothing of ours; pixels are read in one module."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = {"train", "predict", "export", "compare"}
LEAVES = {"errors", "files"}
MODULES = {path.stem: path for path in REPO.glob("*.py")}


def our_imports(path):
    """The modules of ours that `path` imports anywhere in it: at the top, in a function, `from x import y`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


def import_graph():
    return {name: our_imports(path) - {name} for name, path in MODULES.items()}


def test_the_command_scripts_are_the_ones_the_readme_names():
    assert ENTRY_SCRIPTS | LEAVES <= set(MODULES)


def test_no_command_script_imports_another():
    graph = import_graph()
    assert {name: graph[name] & ENTRY_SCRIPTS for name in ENTRY_SCRIPTS if graph[name] & ENTRY_SCRIPTS} == {}


def test_no_library_module_imports_a_command_script():
    graph = import_graph()
    library = set(MODULES) - ENTRY_SCRIPTS
    assert {name: graph[name] & ENTRY_SCRIPTS for name in library if graph[name] & ENTRY_SCRIPTS} == {}


def test_the_shared_leaves_import_nothing_of_ours():
    graph = import_graph()
    assert {name: graph[name] for name in LEAVES} == {name: set() for name in LEAVES}


def test_the_imports_form_no_circle():
    graph, done, path = import_graph(), set(), []

    def visit(name):  # depth first; a module met again on the current path closes a circle
        if name in path:
            return path[path.index(name) :] + [name]
        if name in done:
            return None
        path.append(name)
        for other in sorted(graph[name]):
            circle = visit(other)
            if circle:
                return circle
        path.pop()
        done.add(name)
        return None

    circles = [circle for name in sorted(graph) if (circle := visit(name))]
    assert circles == []


def test_a_circle_is_found_when_there_is_one(monkeypatch):
    # the check above can fail: two modules importing each other are a circle
    graph = {"a": {"b"}, "b": {"a"}}
    monkeypatch.setattr("test_layers.import_graph", lambda: graph)
    monkeypatch.setattr("test_layers.MODULES", {"a": None, "b": None})
    try:
        test_the_imports_form_no_circle()
    except AssertionError:
        return
    raise AssertionError("a circle a -> b -> a went unnoticed")


def test_only_the_images_module_opens_image_files():
    opening = {name for name, path in MODULES.items() if "Image.open(" in path.read_text(encoding="utf-8")}
    assert opening == {"images"}


def test_every_module_says_what_it_is_for_in_its_first_line():
    undocumented = [name for name, path in MODULES.items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert undocumented == []


def test_train_py_stays_readable():
    source = (REPO / "train.py").read_text(encoding="utf-8")
    main = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert len(source.splitlines()) <= 900
    assert main.end_lineno - main.lineno + 1 < 110
    too_long = {name: len(p.read_text().splitlines()) for name, p in MODULES.items() if name != "train"}
    assert {name: n for name, n in too_long.items() if n > 800} == {}

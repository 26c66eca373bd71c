"""The layout: scripts are thin entry points over library modules, and no module imports a script.

The import graph is read from the source (every import statement, a lazy one inside a
function too), not by importing: a module that imports a script, or a cycle anywhere, fails
whether or not the import runs. Tests are not part of the graph: they may import scripts.
"""
import ast
import subprocess
import sys

from conftest import ROOT

# The entry points (SPEC section 1); every other top-level module is library.
SCRIPTS = ("train", "main", "base_test", "audit", "feature_extraction", "tsne_vis", "wasserstein", "mask_vis",
           "bench", "tune")
MAIN_MAX_LINES = 300


def modules():
    return {p.stem: p for p in sorted(ROOT.glob("*.py"))}


def imports(path, known):
    """The repository modules that `path` imports anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(known)


def graph():
    known = modules()
    return {name: imports(path, known) for name, path in known.items()}


def cycle(edges):
    """One import cycle as [a, b, ..., a], or None."""
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        state[m] = "done"
        path.pop()
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_scripts_exist_and_the_library_is_there():
    known = modules()
    assert {"train", "main", "base_test", "audit", "bench"} <= set(known)
    assert set(known) - set(SCRIPTS), "no library modules"


def test_no_module_imports_a_script():
    wrong = [f"{m} imports the script {s}" for m, deps in graph().items() for s in sorted(deps & set(SCRIPTS))]
    assert not wrong, "; ".join(wrong)


def test_the_import_graph_has_no_cycle():
    found = cycle(graph())
    assert found is None, "import cycle: " + " -> ".join(found)


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_main_stays_a_thin_script():
    lines = len((ROOT / "main.py").read_text().splitlines())
    assert lines <= MAIN_MAX_LINES, f"main.py has {lines} lines (at most {MAIN_MAX_LINES})"


def test_import_main_loads_no_other_script():
    """As Python runs it: `import main` brings in library modules only."""
    r = subprocess.run([sys.executable, "-c", "import sys, main; print(*sorted(sys.modules))"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.split()) & set(SCRIPTS) == {"main"}

"""The layout of the repository: imports flow one way, and it stands alone (it cites papers and the
authors' repositories, never notes that a user's clone does not have)."""
import ast
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_FILES = ("galdv1", "galdv2", "denoised_nl", "specialize_fuse", "hier_ms_attn")


def project_modules():
    """module name -> path of every project module (top-level files and tools/), tests excluded."""
    modules = {name[:-3]: os.path.join(ROOT, name) for name in os.listdir(ROOT)
               if name.endswith(".py") and not name.startswith("test_")}
    tools = os.path.join(ROOT, "tools")
    modules.update({f"tools.{name[:-3]}": os.path.join(tools, name) for name in os.listdir(tools)
                    if name.endswith(".py") and name != "__init__.py"})
    return modules


def imports_of(path, modules):
    """The project modules that the file at `path` imports, anywhere in it (function bodies too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def import_graph():
    modules = project_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def test_the_project_modules_are_what_the_readme_lists():
    assert set(project_modules()) == {"common", "train", *METHOD_FILES, "tools.costs", "tools.predict",
                                      "tools.boundary_f", "tools.sampling", "tools.convert_nvidia",
                                      "tools.paper_costs", "tools.crash_safety", "tools.levels",
                                      "tools.gpu_check", "tools.carried_flags",
                                      "tools.progress", "tools.check_data"}


def test_imports_flow_one_way():
    """method files -> common (and the method files they build on); tools -> common (and each
    other); only train.py imports the methods and the tools; nothing imports train.py."""
    graph = import_graph()
    assert graph["common"] == set()
    for name, imported in graph.items():
        assert "train" not in imported, f"{name} imports train.py"
        if name in METHOD_FILES:
            assert imported <= {"common", *METHOD_FILES}, f"{name} imports {imported}"
        if name.startswith("tools."):
            assert imported <= {"common"} | {m for m in graph if m.startswith("tools.")}, f"{name} imports {imported}"


def names_from_common(path):
    """The names a file takes from common.py: `from common import X` and `common.X`."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module == "common":
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "common":
            names.add(node.attr)
    return names


def test_no_method_reads_below_commons_data_half_divider():
    """common.py's docstring tells a reader of a method to stop at "THE DATA HALF": no method file
    may take a name defined below it."""
    path = os.path.join(ROOT, "common.py")
    text = open(path).read()
    divider = text[:text.index("# THE DATA HALF")].count("\n") + 1
    data_half = set()
    for node in ast.parse(text).body:
        if node.lineno > divider:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                data_half.add(node.name)
            elif isinstance(node, ast.Assign):
                data_half.update(t.id for t in node.targets if isinstance(t, ast.Name))
    assert "build_datasets" in data_half and "SegModel" not in data_half
    for name in METHOD_FILES:
        used = names_from_common(os.path.join(ROOT, f"{name}.py")) & data_half
        assert not used, f"{name}.py reads the data half of common.py: {sorted(used)}"


def cycle_in(graph):
    """One import cycle of `graph` as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_there_is_no_import_cycle():
    assert cycle_in(import_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": set()}) is None


def tracked_files():
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [os.path.join(ROOT, f) for f in listed.splitlines()]
    except (OSError, subprocess.CalledProcessError):                   # not a git checkout
        return [os.path.join(d, f) for d, _, fs in os.walk(ROOT) if ".git" not in d for f in fs]


# written in pieces so that this file does not match itself
PRIVATE_NOTES = ("../" + "shared", "DECISIONS" + ".md", "official_code" + ".md")


def test_no_file_points_at_notes_a_clone_does_not_have():
    offenders = []
    for path in tracked_files():
        if not os.path.isfile(path):
            continue
        with open(path, errors="replace") as f:
            text = f.read()
        offenders += [f"{os.path.relpath(path, ROOT)}: {note}" for note in PRIVATE_NOTES if note in text]
    assert not offenders, offenders

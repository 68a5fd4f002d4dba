"""The project's shape (issue 19): the root holds the five concept modules and the scripts a user runs, the
plumbing lives in folders named for what it holds, no module imports train.py, and no two project modules import
each other, directly or around a cycle, at the top or inside a function (read from the source with `ast`)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONCEPTS = {"sde.py", "rewards.py", "curriculum.py", "trust_region.py", "grpo.py"}
SCRIPTS = {"train.py", "sample.py", "evaluate.py", "reward_server.py"}
FOLDERS = ("models", "reward_models", "training", "bench", "toy")


def project_modules() -> dict[str, str]:
    """{dotted module name: path} of every project module (the root's and the folders'), tests excluded."""
    found = {name[:-3]: os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")}
    for folder in FOLDERS:
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith(".py") and name != "__init__.py":
                found[f"{folder}.{name[:-3]}"] = os.path.join(ROOT, folder, name)
    return found


def imports(path: str, modules: dict) -> set[str]:
    """The project modules `path` imports anywhere in its source (`import x`, `from x import y`, `from pkg import
    x` where x is a module of pkg)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in modules:
                out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    return out


def test_the_root_holds_the_concepts_and_the_scripts_only():
    assert {n for n in os.listdir(ROOT) if n.endswith(".py")} == CONCEPTS | SCRIPTS


def test_no_module_imports_train_py():
    modules = project_modules()
    importers = [name for name, path in modules.items() if "train" in imports(path, modules)]
    assert importers == [], f"{importers} import train.py; move what they need to a module of its own"


def test_no_import_cycle():
    modules = project_modules()
    graph = {name: imports(path, modules) - {name} for name, path in modules.items()}
    # Depth-first search for a back edge; report the cycle's modules in order.
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert graph["training.checkpoint"] >= {"training.export"}  # the guard sees real edges (one known one)


def test_train_py_and_the_readme_stay_short():
    with open(os.path.join(ROOT, "train.py")) as f:
        assert len(f.read().splitlines()) <= 450
    assert os.path.getsize(os.path.join(ROOT, "README.md")) <= 25_000

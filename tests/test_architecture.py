"""The package's layers (docs/architecture.md): imports only point down, there is no import circle, and no
isoconv module is imported inside a function (the usual way to hide a circle). A deferred import (isoconv.lazy:
`lazy_module`, `lazy_function`, `lazy_exports`) is declared at a module's top level and counts as an import of
every isoconv module it names: the same rules apply to it."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "isoconv"

# component (first part of the module path) -> layer; a module may import its own component and lower layers
LAYERS = {"fileio": 1, "errors": 1, "augment": 1, "malloc_tuning": 1, "lazy": 1, "zoo": 1, "formats": 1,
          "config": 2, "runtime": 2, "rundir": 2,
          "data": 3, "models": 3,
          "weights": 4,
          "eval": 5,
          "train": 6,
          "experiments": 7, "bench": 7, "doctor": 7, "interop": 7,
          "cli": 8, "__main__": 8, "__init__": 8}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def component(module: str) -> str:
    return module.split(".")[0]


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def resolve(path: Path, node: ast.ImportFrom) -> list[str]:
    """The isoconv modules an `from ... import ...` statement loads (package-relative names)."""
    if node.level == 0:
        if not (node.module or "").startswith("isoconv"):
            return []
        base = (node.module or "").split(".")[1:]
    else:
        here = module_name(path).split(".") if module_name(path) != "__init__" else []
        package = here if is_package(path) else here[:-1]
        base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    targets = []
    for alias in node.names:
        candidate = base + [alias.name]
        exists = (PACKAGE.joinpath(*candidate).with_suffix(".py").is_file() or
                  PACKAGE.joinpath(*candidate, "__init__.py").is_file())
        targets.append(".".join(candidate if exists else base) or "__init__")
    return targets


LAZY_IMPORTS = ("lazy_module", "lazy_function", "lazy_exports")


def deferred(node: ast.AST) -> list[str]:
    """The isoconv modules a call of isoconv.lazy names (package-relative), [] for any other node."""
    if not (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in LAZY_IMPORTS):
        return []
    return [c.value[len("isoconv."):] for c in ast.walk(node)
            if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value.startswith("isoconv.")]


def imports():
    """(importer, imported, is_top_level, line) for every import of an isoconv module, deferred ones included (a
    deferred import is top-level when it is declared in a top-level statement)."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        declared = set()  # nodes run at import time: not inside a function
        stack = list(tree.body)
        while stack:
            node = stack.pop()
            declared.add(id(node))
            stack += [c for c in ast.iter_child_nodes(node)
                      if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
        for node in ast.walk(tree):
            out += [(module_name(path), target, id(node) in declared, node.lineno) for target in deferred(node)]
            if isinstance(node, ast.ImportFrom):
                for target in resolve(path, node):
                    out.append((module_name(path), target, id(node) in top, node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("isoconv"):
                        out.append((module_name(path), alias.name[8:] or "__init__", id(node) in top, node.lineno))
    return out


def test_every_component_has_a_layer():
    components = {component(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert components <= set(LAYERS), components - set(LAYERS)


def test_imports_point_down_and_sit_at_the_top():
    problems = []
    for importer, imported, top_level, line in imports():
        mine, theirs = component(importer), component(imported)
        if not top_level:
            problems.append(f"{importer}:{line} imports isoconv.{imported} inside a function")
        elif mine != theirs and LAYERS[theirs] > LAYERS[mine]:
            problems.append(f"{importer}:{line} (layer {LAYERS[mine]}) imports {imported} (layer {LAYERS[theirs]})")
    assert problems == []


def test_the_checks_see_what_they_check():
    edges = {(a, b) for a, b, _, _ in imports()}
    assert ("train.loop", "train.setup") in edges and ("weights.meta", "models") in edges
    assert ("cli", "train") in edges and ("data.load", "config") in edges
    assert ("models", "models.registry") in edges  # a deferred import (lazy_exports)


def test_no_import_circle():
    graph = {}
    for importer, imported, _, _ in imports():
        if imported != importer:
            graph.setdefault(importer, set()).add(imported)
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in list(graph):
        if node not in state:
            visit(node, [node])
    assert len(graph) > 30  # the walk saw the package

"""The shape of the code base: the library has no import cycle (lazy imports inside functions included), and
train.py / sample.py are thin scripts that nothing imports (the library, tests, benchmarks, tutorials)."""
import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "invdiff_min"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every invdiff_min module `path` imports, anywhere in the file (top level or inside a function). `from . import
    x` counts as an import of the submodule x when there is one, else of the package itself."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "invdiff_min"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "invdiff_min":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & modules
            found |= subs if subs else {target}
            if subs and len(subs) < len(node.names):
                found.add(target)
    return {m for m in found if m in modules and m != name}


def test_the_library_has_no_import_cycle():
    files = sorted(LIBRARY.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph = {module_name(f): imports_of(f, modules) for f in files}
    assert graph["invdiff_min.pipeline"] >= {"invdiff_min.groups", "invdiff_min.guidance"}   # the parser works
    state: dict[str, int] = {}                      # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def code_sources() -> dict[str, str]:
    """Every Python source of the repository except the two scripts, with the notebooks' code cells."""
    sources = {str(p.relative_to(ROOT)): p.read_text()
               for folder in ("invdiff_min", "tests", "benchmarks", "tutorials") for p in (ROOT / folder).rglob("*.py")}
    for nb in (ROOT / "tutorials").glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        sources[str(nb.relative_to(ROOT))] = "\n".join(line for cell in code for line in cell.splitlines()
                                                        if not line.lstrip().startswith(("%", "!")))
    return sources


def test_nothing_imports_the_scripts():
    for name, text in code_sources().items():
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not {"train", "sample"} & {n.split(".")[0] for n in names if n}, f"{name} imports a script"


def test_the_scripts_stay_thin():
    for script, most in (("train.py", 250), ("sample.py", 250)):
        lines = len((ROOT / script).read_text().splitlines())
        assert lines <= most, f"{script} has {lines} lines; move library logic into invdiff_min/"

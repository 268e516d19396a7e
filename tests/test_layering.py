"""The package's shape, guarded: imports point one way, no import cycles, config stays in the apps, modules stay small.

Layers, lowest first (docs/design.md): a module may import its own layer and the layers below it, never above.

    core       refiner, errors, settings, io, batching, cli
    math       diffusion, sampling, experts, metrics
    models     refiner.models
    formats    refiner.formats
    data       refiner.data
    artifacts  refiner.artifacts
    inference  refiner.inference
    lit, bench refiner.lit and refiner.bench (same layer, but neither imports the other)
    apps       refiner.apps and every ``__main__`` module (entry points)

Every ``refiner.*`` import sits at the top of its module (or under ``if TYPE_CHECKING:``), so the graph this test reads
is the real one: an import placed inside a function to dodge a cycle fails here. The one exception is an
``if __name__ == "__main__":`` block, which may import from ``refiner.apps`` (it makes a module runnable with
``python -m``). Third-party packages that are optional or slow to import (diffusers, peft, safetensors, scipy) may be
imported lazily; this test does not look at them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "refiner"
MAX_LINES = 500

LAYERS = [
    ("core", ("refiner", "refiner.errors", "refiner.settings", "refiner.io", "refiner.batching", "refiner.cli",
              "refiner.progress")),
    ("math", ("refiner.diffusion", "refiner.sampling", "refiner.experts", "refiner.metrics")),
    ("models", ("refiner.models",)),
    ("formats", ("refiner.formats",)),
    ("data", ("refiner.data",)),
    ("artifacts", ("refiner.artifacts",)),
    ("inference", ("refiner.inference",)),
    ("lit", ("refiner.lit",)),
    ("bench", ("refiner.bench",)),
    ("apps", ("refiner.apps", "refiner.export")),
]
RANK = {"core": 0, "math": 1, "models": 2, "formats": 3, "data": 4, "artifacts": 5, "inference": 6, "lit": 7,
        "bench": 7, "apps": 8}
CONFIG_LIBRARIES = ("omegaconf", "hydra")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str:
    if module.split(".")[-1] == "__main__":
        return "apps"
    best = None
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if module == prefix or (prefix != "refiner" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > len(best[1]):
                    best = (name, prefix)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS in {__file__}"
    return best[0]


def _is_guard(node: ast.If, text: str) -> bool:
    return text in ast.unparse(node.test)


def imports_of(path: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[tuple[str, int]]]:
    """(top-level refiner imports, refiner imports anywhere else, config-library imports): (module, line)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top, nested, config = [], [], []
    allowed_ids: set[int] = set()  # nodes under TYPE_CHECKING count as top level; under __main__ they may import apps
    main_ids: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and _is_guard(node, "TYPE_CHECKING"):
            allowed_ids.update(id(n) for n in ast.walk(node))
        if isinstance(node, ast.If) and _is_guard(node, "__main__"):
            main_ids.update(id(n) for n in ast.walk(node))
    top_ids = {id(n) for n in tree.body} | allowed_ids
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "refiner":  # from refiner import x: x may be a submodule
                names = [f"refiner.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in CONFIG_LIBRARIES:
                config.append((name, node.lineno))
            if name != "refiner" and not name.startswith("refiner."):
                continue
            if id(node) in top_ids:
                top.append((name, node.lineno))
            elif id(node) in main_ids and name.startswith("refiner.apps"):
                continue
            else:
                nested.append((name, node.lineno))
    return top, nested, config


def resolve(name: str, modules: set[str]) -> str:
    """The module an import names (``from refiner.x import y`` imports module ``refiner.x``)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_refiner_import_is_at_the_top_of_its_module():
    found = []
    for module, path in package_modules().items():
        _, nested, _ = imports_of(path)
        found += [f"{path.relative_to(ROOT)}:{line} imports {name} inside a function" for name, line in nested]
    assert not found, "\n".join(found)


def test_imports_point_down_the_layers():
    modules = package_modules()
    names = set(modules)
    found = []
    for module, path in modules.items():
        mine = layer_of(module)
        top, _, _ = imports_of(path)
        for name, line in top:
            target = layer_of(resolve(name, names))
            upward = RANK[target] > RANK[mine]
            sideways = RANK[target] == RANK[mine] and target != mine  # lit <-> bench
            if upward or sideways:
                found.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {name} ({target})")
    assert not found, "imports that point up or across the layers:\n" + "\n".join(found)


def test_no_import_cycles():
    modules = package_modules()
    names = set(modules)
    graph = {m: sorted({resolve(n, names) for n, _ in imports_of(p)[0]} - {m}) for m, p in modules.items()}
    # a package's __init__ importing its own submodules is not a cycle worth refusing; everything else is
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph.get(m, []):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_only_the_apps_read_config():
    found = []
    for module, path in package_modules().items():
        if layer_of(module) == "apps":
            continue
        found += [f"{path.relative_to(ROOT)}:{line} imports {name}" for name, line in imports_of(path)[2]]
    assert not found, "the library takes typed settings; only refiner/apps reads Hydra config:\n" + "\n".join(found)


def test_no_module_is_longer_than_the_limit():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(long)


def test_the_layer_rules_catch_what_they_claim(tmp_path):
    """The checks above would fail on an upward import, a nested import and a cycle (run on a scratch package)."""
    global ROOT, PACKAGE
    saved = ROOT, PACKAGE
    pkg = tmp_path / "refiner"
    (pkg / "data").mkdir(parents=True)
    (pkg / "inference").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "inference" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("from refiner.inference.b import x\n")  # upward
    (pkg / "inference" / "b.py").write_text("from refiner.data.a import y\n"  # closes a cycle
                                            "def f():\n    from refiner.data import a\n")  # nested
    ROOT, PACKAGE = tmp_path, pkg
    try:
        for check in (test_imports_point_down_the_layers, test_no_import_cycles,
                      test_every_refiner_import_is_at_the_top_of_its_module):
            try:
                check()
            except AssertionError:
                continue
            raise AssertionError(f"{check.__name__} passed on a package that breaks it")
    finally:
        ROOT, PACKAGE = saved

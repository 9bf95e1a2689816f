"""The packages follow the one-way flow: no module imports from a later stage.

    top level (settings, files, flat_tree, wavelength_grids)
      -> data/ -> models/ -> training/ -> evaluation/ -> serving/

Every `import` and `from ... import` in the package is read with `ast` (those inside functions
too: a lazy import is still a dependency). The core package also never imports torch or
TensorFlow (only `converters/`, tests and benchmarks may), and no modules import each other in a
circle, within a stage or across it (`graphlib` finds one if there is).
"""

import ast
import graphlib
import os

import pytest

PACKAGE = "astroclip_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)
STAGES = {"": 0, "data": 1, "models": 2, "training": 3, "evaluation": 4, "serving": 5}
FORBIDDEN = ("torch", "torchvision", "tensorflow", "spender")


def stage_of(module: str) -> int:
    """Stage of a module name inside the package ("astroclip_jax.models.heads" -> 2)."""
    parts = module.split(".")
    if len(parts) >= 3 or (len(parts) == 2 and parts[1] in STAGES):
        sub = parts[1]
        if sub not in STAGES:
            raise AssertionError(f"{module}: a subpackage that is not a stage: add it to STAGES")
        return STAGES[sub]
    return 0  # astroclip_jax.<top-level module>


def from_module(node: ast.ImportFrom, module: str) -> str:
    """The absolute name of the module a `from ... import` in `module` reads from."""
    if not node.level:
        return node.module
    package_parts = module.split(".")[:-1]  # relative: resolve against this module's package
    base = ".".join(package_parts[:len(package_parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source` (module `module`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            name = from_module(node, module)
            found.append((node.lineno, name))
            # `from astroclip_jax import training` imports the subpackage itself.
            if name == PACKAGE:
                found += [(node.lineno, f"{PACKAGE}.{alias.name}") for alias in node.names]
    return found


def violations(source: str, module: str) -> list[str]:
    """What in `source` breaks the one-way flow or imports a forbidden framework."""
    own = stage_of(module)
    bad = []
    for line, name in imported_modules(source, module):
        top = name.split(".")[0]
        if top in FORBIDDEN:
            bad.append(f"{module}:{line} imports {name} (the core package must not)")
        elif top == PACKAGE and name != PACKAGE and stage_of(name) > own:
            bad.append(f"{module}:{line} imports {name}, a later stage")
    return bad


def package_modules():
    for folder, _, names in os.walk(ROOT):
        for name in sorted(names):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                yield path, rel.removesuffix(".__init__")


def test_no_module_imports_from_a_later_stage():
    bad = []
    modules = list(package_modules())
    assert len(modules) > 30  # the walk found the package
    for path, module in modules:
        with open(path, encoding="utf-8") as f:
            bad += violations(f.read(), module)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module, source", [
    ("astroclip_jax.models.heads", "from astroclip_jax.training import losses"),
    ("astroclip_jax.data.pipeline", "def f():\n    from astroclip_jax.models import astroclip"),
    ("astroclip_jax.training.steps", "from astroclip_jax import evaluation"),
    ("astroclip_jax.settings", "import astroclip_jax.data.pipeline"),
    ("astroclip_jax.models.resnet", "from ..training import steps"),
    ("astroclip_jax.evaluation.knn", "import torch"),
])
def test_the_check_catches_each_kind_of_violation(module, source):
    assert violations(source, module)


def test_the_check_allows_the_flow():
    assert not violations("from astroclip_jax.data import preprocess\nfrom ..models import heads\n"
                          "from astroclip_jax import settings", "astroclip_jax.training.steps")


def module_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """{module: the package modules it imports} for `sources` ({module: its source}).
    `from a.b import c` is an edge to the module a.b.c when there is one, else to a.b."""
    graph = {}
    for module, source in sources.items():
        edges = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name in sources}
            elif isinstance(node, ast.ImportFrom):
                name = from_module(node, module)
                for alias in node.names:
                    target = f"{name}.{alias.name}"
                    edges.add(target if target in sources else name)
        graph[module] = {m for m in edges if m in sources and m != module}
    return graph


def import_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports (a, b, ..., a), or None."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        return list(reversed(err.args[1]))  # graphlib lists it against the import direction
    return None


def _package_sources() -> dict[str, str]:
    sources = {}
    for path, module in package_modules():
        with open(path, encoding="utf-8") as f:
            sources[module] = f.read()
    return sources


def test_no_modules_import_each_other_in_a_circle():
    sources = _package_sources()
    graph = module_graph(sources)
    # The graph is the real one (`from pkg import module` and `from module import name`).
    assert "astroclip_jax.evaluation.runner" in graph["astroclip_jax.evaluation.embed"]
    assert "astroclip_jax.errors" in graph["astroclip_jax.evaluation.runner"]
    circle = import_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


@pytest.mark.parametrize("sources", [
    {"astroclip_jax.evaluation.embed": "from astroclip_jax.evaluation import runner",
     "astroclip_jax.evaluation.runner": "def f():\n    from astroclip_jax.evaluation import embed"},
    {"astroclip_jax.data.a": "from . import b",
     "astroclip_jax.data.b": "import astroclip_jax.data.c",
     "astroclip_jax.data.c": "from astroclip_jax.data.a import thing"},
    {"astroclip_jax.files": "from astroclip_jax import locks",
     "astroclip_jax.locks": "from astroclip_jax.files import atomic_path"},
])
def test_the_circle_check_finds_each_kind_of_circle(sources):
    circle = import_circle(module_graph(sources))
    assert circle is not None and circle[0] == circle[-1] and set(circle) == set(sources)


def test_the_circle_check_allows_a_one_way_chain():
    assert import_circle(module_graph({
        "astroclip_jax.evaluation.embed": "from astroclip_jax.evaluation import runner",
        "astroclip_jax.evaluation.runner": "from astroclip_jax.evaluation import embeddings",
        "astroclip_jax.evaluation.embeddings": "import numpy"})) is None

"""The layers import one way: core → nothing of ours but core; io → core; plugins → core; tasks
→ core, io, plugins; flows → tasks, runtime; cli → flows, io, plugins. Third-party rules: core
imports no prefect, zarr, tensorstore or fsspec."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "voxflow"

ALLOWED = {
    "core": {"core"},
    "io": {"io", "core"},
    "plugins": {"plugins", "core"},
    "tasks": {"tasks", "core", "io", "plugins"},
    "runtime": {"runtime", "settings"},
    "flows": {"flows", "tasks", "runtime", "settings"},
    "settings": {"settings"},
    "cli": {"cli", "flows", "io", "plugins", "runtime", "settings"},
}
FORBIDDEN_IN_CORE = {"prefect", "prefect_dask", "zarr", "tensorstore", "fsspec", "gcsfs"}


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _layer(p) != "__init__")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    layer = _layer(path)
    assert layer in ALLOWED, f"{path} is in no known layer"
    for name in _imports(path):
        top, _, rest = name.partition(".")
        if top == "voxflow" and rest:
            target = rest.split(".")[0]
            assert target in ALLOWED[layer], f"{path}: {layer} must not import {name}"
        if layer == "core":
            assert top not in FORBIDDEN_IN_CORE, f"{path}: core must not import {name}"


def test_the_walk_sees_every_layer():
    assert {_layer(p) for p in MODULES} >= {"core", "io", "tasks", "flows", "runtime", "cli"}

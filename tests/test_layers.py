"""The layers import one way: core → nothing of ours but core; io → core; plugins → core; tasks
→ core, io, plugins; flows → tasks, runtime; cli → flows, io, plugins. Third-party rules: core
imports no prefect, zarr, tensorstore or fsspec."""

import ast
import subprocess
import sys
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


def test_the_command_loads_no_stage_until_one_runs():
    # `voxflow --help` and the command's start stay quick: the stages' heavy dependencies
    # load only when a command that uses them runs.
    code = (
        "import sys, voxflow.cli; "
        "print(sorted(m for m in ('torch', 'prefect', 'dask', 'tensorstore', 'numba') "
        "if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)  # fmt: skip
    assert result.stdout.strip() == "[]"


def test_every_flow_name_resolves():
    import voxflow.flows as flows

    for name in flows.__all__:
        assert getattr(flows, name) is not None
    assert set(flows.__all__) <= set(dir(flows))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        flows.nope  # noqa: B018

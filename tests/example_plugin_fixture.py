"""A session fixture that installs the example plugin package (tests/example_plugin).

The package is built from a copy (so that no build files land in the source tree) and
installed with pip into a temporary directory, never into the environment itself; the
directory goes on ``sys.path`` for the session, and a subprocess can put it on PYTHONPATH.
"""

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE_PLUGIN = Path(__file__).resolve().parent / "example_plugin"
EXAMPLE_MODULE = "voxflow_example_plugin"


def _forget_example_modules():
    for name in [
        m for m in sys.modules if m == EXAMPLE_MODULE or m.startswith(EXAMPLE_MODULE + ".")
    ]:
        del sys.modules[name]


def _reset_manager():
    from voxflow.plugins import reset_plugin_manager

    importlib.invalidate_caches()
    reset_plugin_manager()


@pytest.fixture(scope="session")
def example_plugin_installed(tmp_path_factory):
    """Install the example package into a temporary directory; yield that directory."""
    root = tmp_path_factory.mktemp("example-plugin")
    source = root / "source"
    shutil.copytree(
        EXAMPLE_PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    target = root / "site-packages"
    command = [
        sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
        "--no-index", "--disable-pip-version-check", "--quiet", "--target", str(target),
        str(source),
    ]  # fmt: skip
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        output = f"{done.stdout}\n{done.stderr}"
        raise RuntimeError(f"installing the example plugin failed ({done.returncode}):\n{output}")
    sys.path.insert(0, str(target))
    _reset_manager()
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        _forget_example_modules()
        _reset_manager()

import hashlib
import os

import numpy as np
import pytest

pytest_plugins = ["tests.example_plugin_fixture"]

# Library logs stay quiet in test output; telemetry cannot leave the machine anyway.
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_harness():
    """A throwaway Prefect API and database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def results_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("prefect-results")


@pytest.fixture
def settings(results_dir):
    """A small threaded local cluster and results in a temporary directory."""
    from voxflow.settings import VoxflowSettings

    return VoxflowSettings(
        cluster={"mode": "local", "n_workers": 1, "threads_per_worker": 2, "processes": False},
        prefect={"result_storage": str(results_dir)},
    )


def block_reduce_reference(image, factors, func):
    """Independent reference: apply `func` to every (possibly partial) block, by loops."""
    out_shape = tuple(-(-n // f) for n, f in zip(image.shape, factors, strict=True))
    out = np.empty(out_shape, dtype=np.float64)
    for index in np.ndindex(*out_shape):
        block = image[tuple(slice(i * f, (i + 1) * f) for i, f in zip(index, factors, strict=True))]
        out[index] = func(block)
    return out


def mean_reference(image, factors):
    means = block_reduce_reference(image.astype(np.float64), factors, np.mean)
    if image.dtype.kind in "iu":
        return np.floor(means + 0.5).astype(image.dtype)
    return means.astype(image.dtype)


def block_mean_reference(image, factors):
    """Exact float64 mean of every (possibly partial) block, from sums and voxel counts."""
    sums, counts = image.astype(np.float64), np.ones(image.shape)
    for axis, f in enumerate(factors):
        starts = np.arange(0, image.shape[axis], f)
        sums = np.add.reduceat(sums, starts, axis=axis)
        counts = np.add.reduceat(counts, starts, axis=axis)
    return sums / counts


def block_centres_reference(n, f, scale, translation):
    """Centre of the voxels each block of `f` holds along an axis of `n` (the last partial)."""
    starts = np.arange(0, n, f)
    stops = np.minimum(starts + f, n)
    return translation + (starts + stops - 1) / 2 * scale


def last_centres_reference(shape, factors, scale, translation):
    """Per axis, the centre of the voxels the last (maybe partial) block holds."""
    axes = zip(shape, factors, scale, translation, strict=True)
    return [block_centres_reference(n, f, s, t)[-1] for n, f, s, t in axes]


def interp_reference(field, shape, scale, translation, centres):
    """Linear interpolation between the low-resolution `centres` per axis, clamped at both
    ends (``np.interp``), at the voxel positions ``translation + i × scale``."""
    out = field.astype(np.float64)
    axes = zip(shape, scale, translation, centres, strict=True)
    for axis, (n, s, t, xp) in enumerate(axes):
        x = t + np.arange(n) * s
        out = np.apply_along_axis(lambda v, x=x, xp=xp: np.interp(x, xp, v), axis, out)
    return out


def snapshot(root):
    """Every file below `root`, as relative path → (content digest, modification time)."""
    found = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            found[os.path.relpath(full, root)] = (digest, os.stat(full).st_mtime_ns)
    return found

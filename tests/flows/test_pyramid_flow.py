import os

import numpy as np
import pytest
import zarr

from tests.conftest import block_reduce_reference, mean_reference, snapshot
from voxflow.flows import PyramidConfig, run_pyramid
from voxflow.io import open_image, read_level, write_image
from voxflow.tasks import PyramidParams

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _volume(shape=(2, 20, 45, 38), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4000, size=shape, dtype=np.uint16)


def _write_input(path, data, scale=(1.0, 4.0, 1.0, 1.0)):
    write_image(str(path), data, "czyx", scale, name="input", chunks=16, shards=32)
    return str(path)


def _expected_levels(data, plan_factors):
    levels, cur = [data], data
    for f in plan_factors:
        cur = mean_reference(cur, f)
        levels.append(cur)
    return levels


def test_flow_writes_levels_equal_to_reference_and_reruns_from_cache(tmp_path, settings):
    data = _volume()
    src = _write_input(tmp_path / "in.ome.zarr", data)
    config = PyramidConfig(input=src, pyramid=PyramidParams(min_size=8))
    ref = run_pyramid(config, settings)

    assert ref.url == str(tmp_path / "in.pyramid.ome.zarr")
    # scale (4, 1, 1): y and x are halved until isotropic, then all spatial axes, each axis
    # only while it is larger than min_size.
    factors = [(1, 1, 2, 2), (1, 1, 2, 2), (1, 2, 2, 2), (1, 2, 1, 1)]
    expected = _expected_levels(data, factors)
    assert [lv.shape for lv in ref.levels] == [e.shape for e in expected]
    group = zarr.open_group(ref.url, mode="r")
    from ome_zarr_models.v05.image import Image

    Image.from_zarr(group)
    for i, (lv, want) in enumerate(zip(ref.levels, expected, strict=True)):
        np.testing.assert_array_equal(read_level(ref, i).compute(), want)
        np.testing.assert_array_equal(group[lv.path][...], want)
    assert ref.levels[1].scale == (1.0, 4.0, 2.0, 2.0)
    assert ref.levels[1].translation == (0.0, 0.0, 0.5, 0.5)
    assert ref.provenance["stage"] == "pyramid"
    assert ref.provenance["input"]["fingerprint"] == open_image(src).fingerprint

    before = snapshot(ref.url)
    again = run_pyramid(config, settings)
    assert again == ref
    assert snapshot(ref.url) == before, "a cache hit must not write anything"


def test_changed_parameter_recomputes(tmp_path, settings):
    data = _volume(seed=1)
    src = _write_input(tmp_path / "in.ome.zarr", data)
    out = str(tmp_path / "out.ome.zarr")
    first = run_pyramid(
        PyramidConfig(input=src, output=out, pyramid=PyramidParams(levels=2)), settings
    )
    second = run_pyramid(
        PyramidConfig(
            input=src, output=out, overwrite=True, pyramid=PyramidParams(levels=2, method="max")
        ),
        settings,
    )
    assert first.method == "mean" and second.method == "max"
    want = block_reduce_reference(data, (1, 1, 2, 2), np.max).astype(data.dtype)
    np.testing.assert_array_equal(read_level(second, 1).compute(), want)


def test_removed_output_is_rebuilt_not_served_from_cache(tmp_path, settings):
    import shutil

    src = _write_input(tmp_path / "in.ome.zarr", _volume(seed=2))
    config = PyramidConfig(input=src, pyramid=PyramidParams(levels=2))
    ref = run_pyramid(config, settings)
    shutil.rmtree(ref.url)
    again = run_pyramid(config, settings)
    assert open_image(again.url).fingerprint == ref.fingerprint
    assert len(open_image(again.url).levels) == 2


def test_in_place_keeps_level0_untouched(tmp_path, settings):
    data = _volume(seed=3)
    src = _write_input(tmp_path / "in.ome.zarr", data)
    level0 = os.path.join(src, "0")
    before = snapshot(level0)
    ref = run_pyramid(
        PyramidConfig(input=src, in_place=True, pyramid=PyramidParams(levels=3)), settings
    )
    assert ref.url == src and len(ref.levels) == 3
    assert snapshot(level0) == before
    np.testing.assert_array_equal(read_level(ref, 0).compute(), data)
    np.testing.assert_array_equal(read_level(ref, 1).compute(), mean_reference(data, (1, 1, 2, 2)))


def test_flow_on_multiprocess_cluster(tmp_path, results_dir):
    """Scheduler and two single-threaded workers as separate processes on loopback."""
    from voxflow.settings import VoxflowSettings

    procs = VoxflowSettings(
        cluster={"mode": "local", "n_workers": 2, "threads_per_worker": 1, "processes": True},
        prefect={"result_storage": str(results_dir)},
    )
    data = _volume(shape=(1, 24, 40, 40), seed=4)
    src = _write_input(tmp_path / "in.ome.zarr", data)
    ref = run_pyramid(
        PyramidConfig(input=src, pyramid=PyramidParams(levels=3, method="mode")), procs
    )
    assert len(ref.levels) == 3

    def mode(block):
        values, counts = np.unique(block, return_counts=True)
        return values[np.argmax(counts)]  # first of the most frequent: the smallest value

    want = block_reduce_reference(data, (1, 1, 2, 2), mode).astype(data.dtype)
    np.testing.assert_array_equal(read_level(ref, 1).compute(), want)

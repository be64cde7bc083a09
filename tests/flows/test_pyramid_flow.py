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


# -- label images ------------------------------------------------------------------------------

IMAGE_LABEL = {
    "colors": [
        {"label-value": 1, "rgba": [255, 0, 0, 255]},
        {"label-value": 2, "rgba": [0, 255, 0, 128]},
    ],
    "properties": [{"label-value": 1, "class": "nucleus"}, {"label-value": 2, "area": 7}],
    "source": {"image": "../../"},
}


def _labelled_image(tmp_path, version):
    """An image with the label image `labels/cells` inside it, as the NGFF spec lays it out."""
    from voxflow.io import write_group

    rng = np.random.default_rng(5)
    image = str(tmp_path / "brain.ome.zarr")
    write_image(image, rng.integers(0, 4000, (6, 20, 18), dtype=np.uint16), "zyx",
                (2.0, 1.0, 1.0), ngff_version=version)  # fmt: skip
    labels = rng.integers(0, 3, (6, 20, 18), dtype=np.uint32)
    write_image(f"{image}/labels/cells", labels, "zyx", (2.0, 1.0, 1.0), ngff_version=version,
                image_label=IMAGE_LABEL)  # fmt: skip
    write_group(f"{image}/labels", version, {"labels": ["cells"]})
    return image, labels


def _image_label_model(version):
    if version == "0.5":
        from ome_zarr_models.v05.image_label import ImageLabel
    else:
        from ome_zarr_models.v04.image_label import ImageLabel
    return ImageLabel


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_label_pyramid_goes_beside_its_image_and_stays_a_label_image(tmp_path, settings, version):
    image, labels = _labelled_image(tmp_path, version)
    before = snapshot(image)
    config = PyramidConfig(
        input=f"{image}/labels/cells", pyramid=PyramidParams(method="mode", levels=2)
    )
    ref = run_pyramid(config, settings)

    assert ref.url == str(tmp_path / "brain.labels.cells.pyramid.ome.zarr")
    assert snapshot(image) == before, "the image and its labels are inputs: nothing written"
    assert ref.image_label == {**IMAGE_LABEL, "source": {"image": "../brain.ome.zarr"}}
    np.testing.assert_array_equal(read_level(ref, 0).compute(), labels)
    group = zarr.open_group(ref.url, mode="r")
    _image_label_model(ref.ngff_version).from_zarr(group)
    # Another reader follows the source back to the image the labels belong to.
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(ref.url))())
    assert {os.path.realpath(str(n.zarr).split(" [")[0]) for n in nodes} >= {
        os.path.realpath(image),
        os.path.realpath(ref.url),
    }


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_in_place_label_pyramid_keeps_the_image_label(tmp_path, settings, version):
    image, labels = _labelled_image(tmp_path, version)
    url = f"{image}/labels/cells"
    group = zarr.open_group(url, mode="r")
    written = dict(group.attrs)
    config = PyramidConfig(input=url, in_place=True, pyramid=PyramidParams(method="mode", levels=3))
    ref = run_pyramid(config, settings)

    assert ref.url == url and len(ref.levels) == 3
    assert ref.image_label == IMAGE_LABEL
    attrs = dict(zarr.open_group(url, mode="r").attrs)
    block = attrs["ome"] if version == "0.5" else attrs
    assert block["image-label"] == (written["ome"] if version == "0.5" else written)["image-label"]
    _image_label_model(version).from_zarr(zarr.open_group(url, mode="r"))
    np.testing.assert_array_equal(read_level(ref, 0).compute(), labels)


def _smallest_mode(block):
    values, counts = np.unique(block, return_counts=True)
    return values[np.argmax(counts)]  # first maximum: the smallest value among ties


def test_label_image_is_reduced_with_mode_unless_a_method_is_given(tmp_path, settings):
    """Without --method a label image takes the most frequent label of each block; a mean
    would invent labels between neighbouring objects. Its image is still averaged."""
    image, labels = _labelled_image(tmp_path, "0.5")
    two = PyramidParams(levels=2)
    ref = run_pyramid(PyramidConfig(input=f"{image}/labels/cells", pyramid=two), settings)
    level1 = read_level(ref, 1).compute()
    factors = tuple(a // b for a, b in zip(labels.shape, level1.shape, strict=True))
    assert ref.method == "mode"
    np.testing.assert_array_equal(level1, block_reduce_reference(labels, factors, _smallest_mode))
    averaged = mean_reference(labels, factors)
    assert not np.array_equal(level1, averaged), "the data must tell mode from mean apart"

    given = run_pyramid(
        PyramidConfig(
            input=f"{image}/labels/cells", output=str(tmp_path / "mean.ome.zarr"),
            pyramid=PyramidParams(method="mean", levels=2),
        ),
        settings,
    )  # fmt: skip
    np.testing.assert_array_equal(read_level(given, 1).compute(), averaged)

    pixels = open_image(image)
    plain = run_pyramid(PyramidConfig(input=image, pyramid=two), settings)
    assert plain.method == "mean"
    np.testing.assert_array_equal(
        read_level(plain, 1).compute(),
        mean_reference(read_level(pixels, 0).compute(), factors),
    )


# -- warnings ----------------------------------------------------------------------------------


def test_plain_array_warning_reaches_the_user_once_and_never_from_a_worker(
    tmp_path, results_dir, capfd
):
    from voxflow.io import PlainArrayWarning
    from voxflow.settings import VoxflowSettings

    procs = VoxflowSettings(
        cluster={"mode": "local", "n_workers": 1, "threads_per_worker": 1, "processes": True},
        prefect={"result_storage": str(results_dir)},
    )
    plain = str(tmp_path / "plain.zarr")
    zarr.create_array(plain, shape=(8, 16, 16), chunks=(4, 8, 8), dtype="uint8")[...] = 7
    with pytest.warns(PlainArrayWarning, match="plain zarr array") as caught:
        ref = run_pyramid(PyramidConfig(input=plain, pyramid=PyramidParams(levels=2)), procs)
    assert len(ref.levels) == 2
    assert len([w for w in caught if w.category is PlainArrayWarning]) == 1
    printed = capfd.readouterr()
    assert "plain zarr array" not in printed.err + printed.out, "a worker warned again"


def test_a_new_voxel_size_of_the_input_is_not_served_from_the_cache(tmp_path, settings):
    """Results keyed by the input's content must see its metadata too: a pyramid of the same
    voxels with another scale and translation has other level scales and translations."""
    from voxflow.io import Dataset, Multiscale, write_image_metadata

    data = np.random.default_rng(3).integers(0, 500, (8, 64, 64), dtype=np.uint16)
    src = str(tmp_path / "in.ome.zarr")
    write_image(src, data, "zyx", (2.0, 0.5, 0.5))
    config = PyramidConfig(
        input=src, output=str(tmp_path / "out.ome.zarr"), overwrite=True,
        pyramid=PyramidParams(levels=2, min_size=8),
    )  # fmt: skip
    first = run_pyramid(config, settings)
    assert first.levels[1].scale == (2.0, 1.0, 1.0)

    ref = open_image(src)
    moved = tuple(Dataset(lv.path, (5.0, 1.0, 1.0), (100.0, 0.0, 0.0)) for lv in ref.levels)
    write_image_metadata(src, Multiscale(ref.axes, moved, name=ref.name), omero=ref.omero)
    again = run_pyramid(config, settings)
    # (5, 1, 1) is anisotropic the other way: y and x are reduced, z is not.
    assert again.levels[0].scale == (5.0, 1.0, 1.0)
    assert again.levels[0].translation == (100.0, 0.0, 0.0)
    assert again.levels[1].scale == (5.0, 2.0, 2.0)
    assert again.levels[1].translation == (100.0, 0.5, 0.5)
    np.testing.assert_array_equal(read_level(again, 0).compute(), data)

import dataclasses
import pickle
import warnings

import cloudpickle
import dask.array as da
import numpy as np
import pytest
import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.writer import write_image, write_labels

from voxflow.core.axes import default_axes
from voxflow.io import (
    SUPPORTED_DTYPES,
    Dataset,
    Location,
    Multiscale,
    NotAnImageError,
    PlainArrayWarning,
    fingerprint,
    open_image,
    read_level,
    write_image_metadata,
)
from voxflow.io.reader import TensorStoreSource, array_spec

DEFAULT_DIMS = {2: "yx", 3: "zyx", 4: "czyx", 5: "tczyx"}


def _plain(path, data, zarr_format, chunks, shards=None):
    arr = zarr.create_array(
        str(path), shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shards,
        zarr_format=zarr_format,
    )  # fmt: skip
    arr[...] = data
    return arr


# -- open_image: what is not an image ----------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such image"):
        open_image(tmp_path / "missing.zarr")


def test_missing_memory_location():
    with pytest.raises(FileNotFoundError, match="no such image: memory://nothing-here"):
        open_image("memory://nothing-here/x.zarr")


@pytest.mark.parametrize("content", ["text", "empty"])
def test_directory_that_is_not_zarr(tmp_path, content):
    folder = tmp_path / "folder"
    folder.mkdir()
    if content == "text":
        (folder / "readme.txt").write_text("not an image")
    with pytest.raises(NotAnImageError, match="is not a zarr array or group"):
        open_image(folder)


def test_an_unfinished_output_says_so(tmp_path, make_image):
    out = tmp_path / "out.ome.zarr"
    make_image(out / "0", np.zeros((4, 4), "uint8"), "yx", n_levels=1)
    (out / "voxflow-incomplete.json").write_text("{}")
    with pytest.raises(NotAnImageError, match=r"unfinished output .* run the same command again"):
        open_image(out)


def test_not_an_image_is_a_value_error():
    assert issubclass(NotAnImageError, ValueError)


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_group_without_multiscales(tmp_path, zarr_format):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=zarr_format)
    group.attrs["something"] = "else"
    group.create_array("0", shape=(4, 4), dtype="uint8")
    with pytest.raises(NotAnImageError, match="no OME-NGFF `multiscales` metadata"):
        open_image(tmp_path / "g.zarr")


def test_v2_group_without_attributes(tmp_path):
    Location.parse(tmp_path / "g.zarr").write_json(".zgroup", {"zarr_format": 2})
    with pytest.raises(NotAnImageError, match="no OME-NGFF `multiscales` metadata"):
        open_image(tmp_path / "g.zarr")


def _yx_multiscale(paths=("0",)):
    axes = default_axes(2)
    return Multiscale(axes, tuple(Dataset(p, (1.0, 1.0), (0.0, 0.0)) for p in paths))


@pytest.mark.parametrize(("version", "fmt"), [("0.5", 3), ("0.4", 2)])
def test_unsupported_dtype_in_an_image(tmp_path, version, fmt):
    _plain(tmp_path / "0", np.zeros((4, 4), "complex64"), fmt, (2, 2))
    write_image_metadata(tmp_path, _yx_multiscale(), ngff_version=version)
    with pytest.raises(NotAnImageError, match="has voxels of dtype complex64; supported: bool"):
        open_image(tmp_path)


@pytest.mark.parametrize("zarr_format", [3, 2])
@pytest.mark.parametrize("dtype", ["complex64", "float16"])
def test_unsupported_dtype_in_a_plain_array(tmp_path, zarr_format, dtype):
    _plain(tmp_path / "a.zarr", np.zeros((4, 4), dtype), zarr_format, (2, 2))
    with pytest.raises(NotAnImageError, match=f"has voxels of dtype {dtype}"):
        open_image(tmp_path / "a.zarr")


def test_level_listed_but_missing(tmp_path):
    _plain(tmp_path / "0", np.zeros((4, 4), "uint8"), 3, (2, 2))
    write_image_metadata(tmp_path, _yx_multiscale(("0", "1")))
    with pytest.raises(NotAnImageError, match="/1 is listed as a level but holds no zarr array"):
        open_image(tmp_path)


def test_level_with_wrong_number_of_dimensions(tmp_path):
    _plain(tmp_path / "0", np.zeros((2, 4, 4), "uint8"), 3, (2, 2, 2))
    write_image_metadata(tmp_path, _yx_multiscale())
    with pytest.raises(NotAnImageError, match="has 3 dimensions but the metadata lists 2 axes"):
        open_image(tmp_path)


@pytest.mark.parametrize(("version", "fmt"), [("0.5", 3), ("0.4", 2)])
def test_malformed_metadata(tmp_path, version, fmt):
    _plain(tmp_path / "0", np.zeros((4, 4), "uint8"), fmt, (2, 2))
    write_image_metadata(tmp_path, _yx_multiscale(), ngff_version=version)
    key = "zarr.json" if version == "0.5" else ".zattrs"
    loc = Location.parse(tmp_path)
    doc = loc.read_json(key)
    attrs = doc["attributes"]["ome"] if version == "0.5" else doc
    attrs["multiscales"][0]["axes"].reverse()
    attrs["multiscales"][0]["axes"][0]["name"] = "x"
    attrs["multiscales"][0]["axes"][1]["name"] = "y"
    loc.write_json(key, doc)
    with pytest.raises(NotAnImageError, match=f"{tmp_path}.*must follow the OME-NGFF order"):
        open_image(tmp_path)


# -- open_image: plain arrays ------------------------------------------------------------------


@pytest.mark.parametrize("zarr_format", [3, 2])
@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
def test_plain_array(tmp_path, random_array, zarr_format, ndim):
    shape = (2, 3, 5, 9, 7)[-ndim:]
    chunks = (1, 2, 3, 4, 5)[-ndim:]
    data = random_array(shape, "int16", seed=ndim)
    _plain(tmp_path / "a.zarr", data, zarr_format, chunks)
    with pytest.warns(PlainArrayWarning, match="plain zarr array without OME-NGFF metadata"):
        ref = open_image(tmp_path / "a.zarr")
    assert ref.is_plain
    assert ref.ngff_version is None
    assert ref.zarr_format == zarr_format
    assert ref.dims == tuple(DEFAULT_DIMS[ndim])
    assert ref.axes == default_axes(ndim)
    assert ref.dtype == "int16"
    assert ref.omero is None
    assert ref.provenance is None
    (level,) = ref.levels
    assert level.path == ""
    assert level.shape == shape
    assert level.scale == (1.0,) * ndim
    assert level.translation == (0.0,) * ndim
    assert level.chunks == chunks
    assert level.shards is None
    np.testing.assert_array_equal(read_level(ref).compute(), data)


def test_plain_sharded_array(tmp_path, random_array):
    data = random_array((20, 30), "uint8")
    _plain(tmp_path / "a.zarr", data, 3, (4, 5), shards=(8, 10))
    with pytest.warns(PlainArrayWarning, match="axes yx and unit scale"):
        ref = open_image(tmp_path / "a.zarr")
    assert (ref.levels[0].chunks, ref.levels[0].shards) == ((4, 5), (8, 10))
    darr = read_level(ref)
    assert darr.chunksize == (8, 10)
    np.testing.assert_array_equal(darr.compute(), data)


def test_plain_array_warning_points_at_the_caller(tmp_path):
    _plain(tmp_path / "a.zarr", np.zeros((4, 4), "uint8"), 3, (2, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        open_image(tmp_path / "a.zarr")
    assert [w.category for w in caught] == [PlainArrayWarning]
    assert caught[0].filename == __file__


def test_plain_array_warns_once_per_process(tmp_path):
    # A run opens its input when it is checked and again when it starts; the user hears once.
    _plain(tmp_path / "a.zarr", np.zeros((4, 4), "uint8"), 3, (2, 2))
    _plain(tmp_path / "b.zarr", np.zeros((4, 4), "uint8"), 3, (2, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = open_image(tmp_path / "a.zarr")
        again = open_image(str(tmp_path / "a.zarr"))
        other = open_image(tmp_path / "b.zarr")
    assert first == again and other.is_plain
    messages = [str(w.message) for w in caught if w.category is PlainArrayWarning]
    assert len(messages) == 2, messages
    assert str(tmp_path / "a.zarr") in messages[0] and str(tmp_path / "b.zarr") in messages[1]


@pytest.mark.parametrize("shape", [(2, 1, 1, 1, 2, 2), (7,)])
def test_plain_array_with_unsupported_dimensions(tmp_path, shape):
    _plain(tmp_path / "a.zarr", np.zeros(shape, "uint8"), 3, shape)
    with pytest.raises(NotAnImageError, match=f"needs 2 to 5 dimensions .* got {len(shape)}"):
        open_image(tmp_path / "a.zarr")


# -- open_image: images written by ome-zarr-py -------------------------------------------------


@pytest.mark.parametrize(("fmt", "zarr_format"), [(FormatV04(), 2), (FormatV05(), 3)])
def test_image_written_by_ome_zarr_py(tmp_path, random_array, fmt, zarr_format):
    data = random_array((2, 6, 32, 30), "uint16", seed=4)
    url = str(tmp_path / "omezarr.zarr")
    group = zarr.open_group(url, mode="w", zarr_format=zarr_format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no scale given for the channel axis
        write_image(
            data, group, scale_factors=[2], fmt=fmt, axes="czyx",
            scale={"z": 2.0, "y": 0.5, "x": 0.5}, axes_units={"z": "micrometer"},
            storage_options={"chunks": (1, 3, 8, 8)},
        )  # fmt: skip
    ref = open_image(url)
    assert ref.ngff_version == fmt.version
    assert ref.zarr_format == zarr_format
    assert ref.dims == ("c", "z", "y", "x")
    assert ref.axis_types == ("channel", "space", "space", "space")
    assert ref.units == (None, "micrometer", None, None)
    assert ref.dtype == "uint16"
    assert ref.name == "image"
    ms = group.attrs.asdict()
    ms = (ms["ome"] if zarr_format == 3 else ms)["multiscales"][0]
    assert [lvl.path for lvl in ref.levels] == [d["path"] for d in ms["datasets"]]
    for lvl, ds in zip(ref.levels, ms["datasets"], strict=True):
        transforms = {t["type"]: t[t["type"]] for t in ds["coordinateTransformations"]}
        assert lvl.scale == tuple(transforms["scale"])
        assert lvl.translation == tuple(transforms.get("translation", [0.0] * 4))
        assert lvl.chunks == group[ds["path"]].chunks
    assert ref.levels[0].scale == (1.0, 2.0, 0.5, 0.5)
    assert ref.levels[1].scale == (1.0, 2.0, 1.0, 1.0)
    assert ref.levels[1].shape == (2, 6, 16, 15)
    np.testing.assert_array_equal(read_level(ref, 0).compute(), data)
    np.testing.assert_array_equal(read_level(ref, 1).compute(), group[ms["datasets"][1]["path"]])


@pytest.mark.parametrize(("fmt", "zarr_format"), [(FormatV04(), 2), (FormatV05(), 3)])
def test_label_image_written_by_ome_zarr_py_carries_its_image_label(tmp_path, fmt, zarr_format):
    data = np.random.default_rng(5).integers(0, 4, (6, 32, 30), dtype=np.uint16)
    url = str(tmp_path / "image.ome.zarr")
    group = zarr.open_group(url, mode="w", zarr_format=zarr_format)
    colors = [
        {"label-value": 1, "rgba": [255, 0, 0, 255]},
        {"label-value": 3, "rgba": [0, 0, 255, 128]},
    ]
    properties = [{"label-value": 1, "class": "nucleus"}, {"label-value": 3, "area": 12}]
    write_image(data, group, scale_factors=[], fmt=fmt, axes="zyx")
    write_labels(
        data, group, "cells", scaler=None, scale_factors=[2], fmt=fmt, axes="zyx",
        label_metadata={"colors": colors, "properties": properties, "source": {"image": "../../"}},
    )  # fmt: skip
    label = open_image(f"{url}/labels/cells")
    attrs = group["labels/cells"].attrs.asdict()
    written = (attrs["ome"] if zarr_format == 3 else attrs)["image-label"]
    assert label.image_label == {k: v for k, v in written.items() if k != "version"}
    assert label.image_label["colors"] == colors
    assert label.image_label["properties"] == properties
    assert label.image_label["source"] == {"image": "../../"}
    assert open_image(url).image_label is None


def test_open_image_accepts_path_location_and_trailing_slash(tmp_path, make_image):
    make_image(tmp_path / "i.zarr", np.zeros((5, 5), "uint8"), "yx", n_levels=1)
    refs = [
        open_image(tmp_path / "i.zarr"),
        open_image(str(tmp_path / "i.zarr") + "/"),
        open_image(Location.parse(tmp_path / "i.zarr")),
        open_image(f"file://{tmp_path}/i.zarr"),
    ]
    assert all(r == refs[0] for r in refs)


# -- fingerprint -------------------------------------------------------------------------------


def _overwrite(url, path, index, value):
    arr = zarr.open_array(f"{url}/{path}", mode="r+")
    arr[index] = value


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_fingerprint_is_independent_of_location(tmp_path, memory_url, make_image, random_array,
                                                version):  # fmt: skip
    data = random_array((6, 20, 17), "uint16", seed=7)
    urls = [str(tmp_path / "a.zarr"), str(tmp_path / "copy" / "b.zarr"), memory_url]
    for url in urls:
        make_image(url, data, "zyx", ngff_version=version, chunks=4)
    prints = {open_image(url).fingerprint for url in urls}
    assert len(prints) == 1
    assert len(next(iter(prints))) == 32
    int(next(iter(prints)), 16)


@pytest.mark.parametrize("version", ["0.5", "0.4"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_fingerprint_sees_same_size_rewrites_of_sampled_objects(tmp_path, make_image, version,
                                                                where):  # fmt: skip
    # Uncompressed, a changed byte keeps every stored size: only the objects hashed in full
    # (first, middle and last by name) can tell.
    url = tmp_path / "a.zarr"
    data = np.arange(4 * 16 * 16, dtype="uint16").reshape(4, 16, 16)
    make_image(url, data, "zyx", ngff_version=version, chunks=4,
               shards=4 if version == "0.5" else None, compressor="none", n_levels=1)  # fmt: skip
    before = open_image(url).fingerprint
    meta = {"zarr.json", ".zarray", ".zattrs"}
    keys = sorted(k for k in Location.parse(url).list_sizes("0") if k not in meta)
    assert len(keys) == 16
    key = {"first": keys[0], "middle": keys[len(keys) // 2], "last": keys[-1]}[where]
    stored = url / "0" / key
    original = stored.read_bytes()
    stored.write_bytes(bytes([original[0] ^ 0xFF]) + original[1:])
    assert open_image(url).fingerprint != before
    stored.write_bytes(original)
    assert open_image(url).fingerprint == before


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_fingerprint_changes_when_a_voxel_is_rewritten(tmp_path, make_image, random_array,
                                                       version):  # fmt: skip
    url = tmp_path / "a.zarr"
    data = random_array((5, 16, 16), "uint16", seed=8)
    make_image(url, data, "zyx", ngff_version=version, chunks=4, n_levels=1)
    before = open_image(url).fingerprint
    # A voxel of the first stored object, one of those hashed in full.
    _overwrite(str(url), "0", (0, 1, 2), data[0, 1, 2] + 1)
    assert open_image(url).fingerprint != before


def test_fingerprint_changes_with_level0_array_metadata(tmp_path, make_image):
    url = tmp_path / "a.zarr"
    make_image(url, np.ones((8, 8), "uint8"), "yx", n_levels=1)
    before = open_image(url).fingerprint
    arr = zarr.open_array(str(url / "0"), mode="r+")
    arr.attrs["note"] = "changed"
    assert open_image(url).fingerprint != before


def test_fingerprint_covers_level0_and_the_metadata_that_places_it(tmp_path, make_image,
                                                                   random_array):  # fmt: skip
    # The fingerprint identifies level 0's voxels and what gives them meaning (axes, units,
    # scale, translation, name, omero): results made for another voxel size must not be
    # reused. The other levels and the provenance record are not part of it.
    url = tmp_path / "a.zarr"
    data = random_array((8, 12), "uint8", seed=2)
    make_image(url, data, "yx", scale=(1.0, 1.0), chunks=4)
    ref = open_image(url)
    assert ref.fingerprint != fingerprint(url, ["0"]), "more than the stored arrays"
    _overwrite(str(url), "1", (0, 0), data[0, 0] + 1)
    assert open_image(url).fingerprint == ref.fingerprint
    datasets = tuple(Dataset(d.path, d.scale, d.translation) for d in ref.levels)
    write_image_metadata(url, Multiscale(ref.axes, datasets, name=ref.name), omero=ref.omero,
                         provenance={"stage": "other"})  # fmt: skip
    assert open_image(url).fingerprint == ref.fingerprint

    prints = {ref.fingerprint}
    nanometres = tuple(dataclasses.replace(a, unit="nanometer") for a in ref.axes)
    moved = tuple(Dataset(d.path, (9.0, 9.0), (3.0, 3.0)) for d in ref.levels)
    for multiscale, omero in [
        (Multiscale(ref.axes, moved, name=ref.name), ref.omero),
        (Multiscale(ref.axes, datasets, name="renamed"), ref.omero),
        (Multiscale(nanometres, datasets, name=ref.name), ref.omero),
        (Multiscale(ref.axes, datasets, name=ref.name), {"channels": [{"label": "dapi"}]}),
    ]:
        write_image_metadata(url, multiscale, omero=omero)
        prints.add(open_image(url).fingerprint)
    assert len(prints) == 5, "each change of what places the voxels changes the fingerprint"
    write_image_metadata(url, Multiscale(ref.axes, datasets, name=ref.name), omero=ref.omero)
    assert open_image(url).fingerprint == ref.fingerprint


def test_fingerprint_of_several_paths(tmp_path, make_image):
    url = tmp_path / "a.zarr"
    make_image(url, np.arange(64, dtype="uint8").reshape(8, 8), "yx", chunks=4)
    one = fingerprint(url, ["0"])
    both = fingerprint(url, ["0", "1"])
    assert both != one
    assert fingerprint(Location.parse(url), ["0", "1"]) == both
    assert fingerprint(url, ["0"], samples=0) != one


# -- read_level ----------------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path, make_image, random_array):
    data = random_array((2, 21, 26), "float32", seed=5)
    levels = make_image(tmp_path / "img.zarr", data, "cyx", chunks=(4, 5), shards=(8, 10))
    return open_image(tmp_path / "img.zarr"), levels


def test_read_level_default_chunks_are_write_chunks(image):
    ref, levels = image
    for i, arr in enumerate(levels):
        darr = read_level(ref, i)
        assert ref.levels[i].write_chunks == ref.levels[i].shards
        assert darr.chunksize == tuple(min(c, n) for c, n in zip(ref.levels[i].shards, arr.shape,
                                                                   strict=True))  # fmt: skip
        assert darr.chunks == da.empty(arr.shape, chunks=ref.levels[i].shards).chunks
        np.testing.assert_array_equal(darr.compute(), arr)


def test_read_level_default_chunks_unsharded(tmp_path, make_image, random_array):
    data = random_array((21, 26), "int32")
    make_image(tmp_path, data, "yx", ngff_version="0.4", chunks=(4, 5), n_levels=1)
    darr = read_level(open_image(tmp_path))
    assert darr.chunksize == (4, 5)
    np.testing.assert_array_equal(darr.compute(), data)


@pytest.mark.parametrize("chunks", [(1, 7, 3), (2, 21, 26), "auto"])
def test_read_level_explicit_chunks(image, chunks):
    ref, levels = image
    darr = read_level(ref, 0, chunks=chunks)
    if chunks != "auto":
        assert darr.chunksize == chunks
    np.testing.assert_array_equal(darr.compute(), levels[0])
    np.testing.assert_array_equal(darr[:, 3:17, 20:].compute(), levels[0][:, 3:17, 20:])


def test_read_level_negative_index(image):
    ref, levels = image
    np.testing.assert_array_equal(read_level(ref, -1).compute(), levels[-1])


@pytest.mark.parametrize("level", [2, -3, 10])
def test_read_level_out_of_range(image, level):
    ref, _ = image
    with pytest.raises(IndexError, match=f"`level` {level} out of range: the image has 2 levels"):
        read_level(ref, level)


def test_read_level_names_differ_per_level_and_chunks(image):
    ref, _ = image
    names = {read_level(ref, 0).name, read_level(ref, 1).name,
             read_level(ref, 0, chunks=(1, 7, 3)).name}  # fmt: skip
    assert len(names) == 3
    assert read_level(ref, 0).name == read_level(ref, 0).name


def test_read_level_pickles(image):
    ref, levels = image
    darr = read_level(ref, 1)[:, 2:9]
    restored = cloudpickle.loads(cloudpickle.dumps(darr))
    np.testing.assert_array_equal(restored.compute(), levels[1][:, 2:9])


def test_tensorstore_source_pickles_as_its_spec(image):
    ref, levels = image
    source = TensorStoreSource(array_spec(ref, 0), ref.shape, ref.dtype, ref.fingerprint)
    restored = pickle.loads(pickle.dumps(source))
    assert restored.spec == source.spec
    assert (restored.shape, restored.dtype, restored.ndim) == (ref.shape, np.float32, 3)
    np.testing.assert_array_equal(restored[:, 1:4, ::2], levels[0][:, 1:4, ::2])


def test_read_level_after_the_image_is_replaced(tmp_path, make_image, random_array):
    url = tmp_path / "img.zarr"
    make_image(url, random_array((9, 9), "uint8", seed=1), "yx", n_levels=1)
    np.testing.assert_array_equal(read_level(open_image(url)).compute(),
                                  random_array((9, 9), "uint8", seed=1))  # fmt: skip
    new = random_array((12, 5), "uint8", seed=2)
    make_image(url, new, "yx", n_levels=1)
    ref = open_image(url)
    assert ref.shape == (12, 5)
    np.testing.assert_array_equal(read_level(ref).compute(), new)


def test_supported_dtypes_read_back(tmp_path, random_array):
    for i, dtype in enumerate(SUPPORTED_DTYPES):
        data = random_array((4, 6), dtype, seed=i)
        _plain(tmp_path / f"{dtype}.zarr", data, 3, (3, 4))
        with pytest.warns(PlainArrayWarning):
            ref = open_image(tmp_path / f"{dtype}.zarr")
        assert ref.dtype == dtype
        np.testing.assert_array_equal(read_level(ref).compute(), data)

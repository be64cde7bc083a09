import datetime as dt
import itertools
import json
import math
from importlib.metadata import version as pkg_version

import dask.array as da
import numpy as np
import pytest
import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr_models.v04.image import Image as ImageV04
from ome_zarr_models.v05.image import Image as ImageV05

from voxflow.core.axes import axis_from_name
from voxflow.io import (
    COMPRESSORS,
    INCOMPLETE_MARKER,
    ArrayLayout,
    Location,
    NotAnImageError,
    check_output,
    clear_output,
    create_array,
    derive_layout,
    open_image,
    provenance,
    read_level,
    replaceable,
    writable,
    write_blocks,
    write_image_metadata,
)

SHAPES = {
    "yx": (37, 45),
    "zyx": (9, 21, 19),
    "czyx": (2, 7, 19, 22),
    "tczyx": (2, 3, 5, 13, 11),
}
DTYPES = ("uint8", "uint16", "int32", "float32", "bool")


def _cases():
    # Every dtype with both versions; dims and compressors rotate so each version sees every
    # dims and every compressor too.
    for k, version in enumerate(("0.5", "0.4")):
        for i, dtype in enumerate(DTYPES):
            dims = list(SHAPES)[(i + k) % 4]
            compressor = COMPRESSORS[(i + 2 * k) % 4]
            yield pytest.param(version, dtype, dims, compressor, id=f"{version}-{dtype}-{dims}")
    for version, dims in itertools.product(("0.5", "0.4"), SHAPES):
        yield pytest.param(version, "uint16", dims, "zstd", id=f"{version}-uint16-{dims}-zstd")


def _expected_layout(shape, dims, version, chunk, shard):
    """Chunks and shards by hand: capped to the shape, 1 on channel and time."""
    chunks = tuple(min(chunk, n) if d in "zyx" else 1 for n, d in zip(shape, dims, strict=True))
    if version == "0.4":
        return chunks, None
    shards = tuple(
        min(shard, math.ceil(n / c) * c) if d in "zyx" else 1
        for n, c, d in zip(shape, chunks, dims, strict=True)
    )
    return chunks, shards


def _omero(shape, dims):
    n = shape[dims.index("c")] if "c" in dims else 1
    window = {"min": 0.0, "max": 1.0, "start": 0.0, "end": 1.0}
    return {
        "channels": [{"label": f"ch{i}", "color": "FF00FF", "window": window} for i in range(n)]
    }


# -- end to end ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "dtype", "dims", "compressor"), list(_cases()))
def test_write_and_read_back_with_every_reader(
    tmp_path, make_image, random_array, version, dtype, dims, compressor
):
    url = str(tmp_path / "image.zarr")
    shape = SHAPES[dims]
    data = random_array(shape, dtype, seed=len(dims))
    scale = tuple({"t": 2.5, "c": 1.0, "z": 3.0}.get(d, 0.5) for d in dims)
    translation = tuple({"t": 1.0, "c": 0.0, "z": -4.0}.get(d, 12.25) for d in dims)
    omero = _omero(shape, dims)
    prov = provenance("pyramid", "stride", {"levels": 2}, None)
    chunk, shard = 4, 12
    levels = make_image(
        url, data, dims, ngff_version=version, chunks=chunk,
        shards=shard if version == "0.5" else None, compressor=compressor, scale=scale,
        translation=translation, omero=omero, provenance=prov,
    )  # fmt: skip

    # voxflow's own reader
    ref = open_image(url)
    assert ref.url == str(Location.parse(url))
    assert ref.ngff_version == version
    assert ref.zarr_format == (3 if version == "0.5" else 2)
    assert ref.dims == tuple(dims)
    assert ref.axis_types == tuple(str(axis_from_name(d).type) for d in dims)
    assert ref.units == tuple(axis_from_name(d).unit for d in dims)
    assert ref.dtype == np.dtype(dtype).name
    assert ref.name == "image"
    assert ref.method == "stride"
    assert ref.omero == omero
    assert ref.provenance == prov
    assert ref.shape == shape
    assert type(ref).model_validate_json(ref.model_dump_json()) == ref
    assert len(ref.levels) == 2
    for i, (lvl, arr) in enumerate(zip(ref.levels, levels, strict=True)):
        step = 2**i
        assert lvl.path == str(i)
        assert lvl.shape == arr.shape
        assert lvl.scale == tuple(
            s * step if d in "yx" else s for s, d in zip(scale, dims, strict=True)
        )
        assert lvl.translation == translation
        assert (lvl.chunks, lvl.shards) == _expected_layout(arr.shape, dims, version, chunk, shard)
        assert lvl.write_chunks == (lvl.shards or lvl.chunks)
        got = read_level(ref, i)
        assert got.dtype == arr.dtype
        np.testing.assert_array_equal(got.compute(), arr)

    # zarr-python
    group = zarr.open_group(url, mode="r")
    attrs = group.attrs.asdict()
    ome = attrs["ome"] if version == "0.5" else attrs
    assert attrs["voxflow"] == prov
    assert ome["omero"] == omero
    assert [d["path"] for d in ome["multiscales"][0]["datasets"]] == ["0", "1"]
    for i, (lvl, arr) in enumerate(zip(ref.levels, levels, strict=True)):
        zarr_arr = group[str(i)]
        assert zarr_arr.dtype == arr.dtype
        assert zarr_arr.chunks == lvl.chunks
        assert zarr_arr.shards == lvl.shards
        if version == "0.5":
            assert zarr_arr.metadata.dimension_names == tuple(dims)
        np.testing.assert_array_equal(zarr_arr[...], arr)

    # ome-zarr-models validates the whole image
    image_cls = ImageV05 if version == "0.5" else ImageV04
    image_cls.from_zarr(group)

    # ome-zarr-py
    fmt = FormatV05() if version == "0.5" else FormatV04()
    node = next(iter(Reader(parse_url(url, fmt=fmt))()))
    assert len(node.data) == 2
    for lazy, arr in zip(node.data, levels, strict=True):
        np.testing.assert_array_equal(np.asarray(lazy), arr)
    assert [a["name"] for a in node.metadata["axes"]] == list(dims)


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_write_and_read_back_in_memory(memory_url, make_image, random_array, version):
    data = random_array((3, 11, 14), "uint16", seed=3)
    levels = make_image(memory_url, data, "zyx", ngff_version=version, chunks=4)
    ref = open_image(memory_url)
    assert ref.url == memory_url
    assert ref.ngff_version == version
    assert [lvl.shape for lvl in ref.levels] == [(3, 11, 14), (3, 6, 7)]
    for i, arr in enumerate(levels):
        np.testing.assert_array_equal(read_level(ref, i).compute(), arr)
    clear_output(memory_url)
    assert not Location.parse(memory_url).exists()


def test_interrupted_write_never_looks_complete(tmp_path, make_image, random_array):
    for version in ("0.5", "0.4"):
        url = tmp_path / f"image-{version}.zarr"
        make_image(url, random_array((9, 10), "uint8"), "yx", ngff_version=version, metadata=False)
        assert Location.parse(url).exists("0")
        with pytest.raises(NotAnImageError, match="is not a zarr array or group"):
            open_image(url)


def test_interrupted_04_metadata_write_never_looks_complete(tmp_path, make_image, random_array):
    # NGFF 0.4 writes .zattrs and then .zgroup: without .zgroup the directory is no zarr v2
    # group (zarr-python and ome-zarr-py cannot open it), so it must not pass as complete.
    url = tmp_path / "image.zarr"
    make_image(url, random_array((9, 10), "uint8"), "yx", ngff_version="0.4")
    (url / ".zgroup").unlink()
    with pytest.raises(NotAnImageError, match="is not a zarr array or group"):
        open_image(url)


# -- derive_layout -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dims", "version", "chunks", "shards"),
    [
        ((2, 300, 1000, 1000), "czyx", "0.5", (1, 64, 64, 64), (1, 256, 256, 256)),
        ((100, 30, 700), "zyx", "0.5", (64, 30, 64), (128, 30, 256)),
        ((3, 2, 5, 70, 64), "tczyx", "0.5", (1, 1, 5, 64, 64), (1, 1, 5, 128, 64)),
        ((1000, 1000), "yx", "0.5", (64, 64), (256, 256)),
        ((2, 300, 1000), "cyx", "0.4", (1, 128, 128), None),
        ((500, 129, 5), "zyx", "0.4", (128, 128, 5), None),
        ((4, 3, 200, 10), "tzyx", "0.4", (1, 3, 128, 10), None),
    ],
)
def test_derive_layout_defaults(shape, dims, version, chunks, shards):
    layout = derive_layout(shape, dims, ngff_version=version)
    assert layout == ArrayLayout(chunks, shards)
    assert layout.write_chunks == (shards or chunks)


def test_derive_layout_default_version_is_sharded():
    assert derive_layout((512, 512), "yx") == ArrayLayout((64, 64), (256, 256))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"chunks": 16}, ArrayLayout((1, 16, 16, 16), (1, 64, 64, 64))),
        ({"chunks": (8, 16, 32)}, ArrayLayout((1, 8, 16, 32), (1, 32, 64, 128))),
        ({"chunks": (5, 8, 16, 32)}, ArrayLayout((1, 8, 16, 32), (1, 32, 64, 128))),
        ({"chunks": np.int64(16), "shards": 32}, ArrayLayout((1, 16, 16, 16), (1, 32, 32, 32))),
        ({"chunks": 16, "shards": (16, 48, 160)}, ArrayLayout((1, 16, 16, 16), (1, 16, 48, 160))),
        ({"chunks": (1, 8, 8, 8), "shards": (1, 8, 16, 24)}, ArrayLayout((1, 8, 8, 8), (1, 8, 16, 24))),  # noqa: E501
        ({"shards": 128}, ArrayLayout((1, 64, 64, 64), (1, 128, 128, 128))),
    ],
)  # fmt: skip
def test_derive_layout_explicit(kwargs, expected):
    assert derive_layout((3, 200, 300, 400), "czyx", ngff_version="0.5", **kwargs) == expected


def test_derive_layout_explicit_04():
    layout = derive_layout((2, 50, 60), "cyx", ngff_version="0.4", chunks=(16, 100))
    assert layout == ArrayLayout((1, 16, 60), None)


def test_derive_layout_caps_to_the_shape():
    layout = derive_layout((5, 37, 200), "zyx", chunks=16)
    assert layout == ArrayLayout((5, 16, 16), (5, 48, 64))


def test_derive_layout_explicit_chunks_capped_below_a_valid_shard():
    # 16 is a multiple of the requested 8; that the z chunk is capped to the 3 planes of the
    # array does not make the request invalid.
    layout = derive_layout((3, 37, 50), "zyx", chunks=8, shards=16)
    assert layout == ArrayLayout((3, 8, 8), (3, 16, 16))


@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (0, 10, 10), (63, 65, 257), (5, 1000, 3), (129, 2, 2)]
)
@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_derive_layout_shards_are_positive_multiples_of_chunks(shape, version):
    layout = derive_layout(shape, "zyx", ngff_version=version)
    assert all(c >= 1 for c in layout.chunks)
    for s, c in zip(layout.write_chunks, layout.chunks, strict=True):
        assert s >= 1
        assert s % c == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"shards": 256, "ngff_version": "0.4"}, ValueError, "`shards` needs NGFF 0.5"),
        ({"chunks": 16, "shards": 40}, ValueError, r"`shards` \(40, 40\) must be a whole multiple"),
        ({"chunks": (16, 32), "shards": (32, 48)}, ValueError, "must be a whole multiple"),
        ({"chunks": 0}, ValueError, "`chunks` must be >= 1 on every axis"),
        ({"chunks": (8, -1)}, ValueError, "`chunks` must be >= 1"),
        ({"chunks": 8, "shards": 0}, ValueError, "`shards` must be >= 1"),
        ({"chunks": (8, 8, 8)}, ValueError, r"`chunks` needs one integer per spatial axis \(2\)"),
        ({"chunks": (8,)}, ValueError, r"or per axis \(2\), got \(8,\)"),
        ({"shards": (64, 64, 64, 64)}, ValueError, "`shards` needs one integer per spatial"),
        ({"chunks": (8.0, 8)}, TypeError, "`chunks` needs integers"),
        ({"chunks": ("8", 8)}, TypeError, "`chunks` needs integers"),
        ({"shards": (64, None)}, TypeError, "`shards` needs integers"),
        ({"chunks": 8.0}, TypeError, "`chunks` needs integers"),
        ({"shards": 64.0}, TypeError, "`shards` needs integers"),
        ({"ngff_version": "0.6"}, ValueError, "`ngff_version` must be one of"),
    ],
)
def test_derive_layout_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        derive_layout((300, 400), "yx", **kwargs)


# -- create_array ------------------------------------------------------------------------------


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_create_array_v3_metadata(tmp_path, compressor):
    layout = ArrayLayout((1, 4, 8), (1, 8, 16))
    spec = create_array(tmp_path, "0", shape=(2, 10, 20), dtype="uint16", dims="cyx",
                        layout=layout, compressor=compressor, clevel=5)  # fmt: skip
    assert spec["driver"] == "zarr3"
    assert spec["open"] is True
    assert spec["kvstore"] == Location.parse(tmp_path).kvstore_spec("0")
    arr = zarr.open_array(tmp_path / "0", mode="r")
    assert arr.shape == (2, 10, 20)
    assert arr.chunks == (1, 4, 8)
    assert arr.shards == (1, 8, 16)
    assert arr.metadata.dimension_names == ("c", "y", "x")
    assert arr.fill_value == 0
    np.testing.assert_array_equal(arr[...], 0)
    names = [type(c).__name__ for c in arr.compressors]
    expected = {"zstd": ["BloscCodec"], "lz4": ["BloscCodec"], "gzip": ["GzipCodec"]}
    assert names == expected.get(compressor, [])
    if compressor in ("zstd", "lz4"):
        assert arr.compressors[0].cname.value == compressor
        assert arr.compressors[0].clevel == 5


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_create_array_v2_metadata(tmp_path, compressor):
    create_array(tmp_path, "1", shape=(10, 20), dtype="bool", dims="yx",
                 layout=ArrayLayout((4, 8)), zarr_format=2, compressor=compressor)  # fmt: skip
    meta = json.loads((tmp_path / "1" / ".zarray").read_text())
    assert meta["chunks"] == [4, 8]
    assert meta["dimension_separator"] == "/"
    assert meta["fill_value"] is False
    expected_id = {"zstd": "blosc", "lz4": "blosc", "gzip": "gzip"}.get(compressor)
    assert (meta["compressor"] or {}).get("id") == expected_id
    arr = zarr.open_array(tmp_path / "1", mode="r")
    assert arr.dtype == np.bool_
    assert not arr[...].any()


def test_create_array_unsharded_v3(tmp_path, random_array):
    layout = ArrayLayout((4, 8))
    spec = create_array(tmp_path, "0", shape=(10, 20), dtype="int32", dims="yx", layout=layout)
    data = random_array((10, 20), "int32")
    write_blocks(da.from_array(data, chunks=(4, 8)), spec, layout.write_chunks).compute()
    arr = zarr.open_array(tmp_path / "0", mode="r")
    assert arr.shards is None
    assert arr.chunks == (4, 8)
    np.testing.assert_array_equal(arr[...], data)


def test_create_array_replaces_an_earlier_array(tmp_path, random_array):
    first = ArrayLayout((4, 4), (8, 8))
    spec1 = create_array(tmp_path, "0", shape=(16, 16), dtype="uint8", dims="yx", layout=first)
    write_blocks(da.ones((16, 16), dtype="uint8", chunks=8), spec1, (8, 8)).compute()
    second = ArrayLayout((3, 3), (6, 6))
    spec2 = create_array(tmp_path, "0", shape=(7, 5), dtype="uint8", dims="yx", layout=second)
    assert spec2["token"] != spec1["token"]
    data = random_array((7, 5), "uint8", seed=1)
    write_blocks(da.from_array(data, chunks=6), spec2, (6, 6)).compute()
    arr = zarr.open_array(tmp_path / "0", mode="r")
    assert arr.shape == (7, 5)
    np.testing.assert_array_equal(arr[...], data)
    assert set(Location.parse(tmp_path).list_sizes("0")) == {
        "zarr.json", "c/0/0", "c/1/0"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"compressor": "blosc"}, "`compressor` must be one of"),
        ({"compressor": None}, "`compressor` must be one of"),
        ({"zarr_format": 2, "layout": ArrayLayout((4, 4), (8, 8))}, "shards need zarr v3"),
    ],
)
def test_create_array_validation(tmp_path, kwargs, match):
    args = {"shape": (8, 8), "dtype": "uint8", "dims": "yx", "layout": ArrayLayout((4, 4))}
    with pytest.raises(ValueError, match=match):
        create_array(tmp_path, "0", **{**args, **kwargs})
    assert not Location.parse(tmp_path).exists("0")


# -- write_blocks ------------------------------------------------------------------------------


def _data_keys(url, path="0"):
    keys = Location.parse(url).list_sizes(path)
    return sorted(k for k in keys if k not in ("zarr.json", ".zarray"))


@pytest.mark.parametrize("zarr_format", [3, 2])
@pytest.mark.parametrize(
    "chunks", [(5, 8), (6, 4), ((8, 4, 8, 1), 8), (16, (12, 10)), ((4, 12, 5), 8)]
)
def test_write_blocks_refuses_misaligned_blocks(tmp_path, zarr_format, chunks):
    layout = ArrayLayout((4, 4), (8, 8)) if zarr_format == 3 else ArrayLayout((8, 8))
    spec = create_array(tmp_path, "0", shape=(21, 22), dtype="uint8", dims="yx",
                        layout=layout, zarr_format=zarr_format)  # fmt: skip
    arr = da.ones((21, 22), dtype="uint8", chunks=chunks)
    with pytest.raises(ValueError, match="neither cover whole write chunks of 8 nor lie within"):
        write_blocks(arr, spec, layout.write_chunks)
    assert _data_keys(tmp_path) == []


@pytest.mark.parametrize("zarr_format", [3, 2])
@pytest.mark.parametrize(
    "chunks, tasks",
    [
        ((4, 8), (3, 3)),  # blocks inside write chunks along y, covering them along x
        ((2, (4, 4, 8, 4, 2)), (3, 3)),  # uneven blocks inside write chunks
        (((8, 8, 5), (16, 6)), (3, 2)),  # aligned along both axes
        (((1, 7, 3, 5, 4, 1), 3), None),  # x: 3 straddles 8, refused below
    ],
)
def test_write_blocks_gathers_blocks_inside_a_write_chunk_into_one_task(
    tmp_path, random_array, zarr_format, chunks, tasks
):
    layout = ArrayLayout((4, 4), (8, 8)) if zarr_format == 3 else ArrayLayout((8, 8))
    spec = create_array(tmp_path, "0", shape=(21, 22), dtype="uint16", dims="yx",
                        layout=layout, zarr_format=zarr_format)  # fmt: skip
    data = random_array((21, 22), "uint16")
    arr = da.from_array(data, chunks=chunks)
    if tasks is None:
        with pytest.raises(ValueError, match="axis 1"):
            write_blocks(arr, spec, layout.write_chunks)
        return
    counts = write_blocks(arr, spec, layout.write_chunks)
    assert counts.numblocks == tasks
    # Each write chunk is written by exactly one task: the tasks' regions tile the array and
    # their edges fall on write-chunk edges (or the array's end).
    computed = counts.compute()
    assert computed.shape == tasks
    assert computed.sum() == data.size
    for axis, n in enumerate(data.shape):
        sizes = computed.sum(axis=1 - axis) // (data.shape[1 - axis])
        edges = np.cumsum(sizes)
        assert edges[-1] == n
        assert all(e % 8 == 0 for e in edges[:-1])
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "0", mode="r")[...], data)


def test_write_blocks_gathered_keep_what_other_units_hold(tmp_path, random_array):
    # Only the shards the blocks reach are written, each by one task; the rest stay empty.
    layout = ArrayLayout((4, 4, 4), (8, 8, 8))
    spec = create_array(tmp_path, "0", shape=(16, 16, 10), dtype="int32", dims="zyx",
                        layout=layout, zarr_format=3)  # fmt: skip
    data = random_array((16, 16, 10), "int32")
    arr = da.from_array(data, chunks=(2, 4, (8, 2)))[:, :8]
    counts = write_blocks(arr, spec, layout.write_chunks)
    assert counts.numblocks == (2, 1, 2)
    assert counts.compute().sum() == 16 * 8 * 10
    back = zarr.open_array(tmp_path / "0", mode="r")[...]
    np.testing.assert_array_equal(back[:, :8], data[:, :8])
    assert not back[:, 8:].any()
    assert len(_data_keys(tmp_path)) == 4  # 2 shards along z × 2 along x, y 0..8 only


def test_writable_rechunks_only_blocks_that_straddle_write_chunks():
    nested = da.zeros((21, 22), chunks=(4, 8))
    assert writable(nested, (8, 8)) is nested
    straddling = da.zeros((21, 22), chunks=(6, 8))
    assert writable(straddling, (8, 8)).chunks == ((8, 8, 5), (8, 8, 6))


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_write_blocks_aligned_blocks_with_partial_edges(tmp_path, random_array, zarr_format):
    layout = ArrayLayout((4, 4), (8, 8)) if zarr_format == 3 else ArrayLayout((8, 8))
    spec = create_array(tmp_path, "0", shape=(21, 22), dtype="float32", dims="yx",
                        layout=layout, zarr_format=zarr_format)  # fmt: skip
    data = random_array((21, 22), "float32")
    arr = da.from_array(data, chunks=((16, 5), (8, 8, 6)))
    counts = write_blocks(arr, spec, layout.write_chunks)
    assert counts.shape == (2, 3)
    assert counts.dtype == np.int64
    assert _data_keys(tmp_path) == []  # nothing happens before compute
    computed = counts.compute()
    np.testing.assert_array_equal(computed, np.outer([16, 5], [8, 8, 6]))
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "0", mode="r")[...], data)


# -- write_image_metadata ----------------------------------------------------------------------


def test_write_image_metadata_writes_zgroup_after_zattrs(tmp_path, monkeypatch, make_image):
    written = []
    original = Location.write_json

    def spy(self, key, doc):
        written.append(key)
        original(self, key, doc)

    monkeypatch.setattr(Location, "write_json", spy)
    make_image(tmp_path, np.zeros((4, 4), "uint8"), "yx", ngff_version="0.4", n_levels=1)
    assert written == [".zattrs", ".zgroup"]
    assert json.loads((tmp_path / ".zgroup").read_text()) == {"zarr_format": 2}


def test_write_image_metadata_05_group_document(tmp_path, make_image):
    make_image(tmp_path, np.zeros((4, 4), "uint8"), "yx", n_levels=1)
    doc = json.loads((tmp_path / "zarr.json").read_text())
    assert doc["zarr_format"] == 3
    assert doc["node_type"] == "group"
    assert set(doc["attributes"]) == {"ome"}
    assert not (tmp_path / ".zattrs").exists()


def test_write_image_metadata_replaces_earlier_metadata(tmp_path, make_image):
    make_image(tmp_path, np.zeros((6, 6), "uint8"), "yx", scale=(1.0, 1.0), n_levels=1)
    ms = open_image(tmp_path)
    from voxflow.io import Dataset, Multiscale

    multiscale = Multiscale(ms.axes, (Dataset("0", (0.25, 0.5), (1.0, 2.0)),), name="new")
    write_image_metadata(tmp_path, multiscale)
    ref = open_image(tmp_path)
    assert ref.name == "new"
    assert ref.scale == (0.25, 0.5)
    assert ref.translation == (1.0, 2.0)
    assert ref.provenance is None


def _uint16_omero(n):
    window = {"min": 0.0, "max": 65535.0, "start": 500.0, "end": 2500.0}
    channels = [{"label": f"ch{i}", "color": "00FF00", "active": True, "window": dict(window)}
                for i in range(n)]  # fmt: skip
    return {"channels": channels, "rdefs": {"model": "color"}}


@pytest.mark.parametrize("version", ["0.5", "0.4"])
@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_fit_windows_take_each_channel_window_from_the_coarsest_level(
    tmp_path, make_image, dtype, version
):
    rng = np.random.default_rng(3)
    values = rng.random((2, 4, 24, 20)) * np.array([1.0, 0.25])[:, None, None, None]
    data = values.astype(np.float32) if dtype == "float32" else (values * 255).astype(np.uint8)
    omero = _uint16_omero(2)
    levels = make_image(tmp_path, data, "czyx", ngff_version=version, omero=omero)
    ref = open_image(tmp_path)
    from voxflow.io import Dataset, Multiscale

    datasets = tuple(Dataset(lv.path, lv.scale, lv.translation) for lv in ref.levels)
    multiscale = Multiscale(ref.axes, datasets, name=ref.name)
    write_image_metadata(tmp_path, multiscale, ngff_version=version, omero=omero, fit_windows=True)
    fitted = open_image(tmp_path).omero
    (ImageV05 if version == "0.5" else ImageV04).from_zarr(zarr.open_group(tmp_path, mode="r"))
    for c, channel in enumerate(fitted["channels"]):
        coarsest = levels[-1][c]
        start, end = np.percentile(coarsest, (0.5, 99.8))
        low, high = (coarsest.min(), coarsest.max()) if dtype == "float32" else (0, 255)
        assert channel["window"] == pytest.approx(
            {"min": low, "max": high, "start": start, "end": end}
        )
        assert {k: v for k, v in channel.items() if k != "window"} == {
            k: v for k, v in omero["channels"][c].items() if k != "window"
        }
    assert fitted["rdefs"] == omero["rdefs"]
    # Without fit_windows the windows are written as given.
    write_image_metadata(tmp_path, multiscale, ngff_version=version, omero=omero)
    assert open_image(tmp_path).omero == omero


def test_fit_windows_sample_a_large_level_and_keep_what_has_no_values():
    from voxflow.io.omero import fit_windows, sample_steps

    assert sample_steps((2, 1000, 1000, 1000), "czyx") == (1, 7, 7, 7)  # 143³ ≤ 2**22 < 167³
    assert sample_steps((3, 40, 50), "cyx") == (1, 1, 1)
    assert sample_steps((1, 1, 4096, 4096), "tcyx", voxels=4096) == (64, 1, 64, 64)
    nan = np.full((2, 3), np.nan, dtype=np.float32)
    omero = _uint16_omero(1)
    assert fit_windows(omero, nan, "yx") == omero
    assert fit_windows(None, nan, "yx") is None


# -- check_output / clear_output ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "inputs", "word"),
    [
        ("in.zarr", ["in.zarr"], "is"),
        ("in.zarr/out.zarr", ["other.zarr", "in.zarr"], "lies inside"),
        ("in.zarr/0", ["in.zarr"], "lies inside"),
        (".", ["in.zarr"], "contains"),
    ],
)
def test_check_output_refuses_outputs_that_touch_inputs(tmp_path, output, inputs, word):
    (tmp_path / "in.zarr").mkdir()
    out = tmp_path / output
    with pytest.raises(ValueError, match=f"output .* {word} the input .*; choose another path"):
        check_output(out, [tmp_path / i for i in inputs], overwrite=True)


def test_check_output_accepts_siblings_and_creates_nothing(tmp_path):
    before = sorted(tmp_path.rglob("*"))
    out = check_output(tmp_path / "in.zarr2", [tmp_path / "in.zarr", "memory://in.zarr2"])
    assert out == Location.parse(tmp_path / "in.zarr2")
    assert sorted(tmp_path.rglob("*")) == before
    mem = check_output("memory://out-never-written", ["memory://in"])
    assert not mem.exists()


def test_check_output_existing(tmp_path, make_image):
    out = tmp_path / "out.zarr"
    make_image(out, np.zeros((4, 4), "uint8"), "yx", n_levels=1)
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        check_output(out, [])
    assert check_output(out, [], overwrite=True) == Location.parse(out)
    assert open_image(out).shape == (4, 4)  # still intact


def test_overwrite_never_replaces_data_that_voxflow_did_not_make(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.txt").write_text("years of work")
    plain = tmp_path / "notes.txt"
    plain.write_text("x")
    for out in (folder, plain):
        assert not replaceable(out)
        with pytest.raises(FileExistsError, match="neither a zarr hierarchy nor a voxflow output"):
            check_output(out, [], overwrite=True)
    assert (folder / "chapter1.txt").read_text() == "years of work"
    assert plain.read_text() == "x"
    # A run folder is recognised by the marker its stage names.
    (folder / "run.json").write_text("{}")
    assert not replaceable(folder) and replaceable(folder, markers=("run.json",))
    assert check_output(folder, [], overwrite=True, markers=("run.json",)) == Location.parse(folder)


@pytest.mark.parametrize(
    "content", [None, {}, {"sub/": None}, {INCOMPLETE_MARKER: "{}", "0/c/0": "x"},
                {".zarray": "{}"}, {".zgroup": "{}"}, {"zarr.json": "{}"}],
)  # fmt: skip
def test_overwrite_replaces_zarr_nodes_unfinished_outputs_and_empty_folders(tmp_path, content):
    out = tmp_path / "out.zarr"
    if content is not None:
        out.mkdir()
        for key, text in content.items():
            (out / key).parent.mkdir(parents=True, exist_ok=True)
            if text is None:
                (out / key).mkdir()
            else:
                (out / key).write_text(text)
    assert replaceable(out)
    assert check_output(out, [], overwrite=True) == Location.parse(out)


def test_overwrite_guard_in_memory():
    loc = Location.parse("memory://guard-test")
    loc.write_bytes("data.bin", b"x")
    assert not replaceable(loc)
    loc.write_json("zarr.json", {})
    assert replaceable(loc)
    loc.delete()


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_clear_output_removes_everything_metadata_first(tmp_path, monkeypatch, make_image, version):
    out = tmp_path / "out.zarr"
    make_image(out, np.ones((9, 9), "uint8"), "yx", ngff_version=version, chunks=4)
    (out / "notes.txt").write_text("x")
    deleted = []
    original = Location.delete

    def spy(self, key=""):
        deleted.append(key)
        original(self, key)

    monkeypatch.setattr(Location, "delete", spy)
    clear_output(out)
    assert deleted[-1] == ""
    assert set(deleted[:-1]) == {"zarr.json", ".zattrs", ".zgroup"}
    assert not out.exists()
    assert tmp_path.exists()
    with pytest.raises(FileNotFoundError):
        open_image(out)
    clear_output(out)  # clearing nothing is fine


# -- provenance --------------------------------------------------------------------------------


def test_provenance_fields(tmp_path, make_image):
    make_image(tmp_path / "in.zarr", np.zeros((4, 4), "uint8"), "yx", n_levels=1)
    source = open_image(tmp_path / "in.zarr")
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    params = {"factors": (2, 2), "path": tmp_path, "nested": {"a": [1, 2.5]}}
    record = provenance("pyramid", "mean", params, source)
    after = dt.datetime.now(dt.UTC)
    assert set(record) == {"version", "stage", "method", "parameters", "input", "created"}
    assert record["version"] == pkg_version("voxflow")
    assert record["stage"] == "pyramid"
    assert record["method"] == "mean"
    assert record["parameters"] == {
        "factors": [2, 2], "path": str(tmp_path), "nested": {"a": [1, 2.5]}
    }  # fmt: skip
    assert record["input"] == {"url": source.url, "fingerprint": source.fingerprint}
    created = dt.datetime.fromisoformat(record["created"])
    assert created.utcoffset() == dt.timedelta(0)
    assert before <= created <= after
    json.dumps(record)


def test_provenance_without_source():
    record = provenance("segment", None, {}, None)
    assert record["input"] is None
    assert record["method"] is None
    assert record["parameters"] == {}


def test_an_output_below_a_file_is_refused_before_anything_is_written(tmp_path):
    from voxflow.io import check_output

    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    for output in (blocker / "out.ome.zarr", blocker / "deeper" / "out.ome.zarr"):
        with pytest.raises(ValueError, match=r"lies below .*afile, which is a file"):
            check_output(str(output), [])
    with pytest.raises(FileExistsError, match="neither a zarr hierarchy nor a voxflow output"):
        check_output(str(blocker), [], overwrite=True)
    assert blocker.read_text() == "not a folder"
    assert check_output(str(tmp_path / "new" / "out.ome.zarr"), []).path.endswith("out.ome.zarr")


@pytest.mark.parametrize(
    ("chunks", "covers"),
    [
        (((8, 8, 5), (16, 6)), True),  # whole write chunks, the last blocks partial
        (((21,), (22,)), True),  # one block, the whole array
        (((4, 4, 8, 5), (22,)), False),  # blocks inside write chunks along y
        (((8, 13), (16, 6)), True),
        (((8, 8, 5), (11, 11)), False),
    ],
)
def test_blocks_cover_units_when_each_block_is_written_alone(tmp_path, chunks, covers):
    from voxflow.io.writer import blocks_cover_units

    layout = ArrayLayout((4, 4), (8, 8))
    assert blocks_cover_units(chunks, layout.write_chunks) is covers
    if covers:  # then write_blocks has one task per block, none gathering blocks
        spec = create_array(tmp_path, "0", shape=(21, 22), dtype="uint16", dims="yx",
                            layout=layout)  # fmt: skip
        arr = da.zeros((21, 22), "uint16", chunks=chunks)
        assert write_blocks(arr, spec, layout.write_chunks).numblocks == arr.numblocks

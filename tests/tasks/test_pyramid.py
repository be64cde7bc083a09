import uuid

import numpy as np
import pytest

from tests.conftest import block_reduce_reference, mean_reference, snapshot
from voxflow.io import ArrayLayout, open_image, read_level, reader, write_image
from voxflow.tasks import PyramidParams, make_pyramid, plan_pyramid
from voxflow.tasks.pyramid import _compute_chunks, default_output


@pytest.fixture
def counted_reads(monkeypatch):
    """Voxels read from stores, per call."""
    calls = []
    original = reader.TensorStoreSource.__getitem__

    def counting(self, index):
        calls.append(int(np.prod([s.stop - s.start for s in index])))
        return original(self, index)

    monkeypatch.setattr(reader.TensorStoreSource, "__getitem__", counting)
    return calls


def _image(url, shape=(40, 70, 66), seed=0, dtype=np.uint16):
    data = np.random.default_rng(seed).integers(0, 3000, shape).astype(dtype)
    write_image(url, data, "zyx", (1.0, 1.0, 1.0), chunks=8, shards=16)
    return data


@pytest.mark.parametrize("in_place", [True, False])
def test_level0_is_read_once_for_all_levels(tmp_path, counted_reads, in_place):
    src = str(tmp_path / "in.ome.zarr")
    data = _image(src)
    params = PyramidParams(chunks=(8, 8, 8), shards=(16, 16, 16), min_size=4)
    ref = make_pyramid(
        open_image(src), None if in_place else str(tmp_path / "out.ome.zarr"), params,
        in_place=in_place,
    )  # fmt: skip
    assert len(ref.levels) >= 4
    assert sum(counted_reads) == data.size
    cur = data
    for i in range(1, len(ref.levels)):
        prev, lv = ref.levels[i - 1], ref.levels[i]
        factors = tuple(round(b / a) for a, b in zip(prev.scale, lv.scale, strict=True))
        cur = mean_reference(cur, factors)
        np.testing.assert_array_equal(read_level(ref, i).compute(), cur)


def test_memory_location_round_trip():
    url = f"memory://{uuid.uuid4().hex}/in.ome.zarr"
    data = _image(url, shape=(9, 30, 17), dtype=np.int32)
    out = url.replace("in.ome", "out.ome")
    ref = make_pyramid(open_image(url), out, PyramidParams(method="mode", levels=2))
    mode = block_reduce_reference(
        data, (2, 2, 2), lambda b: np.unique(b, return_counts=True)[0][
            np.argmax(np.unique(b, return_counts=True)[1])]
    )  # fmt: skip
    np.testing.assert_array_equal(read_level(ref, 1).compute(), mode.astype(np.int32))


def test_ngff_04_output(tmp_path):
    src = str(tmp_path / "in.ome.zarr")
    data = _image(src, shape=(12, 20, 20))
    ref = make_pyramid(
        open_image(src), str(tmp_path / "o.zarr"),
        PyramidParams(ngff_version="0.4", levels=2, method="min"),
    )  # fmt: skip
    assert ref.ngff_version == "0.4" and ref.zarr_format == 2
    want = block_reduce_reference(data, (2, 2, 2), np.min).astype(data.dtype)
    np.testing.assert_array_equal(read_level(ref, 1).compute(), want)


@pytest.mark.parametrize(
    ("layout", "factors", "itemsize", "expected"),
    [
        # a 256³ shard of uint16 from 2×2×2: 128³ source blocks of 4 MiB
        (ArrayLayout((64, 64, 64), (256, 256, 256)), (2, 2, 2), 2, (64, 64, 64)),
        (ArrayLayout((1, 64, 64, 64), (1, 256, 256, 256)), (1, 2, 2, 2), 2, (1, 64, 64, 64)),
        # a small level stays one block
        (ArrayLayout((8, 8, 8), (16, 16, 16)), (2, 2, 2), 2, (16, 16, 16)),
        # unsharded zarr v2 chunks are split too, never below 16 voxels an axis
        (ArrayLayout((128, 128, 128)), (2, 2, 2), 1, (64, 64, 128)),
        (ArrayLayout((16, 16, 16), (16, 16, 16)), (8, 8, 8), 8, (16, 16, 16)),
    ],
)
def test_compute_chunks_divide_the_write_unit(layout, factors, itemsize, expected):
    got = _compute_chunks(layout, factors, itemsize)
    assert got == expected
    assert all(w % g == 0 for w, g in zip(layout.write_chunks, got, strict=True))


def test_plan_validation(tmp_path):
    src = str(tmp_path / "in.ome.zarr")
    _image(src, shape=(8, 8, 8))
    ref = open_image(src)
    with pytest.raises(ValueError, match="one integer per spatial axis"):
        plan_pyramid(ref, PyramidParams(factors=(2, 2)))
    with pytest.raises(ValueError, match=r"keeps the input's NGFF version 0\.5"):
        plan_pyramid(ref, PyramidParams(ngff_version="0.4"), in_place=True)
    bools = str(tmp_path / "b.ome.zarr")
    write_image(bools, np.ones((4, 4), bool), "yx", (1.0, 1.0))
    with pytest.raises(ValueError, match="needs numeric voxels"):
        plan_pyramid(open_image(bools), PyramidParams(method="mean"))
    with pytest.raises(ValueError, match="`output` is required"):
        make_pyramid(ref, None, PyramidParams())


def test_default_output_names():
    assert default_output("/d/brain.ome.zarr") == "/d/brain.pyramid.ome.zarr"
    assert default_output("/d/x.zarr/") == "/d/x.pyramid.zarr"
    assert default_output("/d/raw") == "/d/raw.pyramid.ome.zarr"


def test_level0_encoded_alike_is_copied_byte_for_byte(tmp_path):
    src = str(tmp_path / "in.ome.zarr")
    data = _image(src, shape=(20, 34, 40))
    out = str(tmp_path / "out.ome.zarr")
    same = PyramidParams(chunks=(8, 8, 8), shards=(16, 16, 16), levels=2)
    ref = make_pyramid(open_image(src), out, same)
    contents = {k: v[0] for k, v in snapshot(f"{src}/0").items()}
    assert contents == {k: v[0] for k, v in snapshot(f"{out}/0").items()}
    np.testing.assert_array_equal(read_level(ref, 0).compute(), data)


def test_level0_encoded_differently_is_rewritten(tmp_path):
    src = str(tmp_path / "in.ome.zarr")
    data = _image(src, shape=(20, 34, 40))
    out = str(tmp_path / "out.ome.zarr")
    other = PyramidParams(chunks=(4, 4, 4), shards=(8, 8, 8), levels=2, compressor="lz4")
    ref = make_pyramid(open_image(src), out, other)
    assert ref.levels[0].chunks == (4, 4, 4) and ref.levels[0].shards == (8, 8, 8)
    assert set(snapshot(f"{src}/0")) != set(snapshot(f"{out}/0"))
    np.testing.assert_array_equal(read_level(ref, 0).compute(), data)
    np.testing.assert_array_equal(read_level(ref, 1).compute(), mean_reference(data, (2, 2, 2)))


def test_an_interrupted_pyramid_is_visibly_unfinished_and_the_same_command_finishes_it(
    tmp_path, monkeypatch
):
    import voxflow.tasks.pyramid as pyr
    from voxflow.io import INCOMPLETE_MARKER
    from voxflow.tasks import check_pyramid

    data = np.random.default_rng(4).integers(0, 900, (20, 40, 36), dtype=np.uint16)
    src = str(tmp_path / "in.ome.zarr")
    write_image(src, data, "zyx", (1.0, 1.0, 1.0), chunks=8, shards=16)
    out = tmp_path / "out.ome.zarr"
    params = PyramidParams(levels=3, min_size=4)
    real = pyr.compute_blocks

    def half_then_fail(writes, progress=None, extra=()):
        real(writes[:1], None, extra=extra)  # level 0 lands, then the disk fills up
        raise OSError("disk full")

    monkeypatch.setattr(pyr, "compute_blocks", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        make_pyramid(open_image(src), str(out), params)
    assert (out / INCOMPLETE_MARKER).exists() and (out / "0").exists()
    with pytest.raises(ValueError, match="unfinished output"):
        open_image(str(out))
    monkeypatch.undo()
    # The same command takes it up again without --overwrite and completes it.
    check_pyramid(src, str(out), params, in_place=False, overwrite=False)
    ref = make_pyramid(open_image(src), str(out), params)
    assert not (out / INCOMPLETE_MARKER).exists() and len(ref.levels) == 3
    np.testing.assert_array_equal(read_level(ref, 0).compute(), data)
    np.testing.assert_array_equal(read_level(ref, 1).compute(), mean_reference(data, (2, 2, 2)))
    # A finished output is refused again without --overwrite.
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_pyramid(src, str(out), params, in_place=False, overwrite=False)

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from voxflow.core.objects import OBJECT_COLUMNS, count_map, density_map, object_table

SHAPE = (13, 17, 19)
CHUNKINGS = [
    (13, 17, 19),  # one block
    (4, 5, 6),  # chunks that do not divide the shape
    (1, 3, 2),  # thin chunks: every object spans many blocks
    ((1, 11, 1), (16, 1), (5, 5, 5, 4)),  # 1-voxel edge chunks
]


def _labels(seed=0, shape=SHAPE):
    """Blobs of smoothed noise with non-consecutive, shuffled labels."""
    rng = np.random.default_rng(seed)
    blobs = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0) > 0.15
    consecutive, n = ndimage.label(blobs)
    ids = rng.permutation(n) * 7 + 1000  # gaps, and labels unrelated to position
    return np.where(consecutive > 0, ids[consecutive - 1], 0).astype(np.int32), n


def _reference(labels, image):
    """Per-label statistics by SciPy on the whole array, sorted by label."""
    present = np.unique(labels[labels != 0])
    consecutive = np.searchsorted(present, labels) + 1
    consecutive[labels == 0] = 0
    index = np.arange(1, present.size + 1)
    centroids = np.array(ndimage.center_of_mass(np.ones(labels.shape), consecutive, index))
    boxes = ndimage.find_objects(consecutive)
    return {
        "label": present,
        "centroid": centroids,
        "voxels": ndimage.sum(np.ones(labels.shape), consecutive, index),
        "lo": np.array([[s.start for s in box] for box in boxes]),
        "hi": np.array([[s.stop for s in box] for box in boxes]),
        "mean": ndimage.mean(image, consecutive, index),
        "max": ndimage.maximum(image, consecutive, index),
    }


@pytest.mark.parametrize("chunks", CHUNKINGS, ids=str)
@pytest.mark.parametrize("image_dtype", [np.uint16, np.float32])
def test_object_table_equals_scipy_on_the_whole_array(chunks, image_dtype):
    labels, n = _labels(seed=1)
    rng = np.random.default_rng(2)
    image = rng.integers(0, 4000, SHAPE).astype(image_dtype)
    # The image's chunks differ from the labels': they are rechunked.
    got = object_table(
        da.from_array(labels, chunks=chunks), image=da.from_array(image, chunks=(5, 5, 5))
    )
    ref = _reference(labels, image)
    assert n > 10 and len(got) == n
    assert list(got.columns) == [*OBJECT_COLUMNS, "mean_intensity", "max_intensity"]
    np.testing.assert_array_equal(got["label"], ref["label"])
    np.testing.assert_allclose(got[["z", "y", "x"]], ref["centroid"], rtol=1e-12)
    np.testing.assert_array_equal(got["voxels"], ref["voxels"])
    np.testing.assert_array_equal(got[["bbox_z0", "bbox_y0", "bbox_x0"]], ref["lo"])
    np.testing.assert_array_equal(got[["bbox_z1", "bbox_y1", "bbox_x1"]], ref["hi"])
    np.testing.assert_allclose(got["mean_intensity"], ref["mean"], rtol=1e-6)
    np.testing.assert_array_equal(got["max_intensity"], ref["max"])


def test_an_object_over_many_chunks_is_one_row():
    labels = np.zeros((8, 8, 8), np.uint16)
    labels[1:7, 2:8, 0:5] = 9
    got = object_table(da.from_array(labels, chunks=2))
    assert got["label"].tolist() == [9]
    assert got.loc[0, "voxels"] == 6 * 6 * 5
    assert got.loc[0, ["z", "y", "x"]].tolist() == [3.5, 4.5, 2.0]
    box = ["bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1"]
    assert got.loc[0, box].tolist() == [1, 2, 0, 7, 8, 5]


def test_physical_columns_use_scale_and_translation():
    labels, _ = _labels(seed=3)
    scale, translation = (4.0, 1.6, 0.8), (10.0, -3.0, 0.5)
    got = object_table(labels, scale=scale, translation=translation)
    for i, axis in enumerate("zyx"):
        np.testing.assert_allclose(
            got[f"{axis}_um"], translation[i] + scale[i] * got[axis], rtol=1e-12
        )
    np.testing.assert_allclose(got["volume_um3"], got["voxels"] * 4.0 * 1.6 * 0.8)


def test_numpy_and_dask_labels_give_the_same_table():
    labels, _ = _labels(seed=4)
    image = np.random.default_rng(5).random(SHAPE)
    from_numpy = object_table(labels, image=image)
    from_dask = object_table(da.from_array(labels, chunks=(3, 7, 4)), image=image)
    pd.testing.assert_frame_equal(from_numpy, from_dask, check_exact=False, rtol=1e-12)


@pytest.mark.parametrize("with_image", [False, True])
def test_no_labels_give_no_rows_with_the_right_columns_and_dtypes(with_image):
    labels = da.zeros((5, 6, 7), dtype=np.int64, chunks=3)
    image = np.ones((5, 6, 7), np.float32) if with_image else None
    got = object_table(labels, image=image)
    extra = ["mean_intensity", "max_intensity"] if with_image else []
    assert len(got) == 0
    assert list(got.columns) == [*OBJECT_COLUMNS, *extra]
    ints = {"label", "voxels", "bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1"}
    for name in got.columns:
        assert got[name].dtype == (np.int64 if name in ints else np.float64), name


def test_object_table_runs_on_a_distributed_client():
    distributed = pytest.importorskip("distributed")
    labels, n = _labels(seed=6)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2):
        got = object_table(da.from_array(labels, chunks=5))
    assert len(got) == n
    np.testing.assert_array_equal(got["label"], np.unique(labels[labels > 0]))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"labels": [[[1]]]}, TypeError, "`labels` must be a NumPy or Dask array"),
        ({"labels": np.zeros((3, 3), int)}, ValueError, "3-D integer array"),
        ({"labels": np.zeros((3, 3, 3), float)}, ValueError, "3-D integer array"),
        ({"image": np.zeros((3, 3, 2))}, ValueError, "`image` must have the shape"),
        ({"image": "bright"}, TypeError, "`image` must be a NumPy or Dask array"),
        ({"image": np.zeros((3, 3, 3), "U1")}, TypeError, "`image` must be numeric"),
        ({"scale": (1.0, 1.0)}, ValueError, "`scale` needs one number per axis"),
        ({"scale": (1.0, 0.0, 1.0)}, ValueError, "`scale` must hold positive"),
        ({"scale": 2.0}, TypeError, "`scale` must be a sequence"),
        ({"translation": (0, np.nan, 0)}, ValueError, "`translation` must hold finite"),
    ],
)
def test_object_table_validation(kwargs, error, match):
    kwargs = {"labels": np.zeros((3, 3, 3), np.int32), **kwargs}
    with pytest.raises(error, match=match):
        object_table(kwargs.pop("labels"), **kwargs)


# --------------------------------------------------------------------------- count, density


def _count_reference(centroids, shape, block):
    out = np.zeros([-(-n // b) for n, b in zip(shape, block, strict=True)], np.int64)
    for c in centroids:
        voxel = [min(max(int(np.floor(v + 0.5)), 0), n - 1) for v, n in zip(c, shape, strict=True)]
        out[tuple(v // b for v, b in zip(voxel, block, strict=True))] += 1
    return out


@pytest.mark.parametrize("block", [4, (5, 3, 7), (20, 20, 20), 1])
def test_count_map_equals_a_loop_and_sums_to_n(block):
    shape = (11, 13, 9)
    rng = np.random.default_rng(7)
    centroids = rng.uniform(-0.6, np.array(shape) - 0.4, (300, 3))  # some clip at each end
    got = count_map(centroids, shape, block)
    blocks = (block,) * 3 if isinstance(block, int) else block
    assert got.dtype == np.int64
    assert got.shape == tuple(-(-n // b) for n, b in zip(shape, blocks, strict=True))
    assert got.sum() == 300
    np.testing.assert_array_equal(got, _count_reference(centroids, shape, blocks))


def test_count_map_rounds_half_up_and_clips_to_the_array():
    shape, block = (4, 4, 4), 2
    centroids = np.array(
        [
            [1.5, 0.0, 0.0],  # voxel 2 → cell 1 along z
            [1.49, 0.0, 0.0],  # voxel 1 → cell 0
            [-0.7, 0.0, 0.0],  # clipped to voxel 0
            [3.9, 3.9, 3.9],  # voxel 4 clipped to 3 → cell 1
        ]
    )
    got = count_map(centroids, shape, block)
    assert got[1, 0, 0] == 1 and got[0, 0, 0] == 2 and got[1, 1, 1] == 1
    assert got.sum() == 4
    assert count_map(np.zeros((0, 3)), shape, block).sum() == 0


def test_density_map_uses_the_real_volume_of_edge_cells():
    shape, block, scale = (10, 6, 7), (4, 6, 5), (2.0, 1.5, 0.5)
    counts = np.arange(6, dtype=np.int64).reshape(3, 1, 2)
    got = density_map(counts, shape, block, scale)
    voxel_mm3 = 2.0 * 1.5 * 0.5 * 1e-9
    expected = np.empty((3, 1, 2))
    for index in np.ndindex(*expected.shape):
        cell = [
            min(b, n - i * b) for i, n, b in zip(index, shape, block, strict=True)
        ]  # 4, 4, 2 along z; 5, 2 along x
        expected[index] = counts[index] / (np.prod(cell) * voxel_mm3)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[2, 0, 1] == pytest.approx(5 / (2 * 6 * 2 * voxel_mm3))


def test_density_of_a_count_map_integrates_back_to_the_count():
    shape, block, scale = (9, 10, 11), 4, (3.0, 1.0, 1.0)
    centroids = np.random.default_rng(8).uniform(0, 8.9, (50, 3))
    counts = count_map(centroids, shape, block)
    density = density_map(counts, shape, block, scale)
    cells = np.ones(counts.shape)
    for axis, n in enumerate(shape):
        sizes = np.minimum(block, n - np.arange(counts.shape[axis]) * block)
        cells = cells * np.expand_dims(sizes, [a for a in range(3) if a != axis])
    assert (density * cells * np.prod(scale) * 1e-9).sum() == pytest.approx(50)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: count_map(np.zeros((2, 2)), (4, 4, 4), 2), ValueError, r"shape \(N, 3\)"),
        (lambda: count_map([[np.nan, 0, 0]], (4, 4, 4), 2), ValueError, "finite"),
        (lambda: count_map(np.zeros((1, 3), "U1"), (4, 4, 4), 2), TypeError, "numbers"),
        (lambda: count_map("abc", (4, 4, 4), 2), TypeError, "`centroids` must be"),
        (lambda: count_map(np.zeros((1, 3)), (4, 4), 2), ValueError, "`shape` needs 3"),
        (lambda: count_map(np.zeros((1, 3)), (4, 4, 4), 0), ValueError, "`block` needs 3"),
        (lambda: count_map(np.zeros((1, 3)), (4, 4, 4), 2.0), TypeError, "`block` must be"),
        (
            lambda: density_map(np.zeros((2, 2, 1)), (4, 4, 4), 2, (1, 1, 1)),
            ValueError,
            r"map shape ceil\(shape / block\) = \(2, 2, 2\)",
        ),
        (lambda: density_map([1], (4, 4, 4), 2, (1, 1, 1)), TypeError, "`counts` must be"),
        (
            lambda: density_map(np.zeros((2, 2, 2)), (4, 4, 4), 2, (1, -1, 1)),
            ValueError,
            "`scale` must hold positive",
        ),
    ],
)
def test_count_and_density_validation(call, error, match):
    with pytest.raises(error, match=match):
        call()

import dask
import dask.array as da
import numpy as np
import pytest
from skimage import exposure, filters

from voxflow.core.threshold import (
    ThresholdMethod,
    apply_threshold,
    global_threshold,
    histogram,
    threshold_from_histogram,
    threshold_local,
)

SHAPE = (20, 23, 17)
CHUNKINGS = {
    "regular": (8, 8, 8),
    "not-dividing": (5, 7, 6),
    "one-voxel-edges": ((1, 18, 1), (1, 21, 1), (16, 1)),
    "thinner-than-the-kernel": ((2, 16, 2), (3, 17, 3), (2, 13, 2)),
}
SKIMAGE = {
    "otsu": filters.threshold_otsu,
    "li": filters.threshold_li,
    "triangle": filters.threshold_triangle,
}


def _bimodal(dtype, seed=0, shape=SHAPE, low=100.0, high=180.0, spread=20.0):
    """Dim background with bright blobs: two modes of unequal size."""
    rng = np.random.default_rng(seed)
    bright = rng.random(shape) > 0.7
    values = rng.normal(np.where(bright, high, low), spread)
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    return values.astype(dtype)


# --------------------------------------------------------------------------- histogram


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32])
def test_integer_histogram_is_exact(dtype, chunks):
    image = _bimodal(dtype)
    counts, centers = histogram(da.from_array(image, chunks=chunks))
    expected_counts, expected_centers = exposure.histogram(image)
    assert counts.dtype == np.int64 and centers.dtype == np.float64
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_array_equal(centers, expected_centers)


def test_negative_integers_get_one_bin_each():
    image = _bimodal(np.int16, low=-50, high=30)
    counts, centers = histogram(da.from_array(image, chunks=(7, 5, 9)))
    np.testing.assert_array_equal(centers, np.arange(image.min(), image.max() + 1))
    np.testing.assert_array_equal(counts, np.bincount((image - image.min()).ravel()))


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_histogram_equals_skimage(dtype, chunks):
    image = _bimodal(dtype)
    counts, centers = histogram(da.from_array(image, chunks=chunks))
    expected_counts, expected_centers = exposure.histogram(image)
    assert len(counts) == 256
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_array_equal(centers, expected_centers.astype(np.float64))


def test_wide_integer_span_is_binned():
    image = _bimodal(np.int32, low=0, high=100_000, spread=5_000)
    counts, centers = histogram(da.from_array(image, chunks=(8, 8, 8)))
    expected, edges = np.histogram(image, bins=256)
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_allclose(centers, (edges[:-1] + edges[1:]) / 2)


def test_nbins_bins_an_integer_image():
    image = _bimodal(np.uint8)
    counts, centers = histogram(da.from_array(image, chunks=(8, 8, 8)), nbins=16)
    expected, edges = np.histogram(image, bins=16, range=(image.min(), image.max()))
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_allclose(centers, (edges[:-1] + edges[1:]) / 2)


def test_non_finite_voxels_are_left_out():
    image = _bimodal(np.float32)
    spoiled = image.copy()
    spoiled[0, 0, :3] = [np.nan, np.inf, -np.inf]
    counts, centers = histogram(da.from_array(spoiled, chunks=(8, 8, 8)))
    finite = spoiled[np.isfinite(spoiled)]
    expected, expected_centers = exposure.histogram(finite)
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(centers, expected_centers)


def test_histogram_of_numpy_and_any_ndim():
    image = _bimodal(np.uint8, shape=(4, 5, 6, 7))
    counts, centers = histogram(image)
    expected_counts, expected_centers = exposure.histogram(image)
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_array_equal(centers, expected_centers)


def test_histogram_never_holds_more_than_a_block():
    # Every task of the graph gets at most one block of the image (plus small histograms).
    image = da.from_array(_bimodal(np.uint16), chunks=(5, 7, 6))
    seen = []

    def record(block):
        seen.append(block.size)
        return block

    counts, _ = histogram(image.map_blocks(record, dtype=image.dtype))
    assert max(seen) <= 5 * 7 * 6
    assert counts.sum() == image.size


def test_histogram_uses_dask_compute(monkeypatch):
    calls = []
    compute = dask.compute

    def counting(*args, **kwargs):
        calls.append(len(args))
        return compute(*args, **kwargs)

    monkeypatch.setattr(dask, "compute", counting)
    histogram(da.from_array(_bimodal(np.float32), chunks=8))
    assert len(calls) == 2  # the range, then the counts


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_constant_image_has_one_bin(dtype):
    image = da.full(SHAPE, 7, dtype=dtype, chunks=8)
    counts, centers = histogram(image)
    np.testing.assert_array_equal(counts, [image.size])
    np.testing.assert_array_equal(centers, [7.0])


@pytest.mark.parametrize(
    "image", [np.zeros((0, 4), np.uint8), np.full((3, 4), np.nan, np.float32)], ids=str
)
def test_image_without_finite_voxels_has_empty_histogram(image):
    counts, centers = histogram(image)
    assert counts.shape == centers.shape == (0,)


# --------------------------------------------------------------------------- global thresholds


@pytest.mark.parametrize("method", ["otsu", "li", "triangle"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_integer_thresholds_equal_skimage(dtype, method):
    image = _bimodal(dtype, seed=3)
    got = global_threshold(da.from_array(image, chunks=(5, 7, 6)), method)
    assert got == pytest.approx(float(SKIMAGE[method](image)), rel=1e-9)


@pytest.mark.parametrize("method", ["otsu", "triangle"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_binned_thresholds_equal_skimage(dtype, method):
    image = _bimodal(dtype, seed=4)
    got = global_threshold(da.from_array(image, chunks=(5, 7, 6)), method)
    assert got == float(SKIMAGE[method](image))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_li_is_within_one_bin(dtype):
    image = _bimodal(dtype, seed=5)
    _, centers = histogram(image)
    got = global_threshold(da.from_array(image, chunks=(5, 7, 6)), ThresholdMethod.LI)
    assert abs(got - float(filters.threshold_li(image))) <= centers[1] - centers[0]


@pytest.mark.parametrize("method", [ThresholdMethod.OTSU, ThresholdMethod.LI])
def test_threshold_separates_two_well_apart_modes(method):
    image = _bimodal(np.uint16, seed=6, low=100, high=1000, spread=10)
    value = global_threshold(image, method)
    # Nothing lies between the modes (±10 sigma), so the right mask is the midpoint one.
    assert (image > 150).sum() == (image > 950).sum()
    np.testing.assert_array_equal(image > value, image > 550)


def test_threshold_from_histogram_ignores_empty_end_bins():
    image = _bimodal(np.uint8, seed=7)
    counts, centers = exposure.histogram(image)
    padded_counts = np.concatenate([[0, 0], counts, [0]])
    padded_centers = np.concatenate([centers[0] - [2, 1], centers, [centers[-1] + 1]])
    for method in ThresholdMethod:
        assert threshold_from_histogram(padded_counts, padded_centers, method) == pytest.approx(
            float(SKIMAGE[method.value](image)), rel=1e-9
        )


@pytest.mark.parametrize("method", list(ThresholdMethod))
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_constant_image_gives_its_value_and_an_empty_mask(method, dtype):
    image = da.full(SHAPE, 42, dtype=dtype, chunks=(5, 7, 6))
    value = global_threshold(image, method)
    assert value == 42.0
    assert not apply_threshold(image, value).any().compute()


@pytest.mark.parametrize("method", list(ThresholdMethod))
def test_empty_image_gives_zero(method):
    assert global_threshold(np.zeros((0, 3), np.float32), method) == 0.0


def test_two_valued_image():
    image = np.zeros(SHAPE, np.uint8)
    image[:4] = 200
    for method in ThresholdMethod:
        value = global_threshold(da.from_array(image, chunks=8), method)
        assert 0 <= value < 200
        np.testing.assert_array_equal(apply_threshold(image, value), image > 0)


# --------------------------------------------------------------------------- apply


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
def test_apply_threshold_keeps_chunks(chunks):
    image = _bimodal(np.float32)
    mask = apply_threshold(da.from_array(image, chunks=chunks), 140.5)
    assert isinstance(mask, da.Array) and mask.dtype == bool
    assert mask.chunks == da.from_array(image, chunks=chunks).chunks
    np.testing.assert_array_equal(mask.compute(), image > 140.5)


def test_apply_threshold_on_numpy_gives_numpy():
    image = _bimodal(np.uint8)
    mask = apply_threshold(image, 140)
    assert isinstance(mask, np.ndarray)
    np.testing.assert_array_equal(mask, image > 140)


# --------------------------------------------------------------------------- local


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
@pytest.mark.parametrize(
    ("method", "block_size", "mode"),
    [
        ("gaussian", 5, "reflect"),
        ("gaussian", (3, 7, 9), "constant"),
        ("mean", (3, 7, 9), "nearest"),
        ("mean", 5, "mirror"),
        ("median", 5, "reflect"),
        ("gaussian", 7, "wrap"),
    ],
)
def test_threshold_local_equals_skimage(chunks, method, block_size, mode):
    image = _bimodal(np.float32, seed=8)
    dask_image = da.from_array(image, chunks=chunks)
    mask = threshold_local(dask_image, block_size, method=method, offset=-2.0, mode=mode)
    expected = image > filters.threshold_local(image, block_size, method, -2.0, mode)
    assert mask.dtype == bool and mask.chunks == dask_image.chunks
    np.testing.assert_array_equal(mask.compute(), expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float64])
def test_threshold_local_dtypes(dtype):
    image = _bimodal(dtype, seed=9)
    mask = threshold_local(da.from_array(image, chunks=(5, 7, 6)), 9)
    np.testing.assert_array_equal(mask.compute(), image > filters.threshold_local(image, 9))


def test_threshold_local_numpy_and_2d():
    image = _bimodal(np.float32, shape=(31, 29))
    mask = threshold_local(image, 11, method="mean")
    assert isinstance(mask, da.Array)
    expected = image > filters.threshold_local(image, 11, "mean")
    np.testing.assert_array_equal(mask.compute(), expected)


@pytest.mark.parametrize("mode", ["reflect", "wrap", "constant"])
def test_threshold_local_on_axes_shorter_than_the_kernel(mode):
    image = _bimodal(np.float32, seed=11, shape=(3, 40))
    mask = threshold_local(da.from_array(image, chunks=(1, 6)), 11, mode=mode)
    assert mask.chunks == ((1, 1, 1), (6,) * 6 + (4,))
    expected = image > filters.threshold_local(image, 11, mode=mode)
    np.testing.assert_array_equal(mask.compute(), expected)


def test_gaussian_depth_is_wider_than_half_the_block():
    # sigma = 2/3 reads int(4 * 2/3 + 0.5) = 3 voxels each side, not 5 // 2 = 2. A dark spike
    # lowers the threshold exactly where the kernel reaches, so the mask shows the reach; here
    # it crosses a chunk boundary by three voxels.
    image = np.zeros((9, 12, 9), np.float32)
    image[4, 1, 4] = -1e6
    mask = threshold_local(da.from_array(image, chunks=(9, 4, 9)), 5, mode="constant")
    expected = image > filters.threshold_local(image, 5, "gaussian", 0, "constant")
    assert expected[4, 4, 4] and not expected[4, 5, 4]
    np.testing.assert_array_equal(mask.compute(), expected)


# --------------------------------------------------------------------------- validation


def test_bad_method_lists_the_choices():
    with pytest.raises(ValueError, match=r"`method` must be one of 'otsu', 'li', 'triangle'"):
        global_threshold(np.zeros(3), "kmeans")
    with pytest.raises(ValueError, match="one of 'otsu'"):
        threshold_from_histogram([1, 2], [0.0, 1.0], "isodata")
    with pytest.raises(TypeError, match="`method` must be a str or ThresholdMethod"):
        global_threshold(np.zeros(3), 1)


def test_bad_method_is_refused_before_reading_the_image():
    image = da.from_array(np.zeros(3)).map_blocks(lambda b: 1 / 0, dtype=float)
    with pytest.raises(ValueError, match="`method`"):
        global_threshold(image, "nope")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_value_is_refused(value):
    with pytest.raises(ValueError, match="`value` must be a finite number"):
        apply_threshold(np.zeros(3), value)


@pytest.mark.parametrize("value", ["1", None, True])
def test_non_real_value_is_refused(value):
    with pytest.raises(TypeError, match="`value` must be a real number"):
        apply_threshold(np.zeros(3), value)


@pytest.mark.parametrize(
    "call",
    [
        histogram,
        global_threshold,
        lambda im: apply_threshold(im, 0.5),
        lambda im: threshold_local(im, 3),
    ],
    ids=["histogram", "global_threshold", "apply_threshold", "threshold_local"],
)
@pytest.mark.parametrize(
    "image", [np.zeros(3, bool), np.zeros(3, complex), np.array(["a"])], ids=str
)
def test_non_numeric_images_are_refused(call, image):
    with pytest.raises(TypeError, match="`image` must hold integers or floats"):
        call(image)


def test_non_array_image_is_refused():
    with pytest.raises(TypeError, match="`image` must be a NumPy or Dask array, got list"):
        histogram([1, 2, 3])


@pytest.mark.parametrize(("nbins", "error"), [(0, ValueError), (2.5, TypeError)])
def test_bad_nbins(nbins, error):
    with pytest.raises(error, match="`nbins`"):
        histogram(np.arange(5.0), nbins=nbins)


@pytest.mark.parametrize(
    ("block_size", "error", "match"),
    [
        (4, ValueError, "must be odd"),
        ((3, 5), ValueError, r"one odd integer per axis \(3\)"),
        ((3, 5, 6), ValueError, "must be odd"),
        (0, ValueError, ">= 1"),
        (3.0, TypeError, "must be an integer"),
    ],
)
def test_bad_block_size(block_size, error, match):
    with pytest.raises(error, match=match):
        threshold_local(np.zeros((4, 4, 4)), block_size)


def test_bad_local_options():
    image = np.zeros((4, 4, 4))
    with pytest.raises(ValueError, match="`method` must be one of 'gaussian', 'mean', 'median'"):
        threshold_local(image, 3, method="generic")
    with pytest.raises(ValueError, match="`mode` must be one of"):
        threshold_local(image, 3, mode="edge")
    with pytest.raises(ValueError, match="`offset` must be a finite number"):
        threshold_local(image, 3, offset=np.nan)


@pytest.mark.parametrize(
    ("counts", "centers", "error", "match"),
    [
        ([1, 2], [0.0], ValueError, "one length"),
        ([[1, 2]], [[0.0, 1.0]], ValueError, "1-D"),
        ([1, -2], [0.0, 1.0], ValueError, "non-negative"),
        ([1, 2], [1.0, 0.0], ValueError, "strictly increasing"),
        (["a", "b"], [0.0, 1.0], TypeError, "numeric"),
    ],
)
def test_bad_histogram(counts, centers, error, match):
    with pytest.raises(error, match=match):
        threshold_from_histogram(counts, centers, "otsu")


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_histogram_with_a_known_range_equals_the_computed_one(dtype):
    rng = np.random.default_rng(7)
    image = (rng.random((9, 20, 17)) * 500 + 20).astype(dtype)
    darr = da.from_array(image, chunks=(4, 7, 9))
    counts, centers = histogram(darr)
    known = histogram(darr, value_range=(image.min(), image.max()))
    np.testing.assert_array_equal(known[0], counts)
    np.testing.assert_array_equal(known[1], centers)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_uniform_bin_counts_equal_numpy_histogram(dtype):
    from voxflow.core.threshold import uniform_bin_counts

    rng = np.random.default_rng(12)
    low, high = dtype(60.1), dtype(150.3)  # values on both sides are left out
    for nbins in (1, 7, 96, 256):
        values = rng.normal(100.0, 30.0, size=(20, 30, 40)).astype(dtype)
        # Values on the bin edges, where NumPy corrects the bin its arithmetic finds.
        edges = np.linspace(low, high, nbins + 1, dtype=dtype)
        values.flat[:6000] = edges[rng.integers(0, nbins + 1, size=6000)]
        values.flat[6000:6010] = np.nan
        counts, got_edges = uniform_bin_counts(values, low, high, nbins)
        want, want_edges = np.histogram(values, bins=nbins, range=(low, high))
        np.testing.assert_array_equal(counts, want)
        np.testing.assert_array_equal(got_edges, want_edges)
        assert got_edges.dtype == want_edges.dtype

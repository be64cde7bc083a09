import dask.array as da
import numpy as np
import pytest

from voxflow.plugins._field import FIELD_FLOOR, divide_field, normalise_field


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("offset", [0.0, 97.25])
def test_divide_field_equals_the_numpy_expression_bit_for_bit(dtype, offset):
    rng = np.random.default_rng(1)
    if np.issubdtype(dtype, np.integer):
        full = rng.integers(0, min(np.iinfo(dtype).max, 60000), size=(9, 20, 31)).astype(dtype)
    else:
        full = (rng.standard_normal((9, 20, 31)) * 500).astype(dtype)
        full[0, 0, :3] = (-0.0, 0.0, offset)
    field = rng.uniform(0.5, 1.5, size=full.shape).astype(np.float32)
    blocks = (4, 7, 16)
    got = divide_field(da.from_array(full, blocks), da.from_array(field, blocks), offset).compute()
    t = np.result_type(dtype, np.float32)
    if offset == 0:
        want = full.astype(t) / field.astype(t)
    else:
        want = (full.astype(t) - t.type(offset)) / field.astype(t) + t.type(offset)
    assert got.dtype == want.dtype == t
    assert got.tobytes() == want.tobytes()  # the same bits, signed zeros included


def test_normalise_field_is_the_mean_one_field_floored_in_float32():
    rng = np.random.default_rng(2)
    field = rng.uniform(-0.5, 3.0, size=(6, 11, 13))
    mask = rng.uniform(size=field.shape) < 0.6
    got = normalise_field(field, mask, "test")
    want = np.maximum(field / field[mask].mean(), FIELD_FLOOR).astype(np.float32)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert got.min() == np.float32(FIELD_FLOOR)
    with pytest.raises(ValueError, match="no positive mean"):
        normalise_field(-np.abs(field), mask, "test")


def test_normalise_field_of_float32_works_in_place_with_a_float64_mean():
    rng = np.random.default_rng(4)
    # Large values whose float32 running sum would drift: the mean is taken in float64.
    field = rng.uniform(1e4, 3e4, size=(40, 64, 64)).astype(np.float32)
    mask = rng.uniform(size=field.shape) < 0.7
    want = np.maximum(field / field[mask].astype(np.float64).mean(), FIELD_FLOOR)
    got = normalise_field(field, mask, "test")
    assert got is field and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=0)
    assert abs(float(got[mask].astype(np.float64).mean()) - 1.0) < 1e-6


def test_divide_field_with_other_chunks_and_a_zero_field_follows_numpy():
    rng = np.random.default_rng(3)
    full = rng.integers(0, 4000, size=(8, 10, 12)).astype(np.uint16)
    field = rng.uniform(0.5, 1.5, size=full.shape).astype(np.float32)
    field[0, 0, :2] = 0.0
    full[0, 0, 0] = 5  # 5 - 5 = 0 over a zero field: NaN; the next one: inf
    got = divide_field(da.from_array(full, (3, 5, 12)), da.from_array(field, (8, 4, 5)), 5.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = (full.astype(np.float32) - np.float32(5)) / field + np.float32(5)
    assert got.chunks == da.from_array(full, (3, 5, 12)).chunks
    np.testing.assert_array_equal(got.compute(), want)
    assert np.isnan(want[0, 0, 0]) and np.isinf(want[0, 0, 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_otsu_threshold_equals_skimage_to_the_bit(dtype):
    from skimage.filters import threshold_otsu

    from voxflow.plugins._field import otsu_threshold

    rng = np.random.default_rng(5)
    for shape in [(40, 50), (17, 23, 29), (3, 4, 5, 6)]:
        image = rng.gamma(2.0, 30.0, size=shape).astype(dtype)
        image[: shape[0] // 2] += dtype(150.0)
        assert otsu_threshold(image) == threshold_otsu(image)
        # Values on the bin edges, where NumPy corrects the computed bin by one.
        edges = np.linspace(image.min(), image.max(), 257, dtype=dtype)
        on_edges = edges[rng.integers(0, 257, size=shape)]
        assert otsu_threshold(on_edges) == threshold_otsu(on_edges)
    assert otsu_threshold(np.full((4, 5), 7.0, dtype)) == 7.0
    integers = rng.integers(0, 1000, size=(20, 30)).astype(np.uint16)
    assert otsu_threshold(integers) == threshold_otsu(integers)


@pytest.mark.parametrize(
    "shape", [(40, 50), (17, 23, 29), (1, 30, 30), (5, 1, 8), (31, 37, 41), (6, 7, 8, 9)]
)
def test_fill_holes_equals_scipy(shape):
    from scipy import ndimage

    from voxflow.plugins._field import fill_holes

    rng = np.random.default_rng(6)
    for density in (0.2, 0.3, 0.55, 0.8):
        smooth = ndimage.gaussian_filter(rng.uniform(size=shape), 1.5)
        mask = smooth > np.quantile(smooth, 1 - density)
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    np.testing.assert_array_equal(fill_holes(np.zeros(shape, bool)), np.zeros(shape, bool))
    np.testing.assert_array_equal(fill_holes(np.ones(shape, bool)), np.ones(shape, bool))
    # A shell around a cavity: the cavity fills, the outside does not.
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grids))
    shell = (radius < 0.9) & (radius > 0.4)
    if min(shape) >= 5:
        filled = fill_holes(shell)
        assert filled[radius <= 0.4].all() and filled.sum() > shell.sum()
        np.testing.assert_array_equal(filled, ndimage.binary_fill_holes(shell))


@pytest.mark.parametrize("offset", [None, 7.5])
def test_offset_and_mask_equal_the_two_estimates(offset):
    from voxflow.plugins._field import estimate_offset, foreground_mask, offset_and_mask

    rng = np.random.default_rng(8)
    image = rng.gamma(2.0, 30.0, size=(30, 40, 50)).astype(np.float32)
    image[8:22, 10:30, 12:38] += 200.0
    got_offset, got_mask = offset_and_mask(image, offset, "otsu")
    assert got_offset == estimate_offset(image, offset)
    np.testing.assert_array_equal(got_mask, foreground_mask(image, "otsu"))
    assert 0 < got_mask.sum() < got_mask.size

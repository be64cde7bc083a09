import copy
import math

import numpy as np
import pytest
from scipy import ndimage

import voxflow.plugins.gaussian as gaussian
from tests.plugins.conftest import context_for
from voxflow.plugins import GaussianBiasFieldCorrection
from voxflow.plugins.gaussian import local_fit


def _ellipsoid(shape, fraction=0.8):
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return sum(g**2 for g in grids) < fraction


# --------------------------------------------------------------------------- the local fit


@pytest.mark.parametrize("sigma", [(1.0, 1.5, 2.0), (2.5, 2.5, 0.7)])
def test_mean_mode_is_masked_normalised_gaussian_smoothing(sigma):
    rng = np.random.default_rng(0)
    values = rng.uniform(50, 150, size=(9, 14, 17))
    mask = _ellipsoid(values.shape) | (rng.uniform(size=values.shape) < 0.1)
    weights = mask.astype(np.float64)
    num = ndimage.gaussian_filter(values * weights, sigma, mode="constant")
    den = ndimage.gaussian_filter(weights, sigma, mode="constant")
    got = local_fit(values, mask, sigma, mode="mean")
    near = den >= 0.01 * den.max()
    np.testing.assert_allclose(got[near], (num / den)[near], rtol=1e-10)


@pytest.mark.parametrize("sigma", [(2.0, 2.0, 2.0), (5.0, 14.0, 31.0), (40.0, 40.0, 9.0)])
@pytest.mark.parametrize("shape", [(12, 40, 50), (7, 33, 64)])
def test_linear_mode_reproduces_a_linear_field_exactly(shape, sigma):
    grids = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    values = 300.0 - 4.0 * grids[0] + 0.5 * grids[1] - 2.5 * grids[2]
    mask = _ellipsoid(shape, 0.5)
    got = local_fit(values, mask, sigma, mode="linear")
    # Inside and near the mask the plane holds; the far corners continue the nearest value.
    near = ndimage.binary_dilation(mask, iterations=2)
    np.testing.assert_allclose(got[near], values[near], rtol=1e-6)


@pytest.mark.parametrize("mode", ["linear", "mean"])
def test_a_last_voxel_off_the_grid_is_fitted_where_it_lies(mode):
    # Block means of a ramp over a partial last block: the last mean belongs at the centre
    # of the voxels it has, (f - m) / (2 f) low-resolution voxels before the regular grid.
    shape, last = (7, 11, 13), (5.75, 10.0, 11.625)  # partial along z and x, whole along y
    positions = [np.arange(n, dtype=float) for n in shape]
    for p, v in zip(positions, last, strict=True):
        p[-1] = v
    grids = np.meshgrid(*positions, indexing="ij")
    values = 300.0 - 4.0 * grids[0] + 0.5 * grids[1] - 2.5 * grids[2]
    mask = np.ones(shape, bool)
    sigma = (2.0, 3.0, 2.5)
    got = local_fit(values, mask, sigma, mode=mode, last_position=last)
    if mode == "linear":
        np.testing.assert_allclose(got, values, rtol=1e-9)
        # On the regular grid the last voxels' values sit off the plane of the rest.
        regular = local_fit(values, mask, sigma, mode=mode)
        assert np.abs(regular - values).max() > 0.1
    else:  # the weights are the regular grid's; the positions change nothing
        np.testing.assert_array_equal(got, local_fit(values, mask, sigma, mode=mode))


@pytest.mark.parametrize(
    ("last", "match"),
    [
        ((5.0, 10.0), "needs one value per axis"),
        ((5.0, 10.0, 12.5), "along axis 2 must lie in"),
        ((4.0, 10.0, 12.0), "along axis 0 must lie in"),
        ((float("nan"), 10.0, 12.0), "along axis 0 must lie in"),
    ],
)
def test_a_bad_last_position_is_an_error(last, match):
    values = np.ones((6, 11, 13))
    with pytest.raises(ValueError, match=match):
        local_fit(values, values > 0, (2.0, 2.0, 2.0), last_position=last)


def test_the_plugin_places_a_partial_last_block_where_its_mean_lies():
    # End to end: a linear bias over a shape no factor divides is recovered exactly, the
    # low-resolution field equal to the block means, the last (partial) ones included.
    from tests.conftest import block_mean_reference
    from voxflow.core import apply_scaled_processing

    shape, factors = (22, 37, 41), (4, 4, 4)
    grids = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    data = 1000.0 - 6.0 * grids[0] + 2.0 * grids[1] - 3.0 * grids[2]
    plugin = GaussianBiasFieldCorrection(sigma=3.0, units="voxel", mask="all", offset=0.0)
    result = apply_scaled_processing(data, plugin, factors)
    means = block_mean_reference(data, factors)
    field = np.asarray(result.field, float)
    np.testing.assert_allclose(field / field.mean(), means / means.mean(), rtol=1e-5)
    # So the image is flat: the field upsampled is the ramp itself, up to its edge centres.
    image = result.image.compute()
    inner = tuple(slice(2, n - 2) for n in shape)
    np.testing.assert_allclose(image[inner], image[inner].mean(), rtol=1e-5)


def test_the_mean_is_pulled_inwards_at_the_edge_and_the_plane_is_not():
    shape = (16, 48, 48)
    x = np.broadcast_to(np.arange(48, dtype=float), shape)
    values = 100.0 + 2.0 * x
    mask = _ellipsoid(shape, 0.6)
    edge = mask & ~ndimage.binary_erosion(mask)
    mean = local_fit(values, mask, (4.0, 12.0, 12.0), mode="mean")
    plane = local_fit(values, mask, (4.0, 12.0, 12.0), mode="linear")
    assert np.abs(mean - values)[edge].max() > 10
    assert np.abs(plane - values)[edge].max() < 1e-4


def test_a_thin_mask_stays_solvable():
    values = np.full((6, 20, 20), 50.0)
    mask = np.zeros(values.shape, bool)
    mask[3, 5:15, 5:15] = True
    got = local_fit(values, mask, (2.0, 3.0, 3.0))
    np.testing.assert_allclose(got, 50.0, rtol=1e-6)


# --------------------------------------------------------------------------- quality


def test_quality_on_the_synthetic_lightsheet(quality4):
    plugin = copy.copy(GaussianBiasFieldCorrection())
    plugin.context = quality4.context
    field = plugin.lowres_func(lowres_array=quality4.low)
    r = quality4.r(field)
    corrected = quality4.corrected(field, plugin.estimated_offset)
    image = quality4.image.astype(np.float64)
    cells = (quality4.cell_cv(image), quality4.cell_cv(corrected))
    background = (quality4.background_cv(image), quality4.background_cv(corrected))
    figures = f"r={r:.4f} cell CV {cells[0]:.4f}->{cells[1]:.4f} bg CV {background}"
    assert r >= 0.95, figures
    assert cells[1] <= cells[0] / 2, figures
    assert background[1] <= background[0] / 2, figures
    assert 98 <= plugin.estimated_offset <= 101


# --------------------------------------------------------------------------- spacing


def test_sigma_in_micrometres_follows_the_spacing():
    plugin = GaussianBiasFieldCorrection(sigma=200.0)
    assert plugin.sigma_voxels(3) == (200.0, 200.0, 200.0)
    plugin.context = context_for((2.0, 1.6, 1.6), (4, 4, 4))
    assert plugin.sigma_voxels(3) == pytest.approx((25.0, 31.25, 31.25))
    plugin.context = context_for((0.002, 0.0016, 0.0016), (4, 4, 4), units="millimeter")
    assert plugin.sigma_voxels(3) == pytest.approx((25.0, 31.25, 31.25))


def test_sigma_in_voxels_counts_full_resolution_voxels():
    plugin = GaussianBiasFieldCorrection(sigma=8.0, units="voxel")
    assert plugin.sigma_voxels(2) == (8.0, 8.0)
    plugin.context = context_for((2.0, 1.6, 1.6), (2, 4, 8))
    assert plugin.sigma_voxels(3) == pytest.approx((4.0, 2.0, 1.0))


def _sampled(spacing, extent=(384.0, 192.0, 384.0)):
    """A smooth non-linear field sampled at `spacing` (µm) over one physical box."""
    axes = [np.arange(0, e, s) for e, s in zip(extent, spacing, strict=True)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    return 500 + 200 * np.sin(2 * np.pi * z / 300) * np.cos(2 * np.pi * x / 300) + 0.5 * y


@pytest.mark.parametrize("sigma", [24.0, 48.0])
def test_the_same_physical_blur_at_two_spacings(sigma):
    coarse, fine = (8.0, 4.0, 4.0), (4.0, 4.0, 4.0)

    def smooth(values, spacing, units="um", sigma=sigma):
        plugin = GaussianBiasFieldCorrection(sigma=sigma, units=units, mode="mean", mask="all")
        plugin.context = context_for(spacing, (1, 1, 1))
        return plugin.lowres_func(lowres_array=values.astype(np.float32))

    # The grids' voxels reach half a voxel past their centres, so the boundary of the box sits
    # at different places: compare further than 3 sigma from the ends of z.
    edge = int(np.ceil(3 * sigma / coarse[0]))
    inner = slice(edge, -edge)
    on_coarse = smooth(_sampled(coarse), coarse)[inner]
    on_fine = smooth(_sampled(fine), fine)[::2][inner]
    # Each grid's blocks approximate the Gaussian to about 1 %, so the two agree to 1 %.
    np.testing.assert_allclose(on_coarse, on_fine, rtol=0.01)
    # Blind to the spacing (sigma in voxels of either grid), the two disagree.
    blind = smooth(_sampled(coarse), coarse, units="voxel", sigma=sigma / 4)[inner]
    assert np.abs(blind / on_fine - 1).max() > 0.03


def test_blocks_approximate_the_exact_smoothing():
    values = _sampled((4.0, 4.0, 4.0))
    mask = np.ones(values.shape, bool)
    sigma = (12.0, 12.0, 12.0)  # three voxels per block, four blocks per sigma
    exact = ndimage.gaussian_filter(values, sigma, mode="constant") / ndimage.gaussian_filter(
        np.ones(values.shape), sigma, mode="constant"
    )
    got = local_fit(values, mask, sigma, mode="mean")
    np.testing.assert_allclose(got, exact, rtol=0.012)
    # Blocks of one voxel are the exact smoothing itself.
    ones = np.ones(values.shape)
    exact = ndimage.gaussian_filter(values, 4.0, mode="constant")
    exact /= ndimage.gaussian_filter(ones, 4.0, mode="constant")
    np.testing.assert_allclose(local_fit(values, mask, (4.0,) * 3, mode="mean"), exact, rtol=1e-10)


@pytest.mark.parametrize(
    ("shape", "steps", "sigma"),
    [((11, 23, 18), (2, 3, 4), (5.0, 7.0, 9.0)), ((25, 31), (4, 3), (8.0, 6.0)),
     ((7, 9, 10), (1, 1, 1), (1.0, 2.0, 1.5))],
)  # fmt: skip
def test_block_moments_equal_full_size_products(shape, steps, sigma):
    # The compiled pass gives the moments that the products of the whole arrays give.
    rng = np.random.default_rng(4)
    values = rng.uniform(-5, 20, size=shape)
    mask = rng.uniform(size=shape) < 0.7
    coords = [
        gaussian._axis_view(rng.uniform(-2, 2, size=n), i, len(shape)) for i, n in enumerate(shape)
    ]
    got = gaussian._moments(values, mask, coords, steps, sigma)
    w, f = mask.astype(float), np.where(mask, values, 0.0)
    products = {"w": w, "wf": f}
    for i in range(len(shape)):
        products[f"w{i}"] = w * coords[i]
        products[f"wf{i}"] = f * coords[i]
        for j in range(i, len(shape)):
            products[f"w{i}{j}"] = w * coords[i] * coords[j]
    assert set(got) == set(products)
    smooth = [s / k for s, k in zip(sigma, steps, strict=True)]
    for name, full in products.items():
        pad = [(0, -n % k) for n, k in zip(shape, steps, strict=True)]
        padded = np.pad(full, pad)
        split = [v for n, k in zip(padded.shape, steps, strict=True) for v in (n // k, k)]
        blocks = padded.reshape(split).sum(axis=tuple(range(1, 2 * len(shape), 2)))
        want = ndimage.gaussian_filter(blocks, smooth, mode="constant")
        np.testing.assert_allclose(got[name], want, rtol=1e-12, atol=1e-9, err_msg=name)
    # The mean needs w and wf only; they are the same.
    mean = gaussian._moments(values, mask, coords, steps, sigma, "mean")
    assert set(mean) == {"w", "wf"}
    for name in mean:
        np.testing.assert_array_equal(mean[name], got[name])


@pytest.mark.parametrize(
    ("shape", "sigma"),
    [((20, 31, 26), (3.0, 4.0, 2.5)), ((6, 5, 40), (9.0, 0.0, 12.0)), ((1, 1, 17), (2.0, 2.0, 0.1)),
     ((3, 50), (0.0, 7.3)), ((33, 2), (1e-16, 0.9)), ((4, 4, 4), (0.0, 0.0, 0.0))],
)  # fmt: skip
def test_compiled_smoothing_equals_scipy_gaussian_filter(shape, sigma):
    # Kernels wider than the axis, axes of one voxel, sigma 0 (no smoothing) and sigma so
    # small that the kernel is one tap: the same as SciPy's constant-mode filter.
    values = np.random.default_rng(5).uniform(-3, 9, size=shape)
    want = ndimage.gaussian_filter(values, sigma, mode="constant")
    block = values.copy()
    got = gaussian._gaussian_smooth(block, list(sigma), np.empty(shape))
    assert got is block
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


def test_block_grid_is_capped_and_stays_exact_for_a_plane(monkeypatch):
    shape, sigma = (20, 60, 70), (6.0, 6.0, 12.0)
    assert gaussian._block_steps(shape, sigma) == (1, 1, 3)  # four blocks per sigma
    monkeypatch.setattr(gaussian, "_MAX_BLOCKS", 3000)
    steps = gaussian._block_steps(shape, sigma)
    assert math.prod(-(-n // k) for n, k in zip(shape, steps, strict=True)) <= 3000
    assert steps[1] > 1 and steps[2] > 3
    grids = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    values = 300.0 - 4.0 * grids[0] + 0.5 * grids[1] - 2.5 * grids[2]
    mask = _ellipsoid(shape, 0.5)
    near = ndimage.binary_dilation(mask, iterations=2)
    # Fewer blocks per sigma, but the moments are still exact: a plane is reproduced.
    np.testing.assert_allclose(local_fit(values, mask, sigma)[near], values[near], rtol=1e-6)


# --------------------------------------------------------------------------- parameters


def test_defaults_and_params():
    plugin = GaussianBiasFieldCorrection()
    assert plugin.params == {
        "sigma": 200.0,
        "units": "um",
        "mode": "linear",
        "mask": "otsu",
        "offset": None,
    }
    assert plugin.name == "gaussian" and "Gaussian" in plugin.description


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"sigma": 0}, ValueError, r"`sigma` must be finite and in \(0.0, inf\], got 0.0"),
        ({"sigma": float("inf")}, ValueError, "`sigma` must be finite"),
        ({"sigma": "20"}, TypeError, r"`sigma` must be a real number, got '20' \(str\)"),
        ({"sigma": True}, TypeError, "`sigma` must be a real number"),
        ({"units": "mm"}, ValueError, r"`units` must be one of 'um', 'voxel'; got 'mm'"),
        ({"units": 1}, TypeError, r"`units` must be a str, got 1"),
        ({"mode": "reflect"}, ValueError, r"`mode` must be one of 'linear', 'mean'; got"),
    ],
)
def test_bad_parameters(params, error, match):
    with pytest.raises(error, match=match):
        GaussianBiasFieldCorrection(**params)


def test_a_context_of_the_wrong_rank_is_an_error():
    plugin = GaussianBiasFieldCorrection()
    plugin.context = context_for((2.0, 1.6, 1.6), (4, 4, 4))
    with pytest.raises(ValueError, match=r"`context.spacing` needs one value per axis .* \(2\)"):
        plugin.lowres_func(lowres_array=np.ones((8, 8), np.float32))


@pytest.mark.parametrize("mode", ["linear", "mean"])
def test_float32_values_fit_as_their_float64_copy(mode):
    # The plugin hands the fit float32 values; the block sums are float64 either way.
    rng = np.random.default_rng(8)
    values = rng.uniform(0, 500, size=(13, 29, 22)).astype(np.float32)
    mask = _ellipsoid(values.shape, 0.7)
    got = local_fit(values, mask, (3.0, 5.0, 4.0), mode=mode)
    want = local_fit(values.astype(np.float64), mask, (3.0, 5.0, 4.0), mode=mode)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, want)
    # A float32 result is the float64 field rounded once.
    as32 = local_fit(values, mask, (3.0, 5.0, 4.0), mode=mode, dtype=np.float32)
    assert as32.dtype == np.float32
    np.testing.assert_array_equal(as32, want.astype(np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
def test_the_estimate_leaves_its_input_untouched_and_fits_the_values_above_the_offset(dtype):
    rng = np.random.default_rng(9)
    low = (100 + rng.uniform(0, 900, size=(12, 20, 18))).astype(dtype)
    before = low.copy()
    plugin = GaussianBiasFieldCorrection(sigma=3.0, units="voxel", mask="all")
    plugin.context = context_for((1.0, 1.0, 1.0), (1, 1, 1))
    field = plugin.lowres_func(lowres_array=low)
    np.testing.assert_array_equal(low, before)
    offset = plugin.estimated_offset
    assert offset == pytest.approx(np.percentile(before.astype(np.float64), 0.5), rel=1e-6)
    fit = local_fit(before.astype(np.float32) - np.float32(offset), np.ones(low.shape, bool),
                    (3.0, 3.0, 3.0), dtype=np.float32)  # fmt: skip
    np.testing.assert_allclose(field, fit / fit.astype(np.float64).mean(), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["linear", "mean"])
def test_an_offset_fits_as_the_values_shifted_first(dtype, mode):
    # The fit subtracts the offset voxel by voxel, in the values' dtype, without a copy.
    rng = np.random.default_rng(10)
    values = rng.uniform(100, 600, size=(11, 27, 20)).astype(dtype)
    mask = _ellipsoid(values.shape, 0.8)
    offset = 97.3
    got = local_fit(values, mask, (2.0, 4.0, 3.0), mode=mode, offset=offset)
    want = local_fit(values - dtype(offset), mask, (2.0, 4.0, 3.0), mode=mode)
    np.testing.assert_array_equal(got, want)
    assert not np.allclose(got, local_fit(values, mask, (2.0, 4.0, 3.0), mode=mode))

"""The contract every built-in keeps: hook shapes and dtypes, Dask equals NumPy, determinism."""

import copy

import dask.array as da
import numpy as np
import pytest

from tests.plugins.conftest import context_for
from voxflow.plugins import (
    BackgroundSubtraction,
    GaussianBiasFieldCorrection,
    IntensityNormalization,
    N4BiasFieldCorrection,
    check_plugin,
)

MULTIPLICATIVE = (GaussianBiasFieldCorrection, N4BiasFieldCorrection)
ALL = (*MULTIPLICATIVE, BackgroundSubtraction, IntensityNormalization)
CHUNKINGS = [(7, 5, 9), (3, 17, 4), (19, 22, 5), (20, 23, 26)]  # (19, 22, 5): 1-voxel edge chunks


def _blobs(shape, seed):
    """A smooth positive image: background 100, a bright ellipsoid, a gradient, noise."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(g**2 for g in grids) < 0.6
    gradient = 1.0 - 0.3 * (grids[-1] + 1) / 2
    image = 100 + inside * 800 * gradient + rng.normal(0, 5, shape)
    return image.astype(np.float32)


def _run(cls, low, spacing=(4.0, 3.2, 3.2), factors=(2, 2, 2), **params):
    plugin = copy.copy(cls(**params))
    plugin.context = context_for(spacing, factors)
    return plugin, plugin.lowres_func(lowres_array=low)


def _reference(plugin, full, up):
    """Each plugin's documented full-resolution formula, on whole NumPy arrays."""
    full = full.astype(np.float32)
    if isinstance(plugin, MULTIPLICATIVE):
        off = np.float32(plugin.estimated_offset)
        return (full - off) / up + off
    if isinstance(plugin, BackgroundSubtraction):
        return np.maximum(full - up, np.float32(0))
    top = np.float32(65535.0)
    scaled = (full - np.float32(plugin.lo)) * np.float32(top / (plugin.hi - plugin.lo))
    return np.clip(scaled, np.float32(0), top)


@pytest.mark.parametrize("cls", ALL)
def test_lowres_field_has_the_shape_and_is_finite(cls):
    low = _blobs((10, 12, 14), seed=1)
    plugin, field = _run(cls, low)
    check_plugin(plugin)
    assert field.shape == low.shape and field.dtype == np.float32
    assert np.isfinite(field).all()
    if isinstance(plugin, MULTIPLICATIVE):
        assert field.min() > 0 and plugin.estimated_offset == pytest.approx(
            np.percentile(low.astype(np.float64), 0.5)
        )


@pytest.mark.parametrize("cls", ALL)
def test_lowres_works_in_2d(cls):
    low = _blobs((24, 30), seed=2)
    _, field = _run(cls, low, spacing=(3.2, 3.2), factors=(2, 2))
    assert field.shape == low.shape and np.isfinite(field).all()


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("chunks", CHUNKINGS, ids=str)
def test_highres_on_dask_equals_the_formula_on_numpy(cls, chunks):
    low = _blobs((10, 12, 13), seed=3)
    plugin, _ = _run(cls, low)
    rng = np.random.default_rng(4)
    full = rng.integers(0, 4000, size=(20, 23, 26)).astype(np.uint16)
    up = rng.uniform(0.5, 1.5, size=full.shape).astype(np.float32)
    if cls is BackgroundSubtraction:
        up *= 1000
    out = plugin.highres_func(
        fullres_array=da.from_array(full, chunks=chunks),
        upsampled_output=da.from_array(up, chunks=(5, 6, 7)),
    )
    assert isinstance(out, da.Array) and out.shape == full.shape
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.compute(), _reference(plugin, full, up), rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("cls", ALL)
def test_float64_input_stays_float64(cls):
    plugin, _ = _run(cls, _blobs((8, 8, 8), seed=5))
    full = da.from_array(np.linspace(0, 900, 512).reshape(8, 8, 8), chunks=3)
    out = plugin.highres_func(fullres_array=full, upsampled_output=da.ones((8, 8, 8), chunks=4))
    assert out.dtype == np.float64


@pytest.mark.parametrize("cls", ALL)
def test_same_input_gives_the_same_field(cls):
    low = _blobs((12, 14, 16), seed=6)
    _, first = _run(cls, low)
    _, second = _run(cls, low.copy())
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("cls", ALL)
def test_highres_checks_its_arrays(cls):
    plugin, _ = _run(cls, _blobs((8, 8, 8), seed=7))
    full = da.zeros((8, 8, 8), chunks=4)
    with pytest.raises(TypeError, match="`fullres_array` must be a Dask array, got ndarray"):
        plugin.highres_func(fullres_array=np.zeros((8, 8, 8)), upsampled_output=full)
    with pytest.raises(ValueError, match=r"`upsampled_output` must have the shape .*\(8, 8, 8\)"):
        plugin.highres_func(fullres_array=full, upsampled_output=da.zeros((8, 8, 7), chunks=4))


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(
    ("low", "error", "match"),
    [
        ([[1.0, 2.0]], TypeError, "`lowres_array` must be a NumPy array, got list"),
        (np.ones(5), ValueError, r"2D \(y, x\) or 3D \(z, y, x\), got shape \(5,\)"),
        (np.ones((2, 2, 2, 2)), ValueError, "2D .* or 3D"),
        (np.zeros((0, 4)), ValueError, "must not be empty"),
        (np.array([[1.0, np.nan], [2.0, 3.0]]), ValueError, "must be finite"),
        (np.array([["a", "b"]]), TypeError, "must be numeric"),
    ],
)
def test_lowres_checks_its_array(cls, low, error, match):
    with pytest.raises(error, match=match):
        cls().lowres_func(lowres_array=low)


@pytest.mark.parametrize("cls", (*MULTIPLICATIVE, IntensityNormalization))
def test_highres_before_lowres_is_a_clear_error(cls):
    full = da.ones((4, 4), chunks=2)
    with pytest.raises(RuntimeError, match="call lowres_func on this plugin first"):
        cls().highres_func(fullres_array=full, upsampled_output=full)


@pytest.mark.parametrize("cls", MULTIPLICATIVE)
def test_a_given_offset_needs_no_lowres_run(cls):
    full = da.from_array(np.full((4, 4), 300.0, np.float32), chunks=3)
    up = da.full((4, 4), 2.0, dtype=np.float32, chunks=2)
    out = cls(offset=100.0).highres_func(fullres_array=full, upsampled_output=up)
    np.testing.assert_array_equal(out.compute(), np.full((4, 4), 200.0))
    plain = cls(offset=0).highres_func(fullres_array=full, upsampled_output=up)
    np.testing.assert_array_equal(plain.compute(), np.full((4, 4), 150.0))


@pytest.mark.parametrize("cls", MULTIPLICATIVE)
def test_field_is_normalised_to_mean_one_over_the_mask(cls):
    low = _blobs((12, 14, 16), seed=8)
    mask = np.zeros(low.shape, bool)
    mask[3:9, 4:10, 5:12] = True
    plugin, field = _run(cls, low, mask=mask, offset=100.0)
    assert field[mask].mean() == pytest.approx(1.0, rel=1e-5)
    assert plugin.estimated_offset == 100.0


@pytest.mark.parametrize("cls", MULTIPLICATIVE)
@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"mask": "everything"}, ValueError, r"`mask` must be one of 'otsu', 'all'; got"),
        ({"mask": np.ones((2, 2), int)}, TypeError, "`mask` as an array must be boolean"),
        ({"mask": np.zeros((2, 2), bool)}, ValueError, "must select at least one voxel"),
        ({"mask": [1, 2]}, TypeError, r"`mask` must be 'otsu', 'all', a threshold"),
        ({"mask": True}, TypeError, r"`mask` must be 'otsu', 'all', a threshold"),
        ({"offset": float("nan")}, ValueError, r"`offset` must be finite"),
        ({"offset": "dark"}, TypeError, r"`offset` must be a real number, got 'dark'"),
    ],
)
def test_shared_parameters_are_validated(cls, params, error, match):
    with pytest.raises(error, match=match):
        cls(**params)


@pytest.mark.parametrize("cls", MULTIPLICATIVE)
def test_masks_the_image_cannot_use_are_errors(cls):
    low = _blobs((8, 8, 8), seed=9)
    with pytest.raises(ValueError, match=r"`mask` must have the shape .*\(8, 8, 8\), got \(4, 4\)"):
        cls(mask=np.ones((4, 4), bool)).lowres_func(lowres_array=low)
    with pytest.raises(ValueError, match=r"`mask` threshold 5000.0 selects no voxel"):
        cls(mask=5000.0).lowres_func(lowres_array=low)
    with pytest.raises(ValueError, match=r"no positive mean over the foreground|nothing above"):
        cls(offset=10_000.0).lowres_func(lowres_array=low)


@pytest.mark.parametrize("cls", MULTIPLICATIVE)
def test_a_constant_image_gives_a_flat_field(cls):
    _, field = _run(cls, np.full((8, 9, 10), 500.0, np.float32), offset=100.0)
    np.testing.assert_allclose(field, 1.0, rtol=1e-4)

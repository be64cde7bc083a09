import copy

import numpy as np
import pytest
from scipy import ndimage

from tests.plugins.conftest import context_for, upsample_repeat
from voxflow.plugins import BackgroundSubtraction


def test_quality_on_the_synthetic_lightsheet(quality4, volume):
    plugin = copy.copy(BackgroundSubtraction())
    plugin.context = quality4.context
    background = plugin.lowres_func(lowres_array=quality4.low)
    up = upsample_repeat(background.astype(np.float64), quality4.factors, quality4.image.shape)
    image = quality4.image.astype(np.float64)
    corrected = np.maximum(image - up, 0.0)
    cells = volume.cell_labels > 0
    between = volume.tissue & ~cells
    outside = ~ndimage.binary_dilation(volume.tissue, iterations=8)
    # The camera offset around the sample goes: 100 → about 0.
    assert corrected[outside].mean() < 0.05 * image[outside].mean()
    # Tissue between cells (offset + autofluorescence) loses most of its level ...
    assert corrected[between].mean() < 0.2 * image[between].mean()
    # ... and cells keep their signal above the tissue around them.
    above = image[cells].mean() - image[between].mean()
    assert corrected[cells].mean() > 0.9 * above
    # The background is smooth: neighbouring low-res voxels differ far less than in the image.
    steps = np.abs(np.diff(background, axis=2))[quality4.tissue[:, :, 1:]]
    image_steps = np.abs(np.diff(quality4.low, axis=2))[quality4.tissue[:, :, 1:]]
    assert np.percentile(steps, 90) < 0.25 * np.percentile(image_steps, 90)


def test_size_follows_the_spacing():
    plugin = BackgroundSubtraction(size=32.0)
    assert plugin.size_voxels(3) == (32.0, 32.0, 32.0)
    plugin.context = context_for((2.0, 1.6, 1.6), (4, 4, 4))
    assert plugin.size_voxels(3) == pytest.approx((4.0, 5.0, 5.0))
    plugin.context = context_for((0.002, 0.0016, 0.0016), (4, 4, 4), units="millimeter")
    assert plugin.size_voxels(3) == pytest.approx((4.0, 5.0, 5.0))
    in_voxels = BackgroundSubtraction(size=8.0, units="voxel")
    in_voxels.context = context_for((2.0, 1.6, 1.6), (2, 4, 8))
    assert in_voxels.size_voxels(3) == pytest.approx((4.0, 2.0, 1.0))


def test_the_box_and_sigma_reach_scipy(monkeypatch):
    seen = {}
    real_opening, real_gaussian = ndimage.grey_opening, ndimage.gaussian_filter

    def opening(image, size=None, **kwargs):
        seen["size"] = size
        return real_opening(image, size=size, **kwargs)

    def gaussian(image, sigma, **kwargs):
        seen["sigma"] = sigma
        return real_gaussian(image, sigma, **kwargs)

    monkeypatch.setattr(ndimage, "grey_opening", opening)
    monkeypatch.setattr(ndimage, "gaussian_filter", gaussian)
    plugin = BackgroundSubtraction(size=25.0)
    plugin.context = context_for((2.0, 1.6, 1.6), (4, 4, 4))
    plugin.lowres_func(lowres_array=np.ones((6, 7, 8), np.float32))
    assert seen["size"] == (3, 4, 4)
    assert seen["sigma"] == pytest.approx([25 / 16, 25 / 12.8, 25 / 12.8])


def test_the_background_equals_opening_then_smoothing():
    rng = np.random.default_rng(3)
    low = rng.uniform(100, 200, size=(9, 10, 11))
    plugin = BackgroundSubtraction(size=3.0, units="voxel")
    want = ndimage.gaussian_filter(
        ndimage.grey_opening(low, size=(3, 3, 3), mode="nearest"), 1.5, mode="nearest"
    )
    np.testing.assert_allclose(plugin.lowres_func(lowres_array=low), want, rtol=1e-6)


def test_small_objects_go_and_wide_ones_stay():
    low = np.full((5, 40, 40), 100.0)
    low[:, 10:12, 10:12] += 500  # 2 voxels wide: removed by a box of 6
    low[:, 20:35, 20:35] += 300  # 15 voxels wide: kept
    background = BackgroundSubtraction(size=6.0, units="voxel").lowres_func(lowres_array=low)
    assert background[2, 11, 11] < 120
    assert background[2, 27, 27] > 390


def test_defaults_and_bad_parameters():
    plugin = BackgroundSubtraction()
    assert plugin.params == {"size": 25.0, "units": "um"} and plugin.name == "background"
    with pytest.raises(ValueError, match=r"`size` must be finite and in \(0.0, inf\], got -1.0"):
        BackgroundSubtraction(size=-1)
    with pytest.raises(TypeError, match=r"`size` must be a real number, got None"):
        BackgroundSubtraction(size=None)
    with pytest.raises(ValueError, match=r"`units` must be one of 'um', 'voxel'; got 'px'"):
        BackgroundSubtraction(units="px")

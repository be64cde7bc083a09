import copy

import ants
import numpy as np
import pytest

from tests.plugins.conftest import context_for
from voxflow.core import downsample_array
from voxflow.plugins import N4BiasFieldCorrection
from voxflow.plugins._field import foreground_mask


@pytest.fixture(scope="module")
def small(volume):
    """The quality volume reduced by 16: a quick N4 input (8 × 16 × 16)."""
    factors = (16, 16, 16)
    low = downsample_array(volume.image[0], factors, "mean").astype(np.float32)
    return low, context_for(volume.spacing, factors)


def _run(low, context, **params):
    plugin = copy.copy(N4BiasFieldCorrection(**params))
    plugin.context = context
    return plugin, plugin.lowres_func(lowres_array=low)


# --------------------------------------------------------------------------- quality


def test_quality_on_the_synthetic_lightsheet(quality8):
    plugin, field = _run(quality8.low, quality8.context)
    r = quality8.r(field)
    corrected = quality8.corrected(field, plugin.estimated_offset)
    image = quality8.image.astype(np.float64)
    cells = (quality8.cell_cv(image), quality8.cell_cv(corrected))
    background = (quality8.background_cv(image), quality8.background_cv(corrected))
    figures = f"r={r:.4f} cell CV {cells[0]:.4f}->{cells[1]:.4f} bg CV {background}"
    assert r >= 0.99, figures
    assert cells[1] <= cells[0] / 2, figures
    assert background[1] <= background[0] / 2, figures


# --------------------------------------------------------------------------- ANTs


def test_the_physical_spacing_and_mask_reach_ants(small, monkeypatch):
    low, context = small
    images, calls = [], []
    real_from_numpy = ants.from_numpy
    real_n4 = ants.n4_bias_field_correction

    def from_numpy(data, *args, **kwargs):
        images.append(real_from_numpy(data, *args, **kwargs))
        return images[-1]

    def n4(image, **kwargs):
        calls.append(kwargs)
        return real_n4(image, **kwargs)

    monkeypatch.setattr(ants, "from_numpy", from_numpy)
    monkeypatch.setattr(ants, "n4_bias_field_correction", n4)
    plugin, _ = _run(low, context, spline_spacing=100.0, shrink_factor=2)
    image, mask = images
    # Low-res voxels are (32, 25.6, 25.6) µm: one step along each array axis must cover that
    # physical distance in the image ANTs works on.
    assert context.spacing == (32.0, 25.6, 25.6)
    for axis, step in enumerate(context.spacing):
        index = [0, 0, 0]
        index[axis] = 1
        point = ants.transform_index_to_physical_point(image, index)
        np.testing.assert_allclose(point, np.eye(3)[axis] * step)
    signal = low.astype(np.float64) - plugin.estimated_offset
    above = signal > 1.0
    np.testing.assert_allclose(image.numpy()[above], signal[above], rtol=1e-6)
    assert image.numpy().min() > 0
    assert mask.spacing == image.spacing and set(np.unique(mask.numpy())) == {0.0, 1.0}
    (kwargs,) = calls
    assert kwargs["mask"] is mask
    assert kwargs["shrink_factor"] == 2 and kwargs["return_bias_field"] is True
    assert kwargs["convergence"] == {"iters": [50], "tol": 1e-7}
    # Extent (256, 409.6, 409.6) µm at 100 µm between control points.
    assert kwargs["spline_param"] == [3, 4, 4] == plugin.mesh_size((8, 16, 16))


def test_spacing_in_other_units_is_converted(small, monkeypatch):
    low, context = small
    seen = []
    real_from_numpy = ants.from_numpy

    def from_numpy(data, *args, **kwargs):
        seen.append(kwargs["spacing"])
        return real_from_numpy(data, *args, **kwargs)

    monkeypatch.setattr(ants, "from_numpy", from_numpy)
    in_mm = context_for((0.002, 0.0016, 0.0016), (16, 16, 16), units="millimeter")
    _, field_mm = _run(low, in_mm)
    _, field_um = _run(low, context)
    assert seen[0] == pytest.approx((32.0, 25.6, 25.6))
    np.testing.assert_array_equal(field_mm, field_um)


def test_without_amplitude_fit_the_field_is_n4s_own(small):
    low, context = small
    _, field = _run(low, context, fit_amplitude=False, offset=100.0)
    signal = low.astype(np.float64) - 100.0
    mask = foreground_mask(low.astype(np.float64), "otsu")
    spacing = (32.0, 25.6, 25.6)
    bias = ants.n4_bias_field_correction(
        ants.from_numpy(
            np.maximum(signal, 1e-3 * signal[mask].mean()).astype(np.float32), spacing=spacing
        ),
        mask=ants.from_numpy(mask.astype(np.float32), spacing=spacing),
        shrink_factor=1,
        convergence={"iters": [50], "tol": 1e-7},
        spline_param=[1, 1, 1],
        return_bias_field=True,
    ).numpy()
    want = bias / bias[mask].mean()
    np.testing.assert_allclose(field, want, rtol=1e-5)


def test_the_amplitude_fit_only_raises_the_field_to_a_power(small):
    low, context = small
    _, raw = _run(low, context, fit_amplitude=False)
    _, fitted = _run(low, context)
    mask = foreground_mask(low.astype(np.float64), "otsu")
    power = np.polyfit(np.log(raw[mask]), np.log(fitted[mask]), 1)[0]
    np.testing.assert_allclose(
        np.log(fitted), power * np.log(raw) - np.log(np.mean(raw[mask] ** power)), atol=1e-5
    )
    assert power > 1


def test_the_same_input_gives_the_same_field(small):
    low, context = small
    _, first = _run(low, context)
    _, second = _run(low.copy(), context)
    np.testing.assert_array_equal(first, second)


def test_shrink_factor_must_leave_voxels(small):
    low, context = small
    with pytest.raises(
        ValueError, match=r"`shrink_factor` 5 leaves fewer than 2 voxels .*\(8, 16, 16\)"
    ):
        _run(low, context, shrink_factor=5)


# --------------------------------------------------------------------------- parameters


def test_defaults_and_params():
    plugin = N4BiasFieldCorrection()
    assert plugin.params == {
        "spline_spacing": None,
        "convergence": {"iters": [50], "tol": 1e-7},
        "shrink_factor": 1,
        "mask": "otsu",
        "offset": None,
        "fit_amplitude": True,
        "threads": 1,
    }
    assert plugin.name == "n4" and "N4" in plugin.description
    assert plugin.mesh_size((8, 16, 16)) == [1, 1, 1]
    custom = N4BiasFieldCorrection(convergence={"iters": (20, 10), "tol": 0})
    assert custom.convergence == {"iters": [20, 10], "tol": 0.0}
    assert custom.params["convergence"] == {"iters": [20, 10], "tol": 0}


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"spline_spacing": 0}, ValueError, r"`spline_spacing` must be finite and in \(0.0"),
        ({"spline_spacing": "50"}, TypeError, r"`spline_spacing` must be a real number"),
        ({"convergence": [50]}, TypeError, r"`convergence` must be a dict"),
        ({"convergence": {"iters": [50]}}, ValueError, r"exactly the keys 'iters' and 'tol'"),
        ({"convergence": {"iters": [], "tol": 0}}, TypeError, r"non-empty list of integers"),
        ({"convergence": {"iters": [0], "tol": 0}}, ValueError, r"integers >= 1 .* got \[0\]"),
        ({"convergence": {"iters": [2.5], "tol": 0}}, ValueError, r"integers >= 1"),
        ({"convergence": {"iters": [5], "tol": -1}}, ValueError, r"`convergence\['tol'\]`"),
        ({"shrink_factor": 1.5}, TypeError, r"`shrink_factor` must be an integer, got 1.5"),
        ({"shrink_factor": 0}, ValueError, r"`shrink_factor` must be >= 1, got 0"),
        ({"threads": 0}, ValueError, r"`threads` must be >= 1, got 0"),
        ({"threads": "2"}, TypeError, r"`threads` must be an integer or None, got '2'"),
        ({"fit_amplitude": 1}, TypeError, r"`fit_amplitude` must be a bool, got 1"),
    ],
)
def test_bad_parameters(params, error, match):
    with pytest.raises(error, match=match):
        N4BiasFieldCorrection(**params)

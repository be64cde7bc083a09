import dask.array as da
import numpy as np
import pytest

from voxflow.plugins import IntensityNormalization
from voxflow.plugins._field import foreground_mask


def _image(seed=0, shape=(12, 20, 24)):
    rng = np.random.default_rng(seed)
    image = rng.gamma(2.0, 150.0, size=shape) + 100
    return image.astype(np.float32)


@pytest.mark.parametrize("mask", ["all", "otsu", 250.0])
def test_percentiles_come_from_the_low_resolution_image(mask):
    low = _image()
    plugin = IntensityNormalization(low=2.0, high=98.0, mask=mask)
    field = plugin.lowres_func(lowres_array=low)
    values = low.astype(np.float64)[foreground_mask(low.astype(np.float64), mask)]
    assert (plugin.lo, plugin.hi) == tuple(np.percentile(values, [2.0, 98.0]))
    want = np.clip((low - plugin.lo) / (plugin.hi - plugin.lo), 0, 1)
    np.testing.assert_allclose(field, want, rtol=1e-6, atol=1e-7)
    assert field.dtype == np.float32


def test_unclipped_field():
    low = _image(1)
    plugin = IntensityNormalization(clip=False)
    field = plugin.lowres_func(lowres_array=low)
    assert field.min() < 0 and field.max() > 1


@pytest.mark.parametrize(
    ("dtype", "out_max", "top"),
    [(np.uint16, None, 65535.0), (np.uint8, None, 255.0), (np.float32, None, 1.0),
     (np.uint16, 1.0, 1.0), (np.uint16, 1000.0, 1000.0)],
)  # fmt: skip
@pytest.mark.parametrize("clip", [True, False])
def test_full_resolution_rescale(dtype, out_max, top, clip):
    plugin = IntensityNormalization(out_max=out_max, clip=clip)
    plugin.lowres_func(lowres_array=_image(2))
    rng = np.random.default_rng(3)
    full = rng.integers(0, 250, size=(16, 21, 25)).astype(dtype)
    out = plugin.highres_func(
        fullres_array=da.from_array(full, chunks=(5, 8, 1)),
        upsampled_output=da.zeros(full.shape, dtype=np.float32, chunks=7),
    )
    want = (full.astype(np.float64) - plugin.lo) / (plugin.hi - plugin.lo) * top
    if clip:
        want = np.clip(want, 0, top)
    np.testing.assert_allclose(out.compute(), want, rtol=1e-5, atol=1e-5 * top)
    assert plugin.output_max(np.dtype(dtype)) == top


def test_the_result_does_not_depend_on_the_input_scale():
    low = _image(4)
    full = _image(5, shape=(24, 40, 48))
    outs = []
    for gain, offset in [(1.0, 0.0), (3.5, 250.0)]:
        plugin = IntensityNormalization(out_max=1.0)
        plugin.lowres_func(lowres_array=gain * low + offset)
        scaled = da.from_array(gain * full + offset, chunks=11)
        outs.append(plugin.highres_func(fullres_array=scaled, upsampled_output=scaled).compute())
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_a_constant_image_is_an_error():
    with pytest.raises(ValueError, match=r"percentiles 1.0 and 99.5 .* both 7; nothing to rescale"):
        IntensityNormalization().lowres_func(lowres_array=np.full((4, 5), 7.0))


def test_defaults_and_bad_parameters():
    plugin = IntensityNormalization()
    assert plugin.params == {"low": 1.0, "high": 99.5, "mask": "all", "out_max": None, "clip": True}
    assert plugin.name == "normalize"
    with pytest.raises(ValueError, match=r"`low` must be below `high`, got low=50, high=50"):
        IntensityNormalization(low=50, high=50)
    with pytest.raises(ValueError, match=r"`high` must be finite and in \[0.0, 100.0\], got 101"):
        IntensityNormalization(high=101)
    with pytest.raises(ValueError, match=r"`out_max` must be finite and in \(0.0, inf\]"):
        IntensityNormalization(out_max=0)
    with pytest.raises(TypeError, match=r"`clip` must be a bool, got 'yes'"):
        IntensityNormalization(clip="yes")

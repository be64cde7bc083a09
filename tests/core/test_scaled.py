import dask.array as da
import numpy as np
import pytest

from tests.conftest import mean_reference
from voxflow.core import (
    PluginHookError,
    apply_scaled_processing,
    lowres_geometry,
    upsample_array,
    validate_downsample_factor,
)


class Relative:
    """A duck-typed plugin: field = low / mean(low), applied by division; records its calls."""

    def __init__(self, field=None, out=None):
        self._field, self._out = field, out
        self.context = None
        self.seen = []

    def scaled_processing_plugin_name(self):
        return "relative"

    def scaled_processing_plugin_description(self):
        return "test"

    def lowres_func(self, lowres_array):
        self.seen.append((lowres_array.dtype, lowres_array.shape, self.context))
        if self._field is not None:
            return self._field(lowres_array)
        return lowres_array / lowres_array.mean()

    def highres_func(self, fullres_array, upsampled_output):
        if self._out is not None:
            return self._out(fullres_array, upsampled_output)
        return fullres_array / upsampled_output


def _reference(image, factors, scale, translation, dtype):
    low = mean_reference(image, factors).astype(np.float32)
    field = (low / low.mean()).astype(np.float32)
    lscale, ltrans = lowres_geometry(scale, translation, factors)
    up = upsample_array(field, image.shape, scale=scale, translation=translation,
                        low_scale=lscale, low_translation=ltrans)  # fmt: skip
    values = image / up
    if np.dtype(dtype).kind == "f":
        return values.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.rint(values.astype(np.float64)), info.min, info.max).astype(dtype)


@pytest.mark.parametrize("chunks", [(7, 9, 11), (1, 45, 38), (20, 45, 38), (3, 1, 5)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_dask_result_equals_the_whole_array_for_any_chunking(chunks, dtype):
    rng = np.random.default_rng(1)
    image = rng.integers(20, 250, (20, 45, 38)).astype(dtype)
    scale, trans = (3.0, 1.5, 1.5), (1.0, -2.0, 0.5)
    res = apply_scaled_processing(
        da.from_array(image, chunks=chunks), Relative(), (4, 3, 5), dims="zyx", scale=scale,
        translation=trans,
    )  # fmt: skip
    want = _reference(image, (4, 3, 5), scale, trans, dtype)
    got = res.image.compute()
    assert got.dtype == np.dtype(dtype)
    if np.dtype(dtype).kind == "f":
        np.testing.assert_allclose(got, want, rtol=1e-6)
    else:
        np.testing.assert_array_equal(got, want)
    assert res.image.chunks == da.from_array(image, chunks=chunks).chunks


def test_channels_are_processed_one_by_one_with_their_context():
    rng = np.random.default_rng(2)
    image = rng.integers(100, 4000, (3, 10, 24, 20)).astype(np.uint16)
    image[2] //= 4
    plugin = Relative()
    res = apply_scaled_processing(
        image, plugin, 2, scale=(1, 4.0, 0.5, 0.5), translation=(0, 0, 0, 0),
        units=(None, "micrometer", "micrometer", "micrometer"), channels=(2, 0),
    )  # fmt: skip
    assert res.image.shape == (2, 10, 24, 20)
    assert res.field.shape == (2, 5, 12, 10)
    contexts = [run.context for run in res.plugins]
    assert [c.channel for c in contexts] == [2, 0]
    assert contexts[0].spacing == (8.0, 1.0, 1.0)
    assert contexts[0].fullres_spacing == (4.0, 0.5, 0.5)
    assert contexts[0].factors == (2, 2, 2)
    assert contexts[0].dims == ("z", "y", "x")
    assert contexts[0].units == ("micrometer",) * 3
    assert plugin.context is None, "the caller's plugin is not modified"
    for k, c in enumerate((2, 0)):
        want = _reference(image[c], (2, 2, 2), (4.0, 0.5, 0.5), (0, 0, 0), np.uint16)
        np.testing.assert_array_equal(res.image[k].compute(), want)
    assert res.field_scale == (1, 8.0, 1.0, 1.0)
    assert res.field_translation == (0, 2.0, 0.25, 0.25)


def test_a_given_lowres_image_is_used_instead_of_reducing():
    image = np.full((8, 16, 16), 1000, np.uint16)
    low = np.linspace(1, 2, 4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    plugin = Relative()
    res = apply_scaled_processing(
        image, plugin, 2, lowres=low, lowres_scale=(2.0, 2.0, 2.0),
        lowres_translation=(0.5, 0.5, 0.5),
    )  # fmt: skip
    np.testing.assert_allclose(res.field, low / low.mean(), rtol=1e-6)
    want = upsample_array(low / low.mean(), image.shape, scale=(1, 1, 1), translation=(0, 0, 0),
                          low_scale=(2, 2, 2), low_translation=(0.5, 0.5, 0.5))  # fmt: skip
    np.testing.assert_array_equal(
        res.image.compute(), np.clip(np.rint(1000 / want.astype(np.float64)), 0, 65535)
    )


@pytest.mark.parametrize(
    ("source", "policy", "name"),
    [(np.uint16, "keep", "uint16"), (np.int16, "keep", "int16"), (np.uint8, "float32", "float32")],
)
def test_the_context_names_the_dtype_the_result_is_cast_to(source, policy, name):
    image = (np.arange(8 * 12 * 10).reshape(8, 12, 10) % 200 + 10).astype(source)
    plugin = Relative()
    res = apply_scaled_processing(da.from_array(image, 5), plugin, 2, dtype=policy)
    (run,) = res.plugins
    assert run.context.dtype == name
    assert plugin.seen[0][2].dtype == name, "lowres_func already sees it"
    assert plugin.context is None
    assert res.image.dtype == np.dtype(name)
    want = _reference(image, (2, 2, 2), (1.0,) * 3, (0.0,) * 3, np.dtype(name))
    np.testing.assert_allclose(res.image.compute(), want, rtol=1e-6, atol=0)


def test_float32_policy_keeps_fractions():
    image = np.full((4, 8, 8), 3, np.uint16)
    res = apply_scaled_processing(image, Relative(out=lambda f, u: f / 2.0), 2, dtype="float32")
    assert res.image.dtype == np.float32
    np.testing.assert_array_equal(res.image.compute(), 1.5)


@pytest.mark.parametrize(
    ("plugin", "match"),
    [
        (Relative(field=lambda a: a[:-1]), "'relative'.*lowres_func.*shape"),
        (Relative(field=lambda a: a * np.nan), "'relative'.*lowres_func.*NaN"),
        (Relative(field=lambda a: [1, 2]), "'relative'.*lowres_func.*shape"),
        (Relative(field=lambda a: 1 / 0), "'relative' failed in lowres_func: division by zero"),
        (Relative(out=lambda f, u: f[:-1]), "'relative'.*highres_func.*shape"),
        (Relative(out=lambda f, u: np.asarray(f)), "'relative'.*highres_func.*Dask array"),
        (Relative(out=lambda f, u: f.foo), "'relative' failed in highres_func"),
    ],
)
def test_a_plugin_breaking_its_contract_is_named(plugin, match):
    image = np.ones((8, 8, 8), np.uint16)
    with pytest.raises(PluginHookError, match=match):
        apply_scaled_processing(image, plugin, 2)


def test_nan_or_inf_input_is_refused():
    image = np.ones((8, 8, 8), np.float32)
    image[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        apply_scaled_processing(image, Relative(), 2)


@pytest.mark.parametrize(
    ("factor", "exc", "match"),
    [
        (0, ValueError, ">= 1"),
        (-2, ValueError, ">= 1"),
        ((2, 2), ValueError, r"one per spatial axis \(3\)"),
        (2.5, TypeError, "integer"),
        ((2, 2, 2.0), TypeError, "integers"),
        ("2", TypeError, "integer or a sequence"),
        (17, ValueError, "fewer than 2 voxels on axis 'z'.*at most 16"),
    ],
)
def test_factor_validation(factor, exc, match):
    with pytest.raises(exc, match=match):
        validate_downsample_factor(factor, (17, 40, 40), "zyx")


def test_factor_is_broadcast_and_non_spatial_axes_keep_one():
    assert validate_downsample_factor(3, (2, 9, 9, 9), "czyx") == (1, 3, 3, 3)
    assert validate_downsample_factor((1, 5, 6), (2, 9, 10, 12), "czyx") == (1, 1, 5, 6)
    # An axis of one voxel may keep factor 1.
    assert validate_downsample_factor((1, 2, 2), (1, 9, 9), "zyx") == (1, 2, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channels": (3,)}, r"0\.\.2"),
        ({"channels": (0, 0)}, "repeat"),
        ({"channels": ()}, "at least one"),
        ({"dtype": "int8"}, "'keep' or 'float32'"),
        ({"max_lowres_bytes": 100}, r"over the limit of.*larger downsample factor, e\.g\. 4,4,4"),
        ({"lowres": np.ones((3, 4, 4, 4))}, "lowres_scale"),
        (
            {
                "lowres": np.ones((3, 4, 4, 4)),
                "channels": (1,),
                "lowres_scale": (1, 2, 2, 2),
                "lowres_translation": (0, 0.5, 0.5, 0.5),
            },
            r"selected channels .*non-spatial shape \(1,\)",
        ),
    ],
)
def test_option_validation(kwargs, match):
    image = np.ones((3, 8, 8, 8), np.uint16)
    with pytest.raises(ValueError, match=match):
        apply_scaled_processing(image, Relative(), 2, **kwargs)


def test_channels_need_a_channel_axis():
    with pytest.raises(ValueError, match="channel axis"):
        apply_scaled_processing(np.ones((8, 8, 8)), Relative(), 2, channels=(0,))

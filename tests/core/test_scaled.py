import dask.array as da
import numpy as np
import pytest

from tests.conftest import (
    block_centres_reference,
    block_mean_reference,
    interp_reference,
    last_centres_reference,
)
from voxflow.core import (
    PluginHookError,
    apply_scaled_processing,
    downsample_array,
    lowres_geometry,
    upsample_array,
    validate_downsample_factor,
)
from voxflow.core.scaled import last_block_centre, lowres_block_mean


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
    low = block_mean_reference(image, factors).astype(np.float32)
    field = (low / low.mean()).astype(np.float32)
    lscale, ltrans = lowres_geometry(scale, translation, factors)
    last = last_centres_reference(image.shape, factors, scale, translation)
    up = upsample_array(field, image.shape, scale=scale, translation=translation,
                        low_scale=lscale, low_translation=ltrans, low_last_centre=last)  # fmt: skip
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


# --------------------------------------------------------------------------- precision


class Identity(Relative):
    """Field = the low-resolution image itself; the output is the upsampled field."""

    def __init__(self):
        super().__init__(field=lambda a: a.copy(), out=lambda f, u: u)


LOWRES_DTYPES = [np.uint8, np.uint16, np.int16, np.int32, np.uint32, np.float32, np.float64]


@pytest.mark.parametrize("chunks", [(7, 9, 11), (20, 45, 38)])
@pytest.mark.parametrize("dtype", LOWRES_DTYPES)
def test_the_plugin_sees_exact_block_means_whatever_the_dtype(dtype, chunks):
    rng = np.random.default_rng(11)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else np.iinfo(np.int32)
    # Values over the whole range of the dtype (floats: integers beyond float32's 2**24).
    image = rng.integers(info.min, info.max, (2, 20, 45, 38), endpoint=True).astype(dtype)
    seen = []
    plugin = Relative(field=lambda a: seen.append(a.copy()) or np.ones_like(a))
    apply_scaled_processing(da.from_array(image, (1, *chunks)), plugin, (3, 4, 4))
    assert [a.dtype for a in seen] == [np.float32] * 2
    for c in range(2):
        np.testing.assert_array_equal(
            seen[c], block_mean_reference(image[c], (3, 4, 4)).astype(np.float32)
        )


@pytest.mark.parametrize("dtype", LOWRES_DTYPES)
def test_lowres_block_mean_is_exact_in_floating_point(dtype):
    rng = np.random.default_rng(13)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else np.iinfo(np.int32)
    image = rng.integers(info.min, info.max, (2, 21, 22, 23), endpoint=True).astype(dtype)
    got = lowres_block_mean(da.from_array(image, (1, 5, 8, 9)), (1, 2, 3, 4)).compute()
    assert got.dtype == np.result_type(dtype, np.float32)
    want = block_mean_reference(image, (1, 2, 3, 4))
    np.testing.assert_array_equal(got, want.astype(got.dtype))


@pytest.mark.parametrize("plugin", [Relative, Identity])
def test_integer_and_float_copies_of_the_same_data_give_the_same_result(plugin):
    # Narrow-range data, where block means rounded to integers would lose everything.
    rng = np.random.default_rng(12)
    data = rng.integers(10, 13, (24, 41, 37))
    results = [
        apply_scaled_processing(data.astype(dtype), plugin(), (3, 4, 4), dtype="float32")
        for dtype in (np.uint8, np.uint16, np.int32, np.float32)
    ]
    for res in results[1:]:
        np.testing.assert_array_equal(res.field, results[0].field)
        np.testing.assert_array_equal(res.image.compute(), results[0].image.compute())
    low = block_mean_reference(data, (3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(results[0].field, plugin().lowres_func(low), rtol=1e-6)


RAMPS = {
    "x-33-f4": ((4, 4, 33), (1, 1, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
    "37-61-53-f345": ((37, 61, 53), (3, 4, 5), (2.0, 0.5, 0.3), (1.0, -2.0, 0.5)),
    "partial-2-of-4": ((9, 18, 30), (4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
}


@pytest.mark.parametrize(("shape", "factors", "scale", "translation"), RAMPS.values(),
                         ids=RAMPS.keys())  # fmt: skip
@pytest.mark.parametrize("chunks", [(8, 8, 8), (5, 7, 6), "whole"])
def test_a_linear_ramp_comes_back_exactly_up_to_the_far_edge(
    shape, factors, scale, translation, chunks
):
    # Block means of a ramp are the ramp at the centres of the voxels they hold; upsampled
    # between those centres they give the ramp back, the partial last blocks included. Past
    # the outermost centres the edge values carry on: the ramp at the clamped position.
    slopes = (0.5, -0.3, 0.2)
    positions = [t + np.arange(n) * s for n, s, t in zip(shape, scale, translation, strict=True)]
    axes = np.meshgrid(*positions, indexing="ij")
    ramp = 100.0 + sum(c * a for c, a in zip(slopes, axes, strict=True))
    image = da.from_array(ramp, shape if chunks == "whole" else chunks)
    res = apply_scaled_processing(image, Identity(), factors, scale=scale,
                                  translation=translation, dtype="float32")  # fmt: skip
    clamped = [
        np.clip(x, c[0], c[-1])
        for x, c in zip(
            positions,
            (block_centres_reference(n, f, s, t)
             for n, f, s, t in zip(shape, factors, scale, translation, strict=True)),
            strict=True,
        )
    ]  # fmt: skip
    want = 100.0 + sum(c * a for c, a in zip(
        slopes, np.meshgrid(*clamped, indexing="ij"), strict=True))  # fmt: skip
    got = res.image.compute()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
    # The same as linear interpolation between the true block centres, done with NumPy.
    centres = [block_centres_reference(n, f, s, t)
               for n, f, s, t in zip(shape, factors, scale, translation, strict=True)]  # fmt: skip
    ref = interp_reference(res.field, shape, scale, translation, centres)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
    assert res.field_last_centre == pytest.approx(
        last_centres_reference(shape, factors, scale, translation), abs=1e-12
    )


def test_a_given_lowres_image_can_have_its_last_voxel_off_the_grid():
    image = np.full((8, 16, 14), 1000.0, np.float32)
    low = np.linspace(1, 2, 4 * 8 * 4, dtype=np.float32).reshape(4, 8, 4)
    geometry = {"lowres_scale": (2.0, 2.0, 4.0), "lowres_translation": (0.5, 0.5, 1.5)}
    res = apply_scaled_processing(image, Identity(), (2, 2, 4), lowres=low,
                                  lowres_last_centre=(6.5, 14.5, 12.0), **geometry)  # fmt: skip
    assert res.field_last_centre == (6.5, 14.5, 12.0)
    want = upsample_array(low, image.shape, scale=(1, 1, 1), translation=(0, 0, 0),
                          low_scale=(2.0, 2.0, 4.0), low_translation=(0.5, 0.5, 1.5),
                          low_last_centre=(6.5, 14.5, 12.0))  # fmt: skip
    np.testing.assert_array_equal(res.image.compute(), want)
    np.testing.assert_array_equal(want[0, 0, 12:], low[0, 0, -1])  # at and past 12: clamped
    regular = apply_scaled_processing(image, Identity(), (2, 2, 4), lowres=low, **geometry)
    assert regular.field_last_centre == (6.5, 14.5, 13.5)
    with pytest.raises(ValueError, match=r"`lowres_last_centre` needs one number per axis \(3\)"):
        apply_scaled_processing(image, Identity(), 2, lowres=low, lowres_last_centre=(1.0,),
                                **geometry)  # fmt: skip
    with pytest.raises(ValueError, match="`low_last_centre` must lie beyond"):
        apply_scaled_processing(image, Identity(), 2, lowres=low,
                                lowres_last_centre=(6.5, 14.5, 9.5), **geometry)  # fmt: skip


@pytest.mark.parametrize(
    ("shape", "steps"),
    [
        ((35, 34, 33), [(2, 2, 2), (2, 2, 2)]),
        ((37, 61, 53), [(3, 4, 5)]),
        ((2, 50, 23, 47), [(1, 2, 2, 2), (1, 1, 3, 2), (1, 3, 1, 2)]),
        ((16, 64, 64), [(2, 2, 2), (2, 2, 2)]),
    ],
)
def test_the_last_block_centre_is_the_block_mean_of_the_coordinates(shape, steps):
    # A block mean of a voxel coordinate is the centre of what the block summarises.
    scale = (2.0, 0.7, 0.3, 1.1)[-len(shape) :]
    translation = (-1.0, 0.25, 3.0, 0.0)[-len(shape) :]
    coords = np.meshgrid(*(t + np.arange(n) * s for n, s, t in
                           zip(shape, scale, translation, strict=True)), indexing="ij")  # fmt: skip
    want = []
    for c in coords:
        for step in steps:
            c = downsample_array(c, step, "mean")
        want.append(c[(-1,) * len(shape)])
    got = last_block_centre(shape, scale, translation, steps)
    assert got == pytest.approx(want, rel=0, abs=1e-12)
    # On an axis whose blocks are all whole: exactly the regular grid of the last level.
    s, t = scale, translation
    for step in steps:
        s, t = lowres_geometry(s, t, step)
    n_low = np.array(shape)
    for step in steps:
        n_low = -(-n_low // np.array(step))
    for axis, (n, f) in enumerate(zip(shape, np.prod(steps, axis=0), strict=True)):
        if n % f == 0:
            assert got[axis] == t[axis] + (n_low[axis] - 1) * s[axis]
    if len(steps) == 1:
        assert got == last_block_centre(shape, scale, translation, steps[0])


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        (((10, 10), (1.0,), (0.0,), (2, 2)), ValueError, r"`shape` needs one integer per axis"),
        (((10, 0), (1.0, 1.0), (0.0, 0.0), (2, 2)), ValueError, "`shape` must hold integers >= 1"),
        (((10, 2.5), (1.0, 1.0), (0.0, 0.0), (2, 2)), TypeError, "`shape` must hold integers"),
        ((10, (1.0,), (0.0,), (2,)), TypeError, "`shape` must be a sequence"),
        (((10, 10), (1.0, 1.0), (0.0, 0.0), ()), ValueError, "at least one step"),
        (((10, 10), (1.0, 1.0), (0.0, 0.0), 2), TypeError, "`factors` must be a sequence"),
        (((10, 10), (1.0, 1.0), (0.0, 0.0), (2, 0)), ValueError, "`factors` must be >= 1"),
        (((10, 10), (1.0, 1.0), (0.0, 0.0), [(2, 2), (2,)]), ValueError, "one integer per axis"),
        (((10, 10), (1.0, -1.0), (0.0, 0.0), (2, 2)), ValueError, "`scale` must hold positive"),
    ],
)
def test_last_block_centre_validation(args, exc, match):
    with pytest.raises(exc, match=match):
        last_block_centre(*args)


@pytest.mark.parametrize(
    ("image", "factors", "exc", "match"),
    [
        (np.ones((4, 4)), (2, 2), TypeError, r"dask\.array\.Array, got ndarray"),
        (da.ones((4, 4), dtype=bool), (2, 2), TypeError, "integers or floats, got bool"),
        (da.ones((4, 4), dtype=np.uint16), 2, TypeError, "`factors` must be a sequence"),
        (da.ones((4, 4), dtype=np.uint16), (2,), ValueError, r"one integer per axis \(2\)"),
        (da.ones((4, 4), dtype=np.uint16), (2, 0), ValueError, "`factors` must be >= 1"),
        (da.ones((4, 4), dtype=np.uint16), (2, 1.5), TypeError, "`factors` must be an integer"),
        (da.ones((4, 4), dtype=np.float32), (2,), ValueError, "one integer per axis"),
        (da.ones((2, 4, 4, 4), dtype=np.uint8), (2, 2, 2, 2), ValueError, "only the last 3"),
    ],
)
def test_lowres_block_mean_validation(image, factors, exc, match):
    with pytest.raises(exc, match=match):
        lowres_block_mean(image, factors)

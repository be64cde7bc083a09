"""The fused division (upsample, divide, cast in one pass) equals the three steps bit for bit."""

import dataclasses

import dask
import dask.array as da
import numpy as np
import pytest

from tests.plugins.conftest import context_for
from voxflow.core import apply_scaled_processing, cast_to_dtype, level_transform, upsample
from voxflow.core.scaled import apply_field
from voxflow.core.upsample import upsample_recipe
from voxflow.plugins import N4BiasFieldCorrection
from voxflow.plugins._field import _divide_block, divide_field

SHAPE = (23, 30, 17)
CHUNKINGS = {
    "regular": (8, 8, 8),
    "not-dividing": (5, 7, 6),
    "one-voxel-edges": ((1, 21, 1), (1, 28, 1), (16, 1)),
    "single-chunk": SHAPE,
}
GEOMETRIES = {
    # (factors, scale, translation, stretch, shift): the field's voxels are `stretch` times
    # those of a level at `factors` and shifted by `shift` of them; a pyramid level when 1, 0.
    "level-3-4-5": ((3, 4, 5), (2.0, 0.5, 0.5), (5.0, -1.0, 0.25), 1.0, 0.0),
    "stretched-shifted": ((4, 2, 6), (1.3, 0.7, 0.9), (-2.0, 3.5, 0.0), 1.15, 0.7),
}


def _setup(shape, factors, scale, translation, stretch, shift, chunks, low=0.5, high=1.5):
    """A field in [`low`, `high`) at `factors` of the image, and its lazy upsampled array."""
    rng = np.random.default_rng(0)
    low_shape = tuple(-(-n // f) for n, f in zip(shape, factors, strict=True))
    field = rng.uniform(low, high, low_shape).astype(np.float32)
    low_scale, low_translation = level_transform(scale, translation, factors, "mean")
    low_scale = tuple(s * stretch for s in low_scale)
    low_translation = tuple(t + shift * s for t, s in zip(low_translation, low_scale, strict=True))
    up = upsample(field, shape, chunks, scale=scale, translation=translation,
                  low_scale=low_scale, low_translation=low_translation)  # fmt: skip
    return field, up


LEVEL = GEOMETRIES["level-3-4-5"]


def _image(shape, dtype, seed=1):
    """Values over the whole range of `dtype`, both ends included."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    image = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
    image.flat[::5] = info.min
    image.flat[::7] = info.max
    return image


def _three_steps(full, up, offset, dtype):
    """The unfused path on whole NumPy arrays: the upsampled field, the division, the cast."""
    work = np.result_type(full.dtype, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        quotient = _divide_block(full, up.compute(), offset, work)
    return quotient if dtype is None else cast_to_dtype(quotient, dtype)


def _assert_bitwise(got, want):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    assert got.tobytes() == want.tobytes()  # signed zeros and NaN payloads included


# (input dtype, output dtype, offset): outputs that clip at both ends, float outputs, None.
CASES = [
    (np.uint16, np.uint16, 0.0),
    (np.uint16, np.uint16, 97.25),
    (np.uint16, np.uint8, 31.5),
    (np.uint16, np.float32, 97.25),
    (np.uint16, None, 0.0),
    (np.uint8, np.uint8, 0.0),
    (np.uint8, np.uint8, 12.75),
    (np.int16, np.int16, -250.5),
    (np.int16, np.uint8, 0.0),
    (np.int16, np.int8, 1000.0),
    (np.uint32, np.uint16, 97.25),
    (np.uint32, np.uint32, 0.0),
    (np.uint32, np.float32, 5.5),
    (np.uint32, None, 97.25),
]


@pytest.mark.parametrize(("source", "target", "offset"), CASES, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
def test_fused_divide_is_bitwise_the_three_steps(chunks, geometry, source, target, offset):
    _, up = _setup(SHAPE, *geometry, chunks, low=0.25, high=1.75)
    full = _image(SHAPE, source)
    got = divide_field(da.from_array(full, chunks), up, offset, dtype=target)
    assert got.name.startswith("divide-upsampled-"), "the fused path"
    want = _three_steps(full, up, offset, target)
    assert got.dtype == want.dtype
    assert got.chunks == up.chunks
    _assert_bitwise(got.compute(), want)
    if target is not None and np.dtype(target).kind in "iu":
        info = np.iinfo(target)
        assert want.min() == info.min and want.max() == info.max, "the case clips at both ends"


def test_the_fused_division_is_one_task_per_block_reading_the_field_once():
    _, up = _setup(SHAPE, *LEVEL, (8, 8, 8))
    full = da.from_array(_image(SHAPE, np.uint16), (8, 8, 8))
    out = divide_field(full, up, 100.0, dtype=np.uint16)
    graph = dict(out.__dask_graph__())
    assert len(graph) == 2 * full.npartitions + 1  # image blocks, results, the field
    results = [k for k in graph if isinstance(k, tuple) and k[0] == out.name]
    assert len(results) == full.npartitions
    (field_key,) = set.intersection(*(dask.core.get_dependencies(graph, k) for k in results))
    assert not dask.core.get_dependencies(graph, field_key)
    for key in results:
        (block,) = dask.core.get_dependencies(graph, key) - {field_key}
        assert block[0] == full.name


@pytest.mark.parametrize("chunks", [(8, 8, 8), (5, 7, 6)], ids=str)
def test_saturating_quotients_and_a_zero_field(chunks):
    rng = np.random.default_rng(3)
    low_shape = (8, 8, 4)
    field = rng.uniform(0.5, 1.5, low_shape).astype(np.float32)
    field[:2] = 1e-30  # quotients far beyond every integer range
    field[-2:, :, :2] = 0.0  # infinities, and NaN where the numerator is 0
    geometry = {"scale": (1.0,) * 3, "translation": (0.0,) * 3}
    low_scale, low_translation = level_transform((1.0,) * 3, (0.0,) * 3, (3, 4, 5), "mean")
    up = upsample(field, SHAPE, chunks, low_scale=low_scale, low_translation=low_translation,
                  **geometry)  # fmt: skip
    full = rng.integers(-300, 300, SHAPE).astype(np.int16)
    full[-5:, :, :3] = 0
    for offset, target in [(0.0, np.int16), (0.0, np.uint16), (-20.25, np.int16)]:
        got = divide_field(da.from_array(full, chunks), up, offset, dtype=target).compute()
        want = _three_steps(full, up, offset, target)
        _assert_bitwise(got, want)
        info = np.iinfo(target)
        assert (want == info.max).any() and (want == info.min).any()
    with np.errstate(divide="ignore", invalid="ignore"):
        quotient = _three_steps(full, up, 0.0, None)
    assert np.isnan(quotient).any() and np.isinf(quotient).any()
    _assert_bitwise(divide_field(da.from_array(full, chunks), up, 0.0).compute(), quotient)


@pytest.mark.parametrize("chunks", [(7, 9), (40, 33), ((1, 38, 1), (32, 1))], ids=str)
@pytest.mark.parametrize(("source", "target", "offset"), CASES[:4] + CASES[7:9], ids=str)
def test_2d_images(chunks, source, target, offset):
    shape = (40, 33)
    _, up = _setup(shape, (4, 3), (0.8, 0.8), (1.0, -3.0), 1.1, 0.3, chunks, low=0.25, high=1.75)
    full = _image(shape, source, seed=4)
    got = divide_field(da.from_array(full, chunks), up, offset, dtype=target)
    _assert_bitwise(got.compute(), _three_steps(full, up, offset, target))


def test_1d_and_float_images():
    _, up = _setup((37,), (4,), (1.0,), (0.0,), 1.0, 0.0, 10)
    rng = np.random.default_rng(5)
    for source, target in [(np.uint16, np.uint8), (np.float32, np.float32), (np.float64, None)]:
        full = (rng.uniform(-50, 400, 37) if np.dtype(source).kind == "f"
                else rng.integers(0, 400, 37)).astype(source)  # fmt: skip
        full[0] = -0.0 if np.dtype(source).kind == "f" else 0
        for offset in (0.0, 12.5):
            got = divide_field(da.from_array(full, 10), up, offset, dtype=target).compute()
            _assert_bitwise(got, _three_steps(full, up, offset, target))


def test_without_a_recipe_or_with_other_chunks_the_unfused_path_casts_the_same():
    _, up = _setup(SHAPE, *LEVEL, (8, 8, 8))
    image = _image(SHAPE, np.uint16)
    want = _three_steps(image, up, 97.25, np.uint8)
    full = da.from_array(image, (5, 7, 6))
    for field in (up, up.rechunk((5, 7, 6)), da.from_array(up.compute(), (4, 9, 17))):
        got = divide_field(full, field, 97.25, dtype=np.uint8)
        assert got.chunks == full.chunks
        _assert_bitwise(got.compute(), want)


@pytest.mark.parametrize("dtype", [np.bool_, np.complex64, "no-such-type", object])
def test_divide_field_refuses_a_dtype_it_cannot_cast_to(dtype):
    full = da.ones((4, 4), chunks=2)
    with pytest.raises(TypeError, match="`dtype` must be None, an integer or a float dtype"):
        divide_field(full, full, 0.0, dtype=dtype)


# --------------------------------------------------------------------------- through the framework


class Divide:
    """A multiplicative plugin like the built-ins: fused when it reads the context's dtype."""

    def __init__(self, fused, offset=90.5):
        self.fused, self.offset = fused, offset
        self.context = None
        self.dtypes = []

    def scaled_processing_plugin_name(self):
        return "divide"

    def scaled_processing_plugin_description(self):
        return "test"

    def lowres_func(self, lowres_array):
        field = lowres_array - np.float32(self.offset)
        return np.maximum(field / field.mean(), np.float32(1e-3))

    def highres_func(self, fullres_array, upsampled_output):
        self.dtypes.append(self.context.dtype)
        dtype = self.context.dtype if self.fused else None
        return divide_field(fullres_array, upsampled_output, self.offset, dtype=dtype)


@pytest.mark.parametrize("chunks", [(4, 9, 11), (1, 20, 7), (10, 24, 20)], ids=str)
@pytest.mark.parametrize(
    ("source", "policy"),
    [(np.uint16, "keep"), (np.uint8, "keep"), (np.int16, "keep"), (np.uint16, "float32")],
)
def test_apply_scaled_processing_gives_the_same_image_fused_or_not(chunks, source, policy):
    rng = np.random.default_rng(6)
    info = np.iinfo(source)
    image = rng.integers(max(info.min, -1000), info.max // 2, (2, 10, 24, 20)).astype(source)
    image[:, :, :, :3] = info.max  # a saturated stripe
    runs = {}
    for fused in (False, True):
        runs[fused] = apply_scaled_processing(
            da.from_array(image, (1, *chunks)), Divide(fused), (2, 3, 4), dims="czyx",
            scale=(1, 2.0, 0.5, 0.5), translation=(0, 1.0, 0.0, -0.5), dtype=policy,
        )  # fmt: skip
    plain, fused = runs[False].image.compute(), runs[True].image.compute()
    target = np.dtype(source) if policy == "keep" else np.dtype(np.float32)
    assert plain.dtype == fused.dtype == target
    _assert_bitwise(fused, plain)
    assert [run.context.dtype for run in runs[True].plugins] == [target.name] * 2
    np.testing.assert_array_equal(runs[False].field, runs[True].field)
    # The independent reference: the three steps on each channel's NumPy arrays.
    for c, run in enumerate(runs[True].plugins):
        low_scale, low_translation = runs[True].field_scale[1:], runs[True].field_translation[1:]
        up = upsample(runs[True].field[c], image.shape[1:], chunks, scale=(2.0, 0.5, 0.5),
                      translation=(1.0, 0.0, -0.5), low_scale=low_scale,
                      low_translation=low_translation)  # fmt: skip
        want = _three_steps(image[c], up, run.offset, target)
        _assert_bitwise(fused[c], want)


def test_apply_field_tells_highres_the_dtype_it_casts_to():
    image = da.from_array(_image((8, 12, 12), np.uint16), 4)
    field = np.linspace(0.5, 1.5, 3 * 6 * 6, dtype=np.float32).reshape(3, 6, 6)
    geometry = {"scale": (1.0,) * 3, "translation": (0.0,) * 3, "field_scale": (3.0, 2.0, 2.0),
                "field_translation": (1.0, 0.5, 0.5)}  # fmt: skip
    run = Divide(fused=True)
    run.context = context_for((1.0, 1.0, 1.0), (3, 2, 2))
    assert run.context.dtype is None
    results = {}
    for dtype in (None, np.uint16, ">u2", np.float32, np.uint8):
        out = apply_field(image, field, run, dtype=dtype, **geometry)
        results[dtype] = out
        assert out.dtype == (np.float32 if dtype is None else np.dtype(dtype))
    assert run.dtypes == [None, "uint16", ">u2", "float32", "uint8"]
    assert run.context.dtype is None, "the caller's plugin keeps its context"
    up = upsample(field, image.shape, image.chunks, scale=geometry["scale"],
                  translation=geometry["translation"], low_scale=geometry["field_scale"],
                  low_translation=geometry["field_translation"])  # fmt: skip
    full = image.compute()
    for dtype, out in results.items():
        _assert_bitwise(out.compute(), _three_steps(full, up, 90.5, dtype))


def test_n4_highres_returns_the_context_dtype():
    _, up = _setup(SHAPE, *LEVEL, (8, 8, 8))
    full = _image(SHAPE, np.uint16)
    plugin = N4BiasFieldCorrection(offset=100.0)
    plain = plugin.highres_func(fullres_array=da.from_array(full, 8), upsampled_output=up)
    assert plain.dtype == np.float32
    _assert_bitwise(plain.compute(), _three_steps(full, up, 100.0, None))
    context = context_for((1.0, 1.0, 1.0), (3, 4, 5))
    for dtype in ("uint16", "uint8", "float32"):
        plugin.context = dataclasses.replace(context, dtype=dtype)
        out = plugin.highres_func(fullres_array=da.from_array(full, 8), upsampled_output=up)
        assert out.dtype == np.dtype(dtype)
        _assert_bitwise(out.compute(), _three_steps(full, up, 100.0, dtype))


def test_upsample_recipe_is_none_for_arrays_derived_from_an_upsample_result():
    _, up = _setup(SHAPE, *LEVEL, (8, 8, 8))
    assert upsample_recipe(up) is not None
    derived = [up.rechunk((5, 7, 6)), up * 2, up + 0, up[1:], up.astype(np.float64), up.T]
    for array in derived:
        assert upsample_recipe(array) is None
    assert upsample_recipe(up.compute()) is None
    assert upsample_recipe(da.from_array(up.compute(), 8)) is None
    # Multiplied by 2 the field halves the result: it must not be fused as `up` itself.
    full = da.from_array(_image(SHAPE, np.uint16), 8)
    doubled = divide_field(full, up * 2, 0.0, dtype=np.uint16).compute()
    want = cast_to_dtype(_divide_block(full.compute(), up.compute() * 2, 0.0, np.float32), "u2")
    _assert_bitwise(doubled, want)

import importlib
import pickle

import dask
import dask.array as da
import numpy as np
import pytest
from scipy import ndimage

from tests.conftest import block_centres_reference, block_mean_reference, interp_reference
from voxflow.core.pyramid import downsample_array, level_transform
from voxflow.core.upsample import (
    UpsampleRecipe,
    cast_to_dtype,
    divide_upsampled,
    upsample,
    upsample_array,
    upsample_block,
    upsample_recipe,
    upsample_weights,
)

# --------------------------------------------------------------------------- references


def _geometry(shape, factors, scale=None, translation=None):
    """Geometry of a field made by block means at `factors`, as a pyramid level places it."""
    ndim = len(shape)
    scale = (1.0,) * ndim if scale is None else scale
    translation = (0.0,) * ndim if translation is None else translation
    low_scale, low_translation = level_transform(scale, translation, factors, "mean")
    return {
        "scale": scale,
        "translation": translation,
        "low_scale": low_scale,
        "low_translation": low_translation,
    }


def _field(shape, factors, dtype=np.float32, seed=0):
    """A random positive field of the shape a pyramid level at `factors` would have."""
    low = tuple(-(-n // f) for n, f in zip(shape, factors, strict=True))
    return (np.random.default_rng(seed).random(low) + 0.5).astype(dtype)


def _map_coordinates(field, shape, g):
    """SciPy reference: order-1 interpolation at the clamped continuous field indices."""
    axes = []
    for a, n in enumerate(shape):
        x = g["translation"][a] + np.arange(n) * g["scale"][a]
        u = (x - g["low_translation"][a]) / g["low_scale"][a]
        axes.append(np.clip(u, 0, field.shape[a] - 1))
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    return ndimage.map_coordinates(field.astype(np.float64), coords, order=1, mode="nearest")


# --------------------------------------------------------------------------- seams


SHAPE = (23, 30, 17)
FACTORS = (3, 4, 5)
CHUNKINGS = {
    "regular": (8, 8, 8),
    "not-dividing": (5, 7, 6),
    "one-voxel-edges": ((1, 21, 1), (1, 28, 1), (16, 1)),
    "single-chunk": SHAPE,
    "one-voxel-chunks-x": (23, 30, 1),
    "uneven-explicit": ((10, 3, 10), (4, 26), (2, 9, 6)),
}


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blockwise_equals_whole_array_bitwise(chunks, dtype):
    g = _geometry(SHAPE, FACTORS, scale=(2.0, 0.3, 0.3), translation=(5.0, -1.0, 0.25))
    field = _field(SHAPE, FACTORS, np.float64, seed=1)
    whole = upsample_array(field, SHAPE, dtype=dtype, **g)
    lazy = upsample(field, SHAPE, chunks, dtype=dtype, **g)
    assert lazy.dtype == dtype
    assert lazy.shape == SHAPE
    got = lazy.compute(scheduler="threads")
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, whole)


def test_chunks_spec_is_dask_spec():
    g = _geometry(SHAPE, FACTORS)
    field = _field(SHAPE, FACTORS)
    assert upsample(field, SHAPE, (5, 7, 6), **g).chunks == da.empty(SHAPE, chunks=(5, 7, 6)).chunks
    assert upsample(field, SHAPE, 10, **g).chunks == ((10, 10, 3), (10, 10, 10), (10, 7))
    explicit = CHUNKINGS["one-voxel-edges"]
    assert upsample(field, SHAPE, explicit, **g).chunks == explicit


@pytest.mark.parametrize(
    ("origin", "block_shape"),
    [((0, 0, 0), (23, 30, 17)), ((7, 13, 16), (9, 17, 1)), ((22, 0, 4), (1, 30, 5))],
)
def test_block_equals_slice_of_whole(origin, block_shape):
    g = _geometry(SHAPE, FACTORS, scale=(1.5, 0.5, 0.5))
    field = _field(SHAPE, FACTORS, seed=2)
    whole = upsample_array(field, SHAPE, **g)
    region = tuple(slice(o, o + n) for o, n in zip(origin, block_shape, strict=True))
    np.testing.assert_array_equal(upsample_block(field, origin, block_shape, **g), whole[region])
    np.testing.assert_array_equal(upsample_block(field, region, **g), whole[region])
    np.testing.assert_array_equal(upsample_block(field, region, block_shape, **g), whole[region])


def test_block_beyond_the_grid_keeps_extending_the_same_function():
    # A block needs no knowledge of the full shape: a bigger grid holds the smaller one.
    g = _geometry((12, 12), (4, 4))
    field = _field((12, 12), (4, 4), seed=3)
    big = upsample_array(field, (40, 40), **g)
    np.testing.assert_array_equal(upsample_block(field, (10, 20), (30, 20), **g), big[10:, 20:])


def test_field_sits_once_in_the_graph():
    g = _geometry((64, 64, 64), (4, 4, 4))
    field = _field((64, 64, 64), (4, 4, 4))
    graph = dict(upsample(field, (64, 64, 64), 16, **g).__dask_graph__())
    assert len(graph) == 64 + 1
    roots = [k for k in graph if not dask.core.get_dependencies(graph, k)]
    assert len(roots) == 1
    (root,) = roots
    for key, task in graph.items():
        if key != root:
            assert dask.core.get_dependencies(graph, key) == {root}
            assert len(pickle.dumps(task)) < field.nbytes // 4


# --------------------------------------------------------------------------- values


CASES = {
    "1d": ((37,), (4,)),
    "1d-not-dividing": ((10,), (4,)),
    "2d": ((19, 26), (3, 4)),
    "3d-anisotropic-1-4-4": ((6, 33, 30), (1, 4, 4)),
    "3d-3-4-5": ((20, 21, 22), (3, 4, 5)),
    "3d-not-dividing-10-4": ((10, 10, 10), (4, 4, 4)),
    "3d-length-one-axis": ((3, 17, 12), (4, 2, 3)),
}


@pytest.mark.parametrize(("shape", "factors"), CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("field_dtype", [np.float32, np.float64])
def test_matches_map_coordinates(shape, factors, field_dtype):
    g = _geometry(shape, factors)
    field = _field(shape, factors, field_dtype, seed=4)
    expected = _map_coordinates(field, shape, g)
    got = upsample_array(field, shape, dtype=np.float64, **g)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    got32 = upsample_array(field, shape, **g)
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, expected, rtol=1e-6, atol=0)


def test_matches_map_coordinates_with_arbitrary_geometry_and_clamping():
    # Non-integer ratios, and a grid reaching past the field on both sides of every axis.
    shape = (14, 25, 31)
    field = _field((5, 6, 7), (1, 1, 1), np.float64, seed=5)
    g = {
        "scale": (0.7, 0.35, 0.3),
        "translation": (-2.0, -1.5, -1.0),
        "low_scale": (1.5, 1.0, 0.9),
        "low_translation": (0.4, 0.2, 0.1),
    }
    expected = _map_coordinates(field, shape, g)
    got = upsample_array(field, shape, dtype=np.float64, **g)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    # Clamped on both sides: the first and last voxels carry the field's corner values.
    assert got[0, 0, 0] == field[0, 0, 0]
    assert got[-1, -1, -1] == field[-1, -1, -1]


def test_length_one_field_axis_is_constant_along_it():
    field = _field((1, 9, 8), (1, 1, 1), np.float64, seed=6)
    g = {
        "scale": (1.0, 1.0, 1.0),
        "translation": (0.0, 0.0, 0.0),
        "low_scale": (8.0, 2.0, 2.0),
        "low_translation": (3.5, 0.0, 0.0),
    }
    got = upsample_array(field, (8, 18, 16), dtype=np.float64, **g)
    np.testing.assert_array_equal(got, np.broadcast_to(got[:1], got.shape))
    # Along y and x (factor 2, centres aligned) even voxels hit field voxels, odd ones halve.
    np.testing.assert_array_equal(got[0, ::2, ::2], field[0])
    np.testing.assert_allclose(got[0, 1:-1:2, 0], (field[0, :-1, 0] + field[0, 1:, 0]) / 2)
    np.testing.assert_array_equal(got[0, 16:, 14:], field[0, 8, 7])  # clamped far edge


@pytest.mark.parametrize(
    ("shape", "factors", "scale", "translation"),
    [
        ((24, 32, 40), (2, 4, 8), (2.0, 0.5, 0.5), (10.0, -3.0, 2.5)),
        ((24, 36, 40), (3, 4, 5), (1.0, 0.7, 0.35), (0.0, 0.0, 0.0)),
        ((32, 48), (4, 6), (0.3, 0.3), (1.0, 1.0)),
    ],
)
def test_pyramid_level_of_a_ramp_upsamples_to_the_ramp(shape, factors, scale, translation):
    # Block means of a linear ramp are the ramp at the block centres; placed where the
    # pyramid places them, linear interpolation gives the ramp back wherever it is not
    # clamped. A shifted or stretched grid would tilt the result.
    axes = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    slopes = (0.5, -0.3, 0.2)[: len(shape)]
    ramp = 100.0 + sum(c * a for c, a in zip(slopes, axes, strict=True))
    field = downsample_array(ramp, factors, "mean")
    g = _geometry(shape, factors, scale, translation)
    got = upsample_array(field, shape, dtype=np.float64, **g)
    # Inside: between the first and the last block centre along every axis.
    inside = tuple(
        slice((f - 1) // 2 + 1, (n // f - 1) * f + (f - 1) // 2)
        for n, f in zip(shape, factors, strict=True)
    )
    np.testing.assert_allclose(got[inside], ramp[inside], rtol=0, atol=1e-9)
    # Outside: the edge values, i.e. the ramp frozen at the outermost block centres.
    first = tuple(slice(0, 1) for _ in shape)
    np.testing.assert_allclose(got[first], field[first], rtol=0, atol=1e-12)
    # The same through the lazy path, with chunks that cut blocks.
    lazy = upsample(field, shape, tuple(n // 3 + 1 for n in shape), dtype=np.float64, **g)
    np.testing.assert_array_equal(lazy.compute(), got)


def test_non_native_byte_order_field():
    g = _geometry((12, 16), (3, 4))
    field = _field((12, 16), (3, 4), np.float64, seed=7)
    swapped = field.astype(">f8")
    np.testing.assert_array_equal(
        upsample_array(swapped, (12, 16), **g), upsample_array(field, (12, 16), **g)
    )


# --------------------------------------------------------------------------- weights


def test_weights_of_factor_four_block_means():
    # A level made by mean at f = 4 puts field voxel k at full index 4 k + 1.5.
    i0, i1, w = upsample_weights(10, 1.0, 0.0, 3, 4.0, 1.5)
    u = np.clip((np.arange(10) - 1.5) / 4, 0, 2)
    np.testing.assert_array_equal(i0, np.floor(u).astype(np.intp))
    np.testing.assert_array_equal(i1, np.minimum(np.floor(u) + 1, 2).astype(np.intp))
    np.testing.assert_array_equal(w, u - np.floor(u))
    assert i0.dtype == np.intp and i1.dtype == np.intp and w.dtype == np.float64
    np.testing.assert_array_equal(w[:2], 0.0)  # clamped below the first centre
    assert (i0[9], i1[9], w[9]) == (1, 2, 0.875)


def test_weights_clamp_at_the_far_edge_and_for_one_voxel():
    i0, i1, w = upsample_weights(12, 1.0, 0.0, 2, 4.0, 1.5)
    assert (i0[-1], i1[-1], w[-1]) == (1, 1, 0.0)
    i0, i1, w = upsample_weights(5, 1.0, 0.0, 1, 8.0, 3.5)
    np.testing.assert_array_equal(i0, 0)
    np.testing.assert_array_equal(i1, 0)
    np.testing.assert_array_equal(w, 0.0)


def test_weights_with_start_are_a_slice_of_the_whole_axis():
    whole = upsample_weights(50, 0.3, -1.0, 9, 1.7, 0.2)
    part = upsample_weights(7, 0.3, -1.0, 9, 1.7, 0.2, start=31)
    for a, b in zip(whole, part, strict=True):
        np.testing.assert_array_equal(a[31:38], b)


# --------------------------------------------------------------------------- last voxel off grid


def _partial_geometry(shape, factors, scale, translation):
    g = _geometry(shape, factors, scale, translation)
    centres = [block_centres_reference(n, f, s, t)
               for n, f, s, t in zip(shape, factors, scale, translation, strict=True)]  # fmt: skip
    return g, centres, tuple(c[-1] for c in centres)


PARTIAL = {
    "1d-33-f4": ((33,), (4,), (1.0,), (0.0,)),
    "1d-34-f4": ((34,), (4,), (0.5,), (2.0,)),
    "2d-two-voxel-field": ((7, 5), (4, 3), (1.0, 2.0), (0.0, -1.0)),
    "3d-3-4-5": (SHAPE, FACTORS, (2.0, 0.3, 0.3), (5.0, -1.0, 0.25)),
    "3d-37-61-53": ((37, 61, 53), (3, 4, 5), (2.0, 0.5, 0.3), (1.0, -2.0, 0.5)),
}


@pytest.mark.parametrize(("shape", "factors", "scale", "translation"), PARTIAL.values(),
                         ids=PARTIAL.keys())  # fmt: skip
def test_last_voxel_at_its_own_centre_matches_numpy_interp(shape, factors, scale, translation):
    g, centres, last = _partial_geometry(shape, factors, scale, translation)
    field = _field(shape, factors, np.float64, seed=13)
    got = upsample_array(field, shape, dtype=np.float64, low_last_centre=last, **g)
    np.testing.assert_allclose(
        got,
        interp_reference(field, shape, g["scale"], g["translation"], centres),
        rtol=1e-12,
        atol=0,
    )
    got32 = upsample_array(field.astype(np.float32), shape, low_last_centre=last, **g)
    np.testing.assert_allclose(got32, got, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("shape", "factors", "scale", "translation"), PARTIAL.values(),
                         ids=PARTIAL.keys())  # fmt: skip
def test_block_means_of_a_ramp_upsample_to_the_ramp_up_to_the_far_edge(
    shape, factors, scale, translation
):
    # The audit's case (33 voxels, f = 4): the last mean, of voxel 32 alone, sits at 32, and
    # voxels 30 .. 32 come back as 30, 31, 32 (at 33.5 they came back as 29.81, 30.44, 31.06).
    g, centres, last = _partial_geometry(shape, factors, scale, translation)
    positions = [t + np.arange(n) * s for n, s, t in zip(shape, scale, translation, strict=True)]
    slopes = (0.5, -0.3, 0.2)[-len(shape) :]
    ramp = 100.0 + sum(
        c * a for c, a in zip(slopes, np.meshgrid(*positions, indexing="ij"), strict=True)
    )
    field = block_mean_reference(ramp, factors)
    clamped = [np.clip(x, c[0], c[-1]) for x, c in zip(positions, centres, strict=True)]
    want = 100.0 + sum(
        c * a for c, a in zip(slopes, np.meshgrid(*clamped, indexing="ij"), strict=True)
    )
    got = upsample_array(field, shape, dtype=np.float64, low_last_centre=last, **g)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    for chunks in ((5, 7, 6)[-len(shape) :], (4, 30, 1)[-len(shape) :], shape):
        lazy = upsample(field, shape, chunks, dtype=np.float64, low_last_centre=last, **g)
        np.testing.assert_array_equal(lazy.compute(), got)
    if shape == (33,):
        np.testing.assert_allclose(got[30:], [30.0 * 0.2 + 100, 31 * 0.2 + 100, 32 * 0.2 + 100])


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
def test_blockwise_equals_whole_array_bitwise_with_the_last_voxel_off_the_grid(chunks):
    g, _, last = _partial_geometry(SHAPE, FACTORS, (2.0, 0.3, 0.3), (5.0, -1.0, 0.25))
    field = _field(SHAPE, FACTORS, np.float64, seed=14)
    whole = upsample_array(field, SHAPE, low_last_centre=last, **g)
    lazy = upsample(field, SHAPE, chunks, low_last_centre=last, **g)
    np.testing.assert_array_equal(lazy.compute(scheduler="threads"), whole)
    region = (slice(20, 23), slice(3, 30), slice(15, 17))
    np.testing.assert_array_equal(
        upsample_block(field, region, low_last_centre=last, **g), whole[region]
    )


def test_the_regular_last_centre_given_explicitly_changes_nothing():
    g = _geometry(SHAPE, FACTORS, scale=(2.0, 0.3, 0.3), translation=(5.0, -1.0, 0.25))
    field = _field(SHAPE, FACTORS, np.float64, seed=15)
    low = zip(field.shape, g["low_scale"], g["low_translation"], strict=True)
    regular = tuple(t + (n - 1) * s for n, s, t in low)
    np.testing.assert_array_equal(
        upsample_array(field, SHAPE, low_last_centre=regular, **g),
        upsample_array(field, SHAPE, **g),
    )


def test_weights_of_a_partial_last_block():
    # 33 voxels, f = 4: centres 1.5, 5.5, ..., 29.5 and the last at 32 (voxel 32 alone).
    i0, i1, w = upsample_weights(33, 1.0, 0.0, 9, 4.0, 1.5, low_last_centre=32.0)
    np.testing.assert_array_equal(i0[30:], [7, 7, 8])
    np.testing.assert_array_equal(i1[30:], [8, 8, 8])
    np.testing.assert_allclose(w[30:], [0.5 / 2.5, 1.5 / 2.5, 0.0], rtol=1e-15)
    regular = upsample_weights(33, 1.0, 0.0, 9, 4.0, 1.5)
    for a, b in zip(regular, (i0, i1, w), strict=True):
        np.testing.assert_array_equal(a[:30], b[:30])  # up to the last but one centre
    part = upsample_weights(4, 1.0, 0.0, 9, 4.0, 1.5, start=29, low_last_centre=32.0)
    for a, b in zip((i0, i1, w), part, strict=True):
        np.testing.assert_array_equal(a[29:], b)
    # With one field voxel there is nothing to interpolate, wherever it sits.
    one = upsample_weights(5, 1.0, 0.0, 1, 8.0, 3.5, low_last_centre=1.0)
    np.testing.assert_array_equal(one[2], 0.0)


@pytest.mark.parametrize(
    ("last", "error", "match"),
    [
        (5.5, ValueError, r"beyond the centre of the last but one field voxel \(5\.5\)"),
        (1.0, ValueError, "beyond the centre of the last but one field voxel"),
        (np.nan, ValueError, "`low_last_centre` must be a finite number"),
        ("9", TypeError, "`low_last_centre` must be a real number"),
    ],
)
def test_bad_last_centre(last, error, match):
    with pytest.raises(error, match=match):
        upsample_weights(10, 1.0, 0.0, 3, 4.0, 1.5, low_last_centre=last)
    with pytest.raises(error, match=match):
        upsample_array(FIELD, (12, 12), low_last_centre=(9.5, last), **GEOMETRY)
    with pytest.raises(error, match=match):
        upsample(FIELD, (12, 12), 4, low_last_centre=(last, 9.5), **GEOMETRY)


def test_bad_last_centre_length():
    with pytest.raises(ValueError, match=r"`low_last_centre` needs one number per spatial axis"):
        upsample_array(FIELD, (12, 12), low_last_centre=(9.5,), **GEOMETRY)


def test_divide_upsampled_follows_the_last_centre_of_the_recipe():
    g, _, last = _partial_geometry(SHAPE, FACTORS, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    field = _field(SHAPE, FACTORS, np.float32, seed=16)
    full = np.random.default_rng(17).integers(0, 2**16, SHAPE).astype(np.uint16)
    up = upsample_array(field, SHAPE, low_last_centre=last, **g)
    recipe = upsample_recipe(upsample(field, SHAPE, (5, 7, 6), low_last_centre=last, **g))
    got = divide_upsampled(da.from_array(full, (5, 7, 6)), recipe, 12.5, dtype=np.uint16)
    np.testing.assert_array_equal(got.compute(), _divide_reference(full, up, 12.5, np.uint16))
    regular = upsample_array(field, SHAPE, **g)
    assert not np.array_equal(up, regular)


# --------------------------------------------------------------------------- casting


TARGETS = [np.uint8, np.uint16, np.int16, np.int32, np.float32]
SPECIAL = [
    0.0, -0.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 127.5, 128.5, 254.5, 255.5, 256.5,
    -128.5, -129.5, 32767.5, 32768.5, -32768.5, -32769.5, 65534.5, 65535.5, 65536.5,
    2147483647.0, 2147483648.0, -2147483649.0, 1e10, -1e10, 3e38, -3e38,
    np.inf, -np.inf, np.nan, -np.nan, 7.25, -7.75, 1e-300,
]  # fmt: skip


def _cast_reference(values, dtype):
    """The NumPy expression in float64 (where every bound is exact), NaN mapped to 0."""
    if np.dtype(dtype).kind == "f":
        return values.astype(dtype)
    info = np.iinfo(dtype)
    v = values.astype(np.float64)
    v = np.where(np.isnan(v), 0.0, v)
    return np.clip(np.rint(v), info.min, info.max).astype(dtype)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", [np.float32, np.float64])
def test_cast_matches_numpy_expression(target, source):
    rng = np.random.default_rng(8)
    random = rng.normal(0, 40000, 2000).round(1)  # many exact .5 and beyond-range values
    with np.errstate(over="ignore"):
        values = np.concatenate([np.array(SPECIAL), random, random / 500]).astype(source)
    values = values[: values.size // 4 * 4].reshape(2, -1, 2)[:, ::2]  # strided, 3D
    expected = _cast_reference(values, target)
    got = cast_to_dtype(values, target)
    assert got.dtype == target
    assert got.shape == values.shape
    np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))


def test_cast_rounds_half_to_even_and_maps_nan_to_zero():
    values = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 254.5, 255.5, np.nan, -3.0, 300.0])
    got = cast_to_dtype(values, np.uint8)
    np.testing.assert_array_equal(got, [0, 2, 2, 0, 0, 254, 255, 0, 0, 255])


@pytest.mark.parametrize("target", [np.int64, np.uint64])
def test_cast_saturates_64_bit_targets(target):
    info = np.iinfo(target)
    values = np.array([1e30, -1e30, 2.0**63, -(2.0**63), 2.0**53 + 2, np.nan, -0.5])
    got = cast_to_dtype(values, target)
    low = 0 if info.min == 0 else -(2**63)
    high = 2**64 - 1 if info.min == 0 else 2**63 - 1
    expected = [info.max, info.min, min(2**63, high), low, 2**53 + 2, 0, 0]
    assert got.tolist() == expected


def test_cast_integers_clip_exactly_and_floats_keep_values():
    values = np.array([-(2**63), -1, 0, 300, 70000, 2**63 - 1], np.int64)
    np.testing.assert_array_equal(cast_to_dtype(values, np.uint16), [0, 0, 0, 300, 65535, 65535])
    big = np.array([2**64 - 1, 5], np.uint64)
    np.testing.assert_array_equal(cast_to_dtype(big, np.int64), [2**63 - 1, 5])
    np.testing.assert_array_equal(cast_to_dtype(np.array([True, False]), np.uint8), [1, 0])
    floats = np.array([np.nan, 1.25, -3.5], np.float64)
    np.testing.assert_array_equal(cast_to_dtype(floats, np.float32), floats.astype(np.float32))
    swapped = cast_to_dtype(np.array([1.5, 70000.0], ">f8"), ">u2")
    assert swapped.dtype == np.dtype(">u2")
    np.testing.assert_array_equal(swapped, [2, 65535])


# --------------------------------------------------------------------------- recipe, fused division


def test_upsample_marks_its_result_with_its_recipe():
    g = _geometry(SHAPE, FACTORS, scale=(2.0, 0.3, 0.3), translation=(5.0, -1.0, 0.25))
    field = _field(SHAPE, FACTORS, np.float64, seed=9)
    lazy = upsample(field, SHAPE, (5, 7, 6), dtype=np.float32, **g)
    recipe = upsample_recipe(lazy)
    assert isinstance(recipe, UpsampleRecipe)
    assert recipe.name == lazy.name
    assert recipe.shape == SHAPE and recipe.chunks == lazy.chunks
    assert recipe.dtype == np.float32
    low = zip(field.shape, g["low_scale"], g["low_translation"], strict=True)
    regular = tuple(t + (n - 1) * s for n, s, t in low)
    assert recipe.geometry == (
        *(tuple(g[k]) for k in ("scale", "translation", "low_scale", "low_translation")),
        regular,
    )
    last = tuple(c - 0.5 for c in regular)
    recipe = upsample_recipe(upsample(field, SHAPE, 8, low_last_centre=last, **g))
    assert recipe.geometry[4] == last
    np.testing.assert_array_equal(recipe.field, field)
    assert recipe.shared.key in dict(lazy.__dask_graph__())


def test_an_array_changed_in_place_or_derived_has_no_recipe():
    g = _geometry((12, 16), (3, 4))
    lazy = upsample(_field((12, 16), (3, 4)), (12, 16), 5, **g)
    for derived in (lazy.rechunk(4), lazy * 2, lazy[:, 1:], lazy.astype(np.float64), lazy.T):
        assert upsample_recipe(derived) is None
    for other in (lazy.compute(), da.ones((12, 16), chunks=5), None, "upsample"):
        assert upsample_recipe(other) is None
    assert upsample_recipe(lazy) is not None
    lazy[0, 0] = 7.0  # a new graph under the same Python object
    assert upsample_recipe(lazy) is None


def _divide_reference(full, up, offset, dtype):
    """``offset + (full - offset) / up`` as NumPy evaluates it in `t`, then the cast."""
    t = np.result_type(full.dtype, np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if offset == 0:
            values = full.astype(t) / up.astype(t)
        else:
            values = (full.astype(t) - t.type(offset)) / up.astype(t) + t.type(offset)
        return values if dtype is None else cast_to_dtype(values, dtype)


DIVISIONS = [  # source, target, dtype of the upsampled field: wide, odd and foreign dtypes
    (np.int64, np.int64, np.float32),
    (np.uint64, np.uint64, np.float64),
    (np.int32, np.uint16, np.float64),
    (np.uint16, np.int64, np.float32),
    (np.float64, np.uint8, np.float32),
    (np.float32, np.float16, np.float64),
    (np.float16, None, np.float32),
    (np.bool_, np.uint8, np.float32),
    (">u2", ">u2", np.float32),
    (">f4", ">f8", np.float64),
]


@pytest.mark.parametrize(
    ("shape", "factors"), [((37,), (4,)), ((19, 26), (3, 4)), (SHAPE, FACTORS)]
)
@pytest.mark.parametrize(("source", "target", "up_dtype"), DIVISIONS, ids=str)
def test_divide_upsampled_equals_the_numpy_expression_and_the_cast(
    shape, factors, source, target, up_dtype
):
    rng = np.random.default_rng(10)
    g = _geometry(shape, factors, scale=(0.9,) * len(shape), translation=(-1.0,) * len(shape))
    field = _field(shape, factors, np.float64, seed=11)
    field.flat[:3] = 0.0, 1e-300, 1e-30  # inf, NaN and quotients beyond every range
    chunks = tuple(max(1, n // 3 + 1) for n in shape)
    up = upsample_array(field, shape, dtype=up_dtype, **g)
    recipe = upsample_recipe(upsample(field, shape, chunks, dtype=up_dtype, **g))
    source = np.dtype(source)
    if source.kind in "iu":
        info = np.iinfo(source)
        full = rng.integers(
            info.min, info.max, shape, endpoint=True, dtype=source.newbyteorder("=")
        )
        full = full.astype(source)
        full.flat[::4] = info.max
    else:
        full = (rng.standard_normal(shape) * 300).astype(source)
        full.flat[::5] = -0.0 if source.kind == "f" else True
    for offset in (0.0, 37.25, -1e3):
        got = divide_upsampled(da.from_array(full, chunks), recipe, offset, dtype=target)
        want = _divide_reference(full, up, offset, target)
        assert got.dtype == want.dtype
        with np.errstate(over="ignore"):  # float16: beyond its range is inf, as in NumPy
            assert got.compute().tobytes() == want.tobytes()


# --------------------------------------------------------------------------- validation


GEOMETRY = {
    "scale": (1.0, 1.0),
    "translation": (0.0, 0.0),
    "low_scale": (4.0, 4.0),
    "low_translation": (1.5, 1.5),
}
FIELD = np.ones((3, 3), np.float32)


def _with(**changes):
    return {**GEOMETRY, **changes}


@pytest.mark.parametrize(
    ("field", "error", "match"),
    [
        ([[1.0]], TypeError, "`field` must be a NumPy array, got list"),
        (da.ones((3, 3)), TypeError, "got a Dask array"),
        (np.ones((3, 3), np.int32), TypeError, "float32 or float64, got int32"),
        (np.ones((3, 3), np.float16), TypeError, "float32 or float64, got float16"),
        (np.ones((2, 2, 2, 2)), ValueError, "1 to 3 spatial dimensions, got 4"),
        (np.ones(()), ValueError, "1 to 3 spatial dimensions, got 0"),
        (np.ones((3, 0)), ValueError, r"at least one voxel per axis, got \(3, 0\)"),
    ],
)
def test_bad_field(field, error, match):
    with pytest.raises(error, match=match):
        upsample_array(field, (12, 12), **GEOMETRY)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"shape": (12,)}, ValueError, r"`shape` needs one integer per spatial axis \(2\)"),
        ({"shape": (12, 0)}, ValueError, "`shape` must be >= 1, got 0"),
        ({"shape": (12, 2.5)}, TypeError, "`shape` must be an integer, got 2.5"),
        ({"shape": 12}, TypeError, "`shape` must be a sequence of integers, got int"),
        (_with(scale=(1.0, 0.0)), ValueError, "`scale` must be a positive, finite number"),
        (_with(scale=(1.0, -2.0)), ValueError, "`scale` must be a positive, finite number"),
        (_with(scale="11"), TypeError, "`scale` must be a sequence of numbers, got str"),
        (_with(translation=(0.0, np.nan)), ValueError, "`translation` must be a finite number"),
        (_with(translation=(0.0, None)), TypeError, "`translation` must be a real number"),
        (_with(low_scale=(4.0,)), ValueError, r"`low_scale` needs one number per spatial axis"),
        (_with(low_scale=(4.0, np.inf)), ValueError, "`low_scale` must be a positive, finite"),
        (_with(low_translation=(True, 0)), TypeError, "`low_translation` must be a real number"),
        ({"dtype": np.int32}, TypeError, "`dtype` must be float32 or float64"),
        ({"dtype": np.float16}, TypeError, "`dtype` must be float32 or float64"),
        ({"dtype": "no-such-type"}, TypeError, "`dtype` must be float32 or float64"),
        ({"dtype": None}, TypeError, "`dtype` must be float32 or float64, got None"),
    ],
)
def test_bad_shape_geometry_or_dtype(kwargs, error, match):
    arguments = {"shape": (12, 12), **GEOMETRY, **kwargs}
    with pytest.raises(error, match=match):
        upsample_array(FIELD, **arguments)
    with pytest.raises(error, match=match):
        upsample(FIELD, chunks=4, **arguments)


@pytest.mark.parametrize(
    ("chunks", "error", "match"),
    [
        ((4,), ValueError, r"`chunks` needs one chunk size per spatial axis \(2\)"),
        ((4, 0), ValueError, "`chunks` must be >= 1, got 0"),
        (0, ValueError, "`chunks` must be >= 1, got 0"),
        (((4, 4), (6, 6)), ValueError, r"`chunks` \(4, 4\) must add up to the axis length 12"),
        (((6, 6), (6, 6.0)), TypeError, "`chunks` must be an integer, got 6.0"),
        ("auto", TypeError, "`chunks` must be a sequence of chunk sizes, got str"),
        ((4, True), TypeError, "`chunks` must be an integer, got True"),
    ],
)
def test_bad_chunks(chunks, error, match):
    with pytest.raises(error, match=match):
        upsample(FIELD, (12, 12), chunks, **GEOMETRY)


@pytest.mark.parametrize(
    ("origin", "block_shape", "error", "match"),
    [
        ((0, -1), (4, 4), ValueError, "`origin` must be >= 0, got -1"),
        ((0, 0.5), (4, 4), TypeError, "`origin` must be an integer, got 0.5"),
        ((0,), (4, 4), ValueError, r"`origin` needs one integer or slice per spatial axis"),
        ((0, 0), None, TypeError, "`block_shape` must be a sequence of integers, got NoneType"),
        ((0, 0), (4, 0), ValueError, "`block_shape` must be >= 1, got 0"),
        ((slice(0, 4), slice(None, 4)), None, ValueError, "need a start, a stop and step 1"),
        ((slice(0, 4), slice(0, 8, 2)), None, ValueError, "need a start, a stop and step 1"),
        ((slice(0, 4), slice(4, 4)), None, ValueError, "`block_shape` must be >= 1, got 0"),
        ((slice(0, 4), slice(0, 4)), (4, 5), ValueError, r"`block_shape` \(4, 5\) disagrees"),
    ],
)
def test_bad_block(origin, block_shape, error, match):
    with pytest.raises(error, match=match):
        upsample_block(FIELD, origin, block_shape, **GEOMETRY)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((0, 1.0, 0.0, 3, 4.0, 1.5), {}, ValueError, "`n_out` must be >= 1, got 0"),
        ((5, 1.0, 0.0, 0, 4.0, 1.5), {}, ValueError, "`n_low` must be >= 1, got 0"),
        ((5, 1.0, 0.0, True, 4.0, 1.5), {}, TypeError, "`n_low` must be an integer, got True"),
        ((5, 1.0, 0.0, 3, 4.0, 1.5), {"start": -1}, ValueError, "`start` must be >= 0"),
        ((5, 0.0, 0.0, 3, 4.0, 1.5), {}, ValueError, "`scale` must be a positive, finite"),
        ((5, 1.0, np.inf, 3, 4.0, 1.5), {}, ValueError, "`translation` must be a finite"),
        ((5, 1.0, 0.0, 3, -4.0, 1.5), {}, ValueError, "`low_scale` must be a positive"),
        ((5, 1.0, 0.0, 3, 4.0, "1.5"), {}, TypeError, "`low_translation` must be a real"),
    ],
)
def test_bad_weights_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        upsample_weights(*args, **kwargs)


@pytest.mark.parametrize("scratch", [0, 40 * 3 * 17, 40 * 7 * 17, 2**20])
@pytest.mark.parametrize("low_scale", [(3.0, 4.0, 5.0), (2.5, 0.6, 0.45)], ids=["coarse", "fine"])
def test_divide_upsampled_in_strips_of_rows_is_the_same(monkeypatch, scratch, low_scale):
    # A small scratch splits each block into strips of output rows (2 field rows at least).
    module = importlib.import_module("voxflow.core.upsample")  # `upsample` is also a function
    monkeypatch.setattr(module, "_SCRATCH_BYTES", scratch)
    rng = np.random.default_rng(12)
    for shape, chunks_list in ((SHAPE, (SHAPE, (5, 7, 6), (1, 30, 17))), ((30, 17), ((30, 17),))):
        ndim = len(shape)
        g = {
            "scale": (1.0,) * ndim,
            "translation": (0.0,) * ndim,
            "low_scale": low_scale[-ndim:],
            "low_translation": (0.5, -0.25, 1.0)[-ndim:],
        }
        low = tuple(int(n / s) + 2 for n, s in zip(shape, g["low_scale"], strict=True))
        field = rng.uniform(0.25, 1.75, low).astype(np.float32)
        full = rng.integers(0, 2**16, shape).astype(np.uint16)
        want = _divide_reference(full, upsample_array(field, shape, **g), 97.25, np.uint16)
        for chunks in chunks_list:
            recipe = upsample_recipe(upsample(field, shape, chunks, **g))
            got = divide_upsampled(da.from_array(full, chunks), recipe, 97.25, dtype=np.uint16)
            np.testing.assert_array_equal(got.compute(), want)


def _recipe():
    return upsample_recipe(upsample(FIELD, (12, 12), 4, **GEOMETRY))


@pytest.mark.parametrize(
    ("full", "recipe", "kwargs", "error", "match"),
    [
        (np.ones((12, 12)), _recipe(), {}, TypeError, "`full` must be a Dask array of numbers"),
        (da.ones((12, 12), dtype="c8", chunks=4), _recipe(), {}, TypeError, "got complex64"),
        (da.ones((12, 12), chunks=4), None, {}, TypeError, "an UpsampleRecipe, got NoneType"),
        (da.ones((12, 12), chunks=6), _recipe(), {}, ValueError, r"the chunks \(\(4, 4, 4\)"),
        (da.ones((12, 11), chunks=4), _recipe(), {}, ValueError, r"the shape \(12, 12\)"),
        (da.ones((12, 12), chunks=4), _recipe(), {"offset": np.nan}, ValueError, "`offset` must"),
        (da.ones((12, 12), chunks=4), _recipe(), {"offset": "1"}, TypeError, "`offset` must"),
        (da.ones((12, 12), chunks=4), _recipe(), {"dtype": bool}, TypeError, "integer or float"),
        (da.ones((12, 12), chunks=4), _recipe(), {"dtype": "c16"}, TypeError, "integer or float"),
    ],
)
def test_bad_divide_upsampled_arguments(full, recipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        divide_upsampled(full, recipe, **kwargs)


@pytest.mark.parametrize(
    ("values", "dtype", "match"),
    [
        ([1.0, 2.0], np.uint8, "`values` must be a NumPy array of floats or integers, got list"),
        (np.ones(3, np.complex64), np.uint8, "floats or integers, got complex64"),
        (np.ones(3), np.bool_, "`dtype` must be an integer or float dtype"),
        (np.ones(3), np.complex128, "`dtype` must be an integer or float dtype"),
        (np.ones(3), "no-such-type", "`dtype` must be an integer or float dtype"),
        (np.ones(3), None, "`dtype` must be an integer or float dtype, got None"),
    ],
)
def test_bad_cast_arguments(values, dtype, match):
    with pytest.raises(TypeError, match=match):
        cast_to_dtype(values, dtype)

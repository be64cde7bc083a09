import itertools
import math

import dask
import dask.array as da
import numpy as np
import pytest
from scipy import ndimage

from voxflow.core.pyramid import Method, downsample, downsample_array, level_transform

# --------------------------------------------------------------------------- references


def _blocks(image, factors):
    """Yield (output index, block) for every block, partial edge blocks included."""
    out_shape = tuple(math.ceil(n / f) for n, f in zip(image.shape, factors, strict=True))
    for idx in np.ndindex(*out_shape):
        sl = tuple(slice(i * f, (i + 1) * f) for i, f in zip(idx, factors, strict=True))
        yield idx, image[sl]


def _round_half_up(value, dtype):
    info = np.iinfo(dtype)
    return min(max(math.floor(value + 0.5), info.min), info.max)


def _ref_mean(block):
    if block.dtype.kind == "f":
        return block.mean(dtype=np.float64)
    total = sum(int(v) for v in block.ravel())
    count = block.size
    return (2 * total + count) // (2 * count)  # exact floor(total / count + 1/2) on Python ints


def _ref_mode(block):
    values, counts = np.unique(block, return_counts=True)
    return values[np.argmax(counts)]  # first maximum: the smallest value among ties


_BLOCK_REFERENCES = {
    "mean": _ref_mean,
    "mode": _ref_mode,
    "min": np.min,
    "max": np.max,
    "stride": lambda block: block.ravel()[0],
}


def _ref_blockwise(image, factors, method):
    fn = _BLOCK_REFERENCES[method]
    out = np.empty(
        tuple(math.ceil(n / f) for n, f in zip(image.shape, factors, strict=True)), image.dtype
    )
    for idx, block in _blocks(image, factors):
        out[idx] = fn(block)
    return out


def _centre_weights(n, f):
    """(index, weight) pairs that sample the centre of each block of an axis."""
    starts = range(0, n, f)
    if f % 2:
        return [[(min(s + (f - 1) // 2, n - 1), 1.0)] for s in starts]
    return [[(min(s + f // 2 - 1, n - 1), 0.5), (min(s + f // 2, n - 1), 0.5)] for s in starts]


def _ref_gaussian(image, factors):
    sigma = [(f - 1) / 2 for f in factors]
    smooth = ndimage.gaussian_filter(image.astype(np.float64), sigma, mode="nearest", truncate=4.0)
    per_axis = [_centre_weights(n, f) for n, f in zip(image.shape, factors, strict=True)]
    out = np.empty([len(p) for p in per_axis], np.float64)
    for idx in np.ndindex(*out.shape):
        terms = itertools.product(*(per_axis[a][i] for a, i in enumerate(idx)))
        out[idx] = sum(
            smooth[tuple(t[0] for t in term)] * math.prod(t[1] for t in term) for term in terms
        )
    if image.dtype.kind == "f":
        return out.astype(image.dtype)
    return np.vectorize(lambda v: _round_half_up(v, image.dtype), otypes=[image.dtype])(out)


def _reference(image, factors, method):
    if method == "gaussian":
        return _ref_gaussian(image, factors)
    return _ref_blockwise(image, factors, method)


def _data(rng, shape, dtype, method):
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind == "f":
        return rng.normal(10, 5, shape).astype(dtype)
    info = np.iinfo(dtype)
    if method == "mode":
        lo, hi = max(info.min, -2), 4  # few labels, so blocks have ties and repeats
    else:
        lo, hi = max(info.min, -(2**40)), min(info.max, 2**40)
    return rng.integers(lo, hi, shape, endpoint=True).astype(dtype)


def _assert_matches(got, expected):
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    if got.dtype.kind == "f":
        # Summation order differs from the reference (sequential vs pairwise).
        np.testing.assert_allclose(got, expected, rtol=1e-6 if got.dtype == np.float32 else 1e-12)
    else:
        np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------- NumPy path

# Shapes that do not divide, factors 1 / 2 / 3 mixed per axis, 2D to 5D, blocks larger than the
# array, and one block of 75 voxels (the sorting mode kernel; smaller ones count).
CASES = [
    ((7, 10), (2, 3)),
    ((5, 9, 11), (2, 2, 2)),
    ((5, 9, 11), (3, 1, 2)),
    ((3, 4, 5), (4, 5, 6)),
    ((6, 11, 7), (5, 5, 3)),
    ((2, 5, 6, 7), (1, 2, 3, 2)),
    ((2, 2, 4, 5, 6), (1, 1, 3, 2, 2)),
]
CASE_IDS = [f"{len(s)}d-{'x'.join(map(str, f))}" for s, f in CASES]

DTYPES = {
    "mean": ["uint8", "uint16", "int8", "int32", "int64", "float32"],
    "mode": ["uint8", "int32", "bool"],
    "min": ["uint16", "int8", "float32", "bool"],
    "max": ["uint16", "int8", "float32", "bool"],
    "stride": ["uint8", "float64", "bool"],
    "gaussian": ["uint8", "uint16", "int16", "float32"],
}
# One dtype per method where a single one is enough.
DASK_DTYPES = {
    "mean": "uint16",
    "mode": "int32",
    "min": "float32",
    "max": "int8",
    "stride": "bool",
    "gaussian": "float32",
}
METHOD_DTYPES = [(m, d) for m, ds in DTYPES.items() for d in ds]


@pytest.mark.parametrize(("method", "dtype"), METHOD_DTYPES)
@pytest.mark.parametrize(("shape", "factors"), CASES, ids=CASE_IDS)
def test_downsample_array_matches_reference(method, dtype, shape, factors):
    image = _data(np.random.default_rng(0), shape, dtype, method)
    got = downsample_array(image, factors, method)
    _assert_matches(got, _reference(image, factors, method))


@pytest.mark.parametrize("method", list(Method))
def test_downsample_array_accepts_non_contiguous_input(method):
    dtype = DASK_DTYPES[method]
    image = _data(np.random.default_rng(1), (9, 8, 7), dtype, method).transpose(2, 0, 1)
    got = downsample_array(image, (2, 3, 2), method)
    _assert_matches(got, _reference(np.ascontiguousarray(image), (2, 3, 2), method))


@pytest.mark.parametrize("method", list(Method))
def test_factor_one_everywhere_is_identity(method):
    image = _data(np.random.default_rng(2), (3, 4, 5), DASK_DTYPES[method], method)
    got = downsample_array(image, (1, 1, 1), method)
    assert got.dtype == image.dtype
    np.testing.assert_array_equal(got, image)


@pytest.mark.parametrize(
    ("row", "dtype", "expected"),
    [
        ([1, 2], "uint8", 2),  # 1.5 rounds up
        ([2, 3], "uint8", 3),  # 2.5 rounds up, not to even
        ([0, 0, 0, 1], "uint8", 0),  # 0.25
        ([0, 1, 1, 1], "uint8", 1),  # 0.75
        ([1, 1, 2, 2], "uint16", 2),  # 1.5
        ([-1, -2], "int8", -1),  # -1.5 rounds up
        ([-2, -3], "int8", -2),  # -2.5 rounds up
        ([-128, -128], "int8", -128),
        ([65535, 65535], "uint16", 65535),  # no overflow
        ([65535, 65534], "uint16", 65535),
        ([2**32 - 1, 2**32 - 2], "uint32", 2**32 - 1),
        ([2**31 - 1, 2**31 - 1], "int32", 2**31 - 1),
        ([-(2**31), -(2**31)], "int32", -(2**31)),
        ([2**40 + 1, 2**40 + 2], "int64", 2**40 + 2),
    ],
)
def test_integer_mean_rounds_half_up_without_overflow(row, dtype, expected):
    image = np.array([row], dtype=dtype)
    got = downsample_array(image, (1, len(row)), "mean")
    assert got.dtype == np.dtype(dtype)
    assert got.tolist() == [[expected]]


def test_integer_mean_of_a_saturated_image_stays_saturated():
    image = np.full((4, 6, 6), 65535, np.uint16)
    got = downsample_array(image, (2, 3, 2), "mean")
    assert (got == 65535).all()


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ([9, 4], 4),  # one voxel each: the smaller label wins
        ([4, 9], 4),  # whatever the order
        ([7, 7, 3, 3, 1, 1, 8, 5], 1),  # three pairs tie
        ([6, 6, 6, 2, 2, 2, 9, 9], 2),
        ([5, 0, 0, 5, 5, 0, 3, 3], 0),
        ([8, 8, 8, 1, 1, 2, 3, 4], 8),  # a strict majority beats smaller values
        ([-3, 2, 2, -3, 1, 0, 0, 5], -3),  # signed: the smallest value, not the smallest bits
    ],
)
def test_mode_breaks_ties_towards_the_smallest_value(row, expected):
    image = np.array(row, np.int32).reshape(1, 1, len(row))
    assert downsample_array(image, (1, 1, len(row)), "mode").item() == expected


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ({9: 25, 4: 25, 1: 25}, 1),
        ({3: 30, 8: 30, 0: 15}, 3),
        ({-3: 20, 2: 20, 1: 20, 5: 15}, -3),
        ({8: 40, 1: 35}, 8),
    ],
)
def test_mode_ties_in_large_blocks(counts, expected):
    # 75 voxels per block: above the counting kernel's limit, so the sorting kernel runs.
    values = np.concatenate([np.full(n, v, np.int32) for v, n in counts.items()])
    image = np.random.default_rng(3).permutation(values).reshape(5, 5, 3)
    assert downsample_array(image, (5, 5, 3), "mode").item() == expected


def test_mode_in_a_partial_edge_block():
    labels = np.zeros((2, 2, 5), np.int32)
    labels[:, :, 4] = [[7, 3], [3, 7]]  # the edge block of x holds 4 voxels: 7 twice, 3 twice
    labels[0, 0, 1] = 9  # a single voxel loses to three of 0
    assert downsample_array(labels, (2, 2, 2), "mode").tolist() == [[[0, 0, 3]]]


def test_min_max_propagate_nan():
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    image[1, 1] = np.nan
    image[2, 3] = np.nan
    for method in ("min", "max"):
        got = downsample_array(image, (2, 2), method)
        assert np.isnan(got).tolist() == [[True, False], [False, True]]


def test_gaussian_keeps_a_constant_image_and_the_dtype_range():
    for dtype in ("uint8", "int16", "float32"):
        info = np.iinfo(dtype) if np.dtype(dtype).kind != "f" else np.finfo(dtype)
        for value in (info.min, info.max):
            image = np.full((5, 6, 7), value, dtype)
            got = downsample_array(image, (2, 3, 2), "gaussian")
            assert got.dtype == np.dtype(dtype)
            assert (got == value).all()


def test_stride_is_slicing():
    image = np.arange(5 * 7 * 8).reshape(5, 7, 8).astype(np.uint16)
    np.testing.assert_array_equal(downsample_array(image, (2, 3, 1), "stride"), image[::2, ::3])


@pytest.mark.parametrize("method", ["mean", "gaussian"])
@pytest.mark.parametrize("factors", [(2, 2), (3, 3), (2, 3)])
def test_block_centres_match_level_transform(method, factors):
    # Reducing a linear ramp of physical positions gives each output voxel's position: the
    # reduction and the metadata agree on where a coarse voxel lies.
    scale, translation = (0.5, 2.0), (1.0, -3.0)
    grid = np.indices((24, 30), dtype=np.float64)
    new_scale, new_translation = level_transform(scale, translation, factors, method)
    for axis in range(2):
        ramp = translation[axis] + scale[axis] * grid[axis]
        got = downsample_array(ramp, factors, method)
        expected = new_translation[axis] + new_scale[axis] * np.indices(got.shape)[axis]
        # Away from the edges (Gaussian boundary, partial blocks) the ramp is exact.
        np.testing.assert_allclose(got[1:-2, 1:-2], expected[1:-2, 1:-2], atol=1e-9)


# --------------------------------------------------------------------------- Dask path

DASK_SHAPE = (11, 13, 10)
# Chunks that do not divide the shape, that leave 1-voxel edge chunks, that are smaller than
# the Gaussian radius, and one chunk for everything.
INPUT_CHUNKS = [(4, 5, 3), (10, 12, 9), (2, 3, 1), (11, 13, 10)]


@pytest.mark.parametrize("chunks", INPUT_CHUNKS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("factors", [(2, 2, 2), (3, 1, 2), (1, 3, 4)])
@pytest.mark.parametrize("method", list(Method))
def test_dask_equals_numpy_for_any_chunking(method, factors, chunks):
    image = _data(np.random.default_rng(4), DASK_SHAPE, DASK_DTYPES[method], method)
    expected = downsample_array(image, factors, method)
    lazy = downsample(da.from_array(image, chunks=chunks), factors, method)
    got = lazy.compute(scheduler="sync")
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)  # bitwise, floats and Gaussian included


@pytest.mark.parametrize(
    ("method", "dtype"),
    [("mean", "uint8"), ("mean", "float64"), ("mode", "int32"), ("gaussian", "uint16")],
)
def test_dask_equals_numpy_in_4d_and_2d(method, dtype):
    rng = np.random.default_rng(5)
    for shape, factors, chunks in [
        ((2, 7, 9, 8), (1, 2, 2, 3), (1, 3, 4, 5)),
        ((17, 14), (3, 2), (5, 1)),
    ]:
        image = _data(rng, shape, dtype, method)
        got = downsample(da.from_array(image, chunks=chunks), factors, method)
        np.testing.assert_array_equal(got.compute(), downsample_array(image, factors, method))


@pytest.mark.parametrize(
    ("out_chunks", "expected_chunks"),
    [
        ((2, 3, 2), ((2, 2, 2), (3, 3, 1), (2, 2, 1))),
        ((4, 1, 5), ((4, 2), (1,) * 7, (5,))),
        ((100, 100, 100), ((6,), (7,), (5,))),
    ],
)
@pytest.mark.parametrize("method", ["mean", "gaussian"])
def test_output_chunks_are_regular_and_values_unchanged(method, out_chunks, expected_chunks):
    image = _data(np.random.default_rng(6), DASK_SHAPE, "uint16", method)
    lazy = downsample(da.from_array(image, chunks=(3, 4, 5)), (2, 2, 2), method, chunks=out_chunks)
    assert lazy.chunks == expected_chunks
    np.testing.assert_array_equal(lazy.compute(), downsample_array(image, (2, 2, 2), method))


def test_default_output_chunks_come_from_the_input_chunks():
    image = da.zeros((40, 50, 60), chunks=((16, 16, 8), (20, 20, 10), (7,) * 8 + (4,)), dtype="u1")
    lazy = downsample(image, (2, 3, 2))
    # largest input chunk // factor per axis: 16 // 2, 20 // 3, 7 // 2
    assert lazy.chunks == ((8, 8, 4), (6, 6, 5), (3,) * 10)
    tiny = downsample(da.zeros((5, 5), chunks=1, dtype="u1"), (2, 2))
    assert tiny.chunks == ((1, 1, 1), (1, 1, 1))


def test_dask_path_is_lazy_and_blockwise():
    calls = []

    def load(block, block_info=None):
        calls.append(block_info[None]["chunk-location"])
        return block

    source = da.from_array(np.ones((8, 8, 8), np.uint16), chunks=4).map_blocks(
        load, dtype=np.uint16
    )
    lazy = downsample(source, (2, 2, 2), chunks=(2, 2, 2))
    assert calls == []  # building the graph computed nothing
    # Each output block needs exactly one input block, never the whole array.
    assert lazy.blocks[0, 1, 1].compute(scheduler="sync").tolist() == np.ones((2, 2, 2)).tolist()
    assert calls == [(0, 1, 1)]


def test_dask_path_runs_on_threads():
    image = _data(np.random.default_rng(7), (32, 30, 28), "int32", "mode")
    lazy = downsample(da.from_array(image, chunks=(8, 10, 7)), (2, 2, 2), "mode")
    with dask.config.set(scheduler="threads", num_workers=2):
        np.testing.assert_array_equal(lazy.compute(), downsample_array(image, (2, 2, 2), "mode"))


# --------------------------------------------------------------------------- level_transform


def test_level_transform_block_methods_move_to_the_block_centre():
    for method in ("mean", "mode", "min", "max", "gaussian", Method.MEAN):
        scale, translation = level_transform((2.0, 0.5, 0.25), (0.0, 10.0, -1.0), (1, 2, 3), method)
        assert scale == (2.0, 1.0, 0.75)
        assert translation == (0.0, 10.25, -0.75)


def test_level_transform_stride_keeps_the_translation():
    scale, translation = level_transform([1, 0.5], [3, -2], [2, 4], "stride")
    assert scale == (2.0, 2.0)
    assert translation == (3.0, -2.0)
    assert all(isinstance(v, float) for v in scale + translation)


def test_level_transform_composes_over_levels():
    # Two levels of 2 equal one level of 4 for block centres: both put voxel 0 at the centre
    # of the first 4 voxels.
    s1, t1 = level_transform((1.0,) * 3, (0.0,) * 3, (2, 2, 2), "mean")
    s2, t2 = level_transform(s1, t1, (2, 2, 2), "mean")
    assert (s2, t2) == level_transform((1.0,) * 3, (0.0,) * 3, (4, 4, 4), "mean")
    assert t2 == (1.5, 1.5, 1.5)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"factors": (2, 2)}, ValueError, r"one integer per axis \(3\), got \(2, 2\)"),
        ({"factors": (2, 0, 2)}, ValueError, "`factors` must be >= 1, got 0"),
        ({"factors": (2, 2.0, 2)}, TypeError, "`factors` must be an integer, got 2.0"),
        ({"factors": (True, 2, 2)}, TypeError, "`factors` must be an integer"),
        ({"factors": 2}, TypeError, "`factors` must be a sequence"),
        ({"factors": "222"}, TypeError, "`factors` must be a sequence"),
        ({"method": "median"}, ValueError, "'mean', 'mode', 'min', 'max', 'stride', 'gaussian'"),
        ({"method": 1}, TypeError, "`method` must be a str or Method, got int"),
    ],
)
@pytest.mark.parametrize("lazy", [False, True], ids=["numpy", "dask"])
def test_invalid_factors_and_method(kwargs, error, match, lazy):
    image = np.zeros((4, 4, 4), np.uint8)
    call = {"factors": (2, 2, 2), "method": "mean", **kwargs}
    with pytest.raises(error, match=match):
        if lazy:
            downsample(da.from_array(image), call["factors"], call["method"])
        else:
            downsample_array(image, call["factors"], call["method"])


@pytest.mark.parametrize("lazy", [False, True], ids=["numpy", "dask"])
def test_only_the_last_three_axes_may_be_reduced(lazy):
    image = np.zeros((2, 3, 4, 4, 4), np.uint8)
    image = da.from_array(image) if lazy else image
    fn = downsample if lazy else downsample_array
    with pytest.raises(ValueError, match="only the last 3 axes"):
        fn(image, (1, 2, 2, 2, 2))
    assert fn(image, (1, 1, 2, 2, 2)).shape == (2, 3, 2, 2, 2)


@pytest.mark.parametrize("shape", [(4,), (1, 1, 1, 1, 1, 1)])
@pytest.mark.parametrize("lazy", [False, True], ids=["numpy", "dask"])
def test_image_must_have_2_to_5_dimensions(shape, lazy):
    image = np.zeros(shape, np.uint8)
    image = da.from_array(image) if lazy else image
    fn = downsample if lazy else downsample_array
    with pytest.raises(ValueError, match=f"2 to 5 dimensions .*got {len(shape)}"):
        fn(image, (1,) * len(shape))


@pytest.mark.parametrize(
    ("dtype", "method"),
    [("bool", "mean"), ("bool", "gaussian"), ("float16", "mode"), ("complex64", "min")],
)
@pytest.mark.parametrize("lazy", [False, True], ids=["numpy", "dask"])
def test_unsupported_dtype(dtype, method, lazy):
    image = np.zeros((4, 4), dtype)
    image = da.from_array(image) if lazy else image
    fn = downsample if lazy else downsample_array
    with pytest.raises(TypeError, match=f"method '{method}' supports dtypes .*; got {dtype}"):
        fn(image, (2, 2), method)


def test_each_path_rejects_the_other_array_type():
    with pytest.raises(TypeError, match="use `downsample` for"):
        downsample_array(da.zeros((4, 4)), (2, 2))
    with pytest.raises(TypeError, match=r"must be a dask.array.Array, got ndarray"):
        downsample(np.zeros((4, 4)), (2, 2))


@pytest.mark.parametrize(
    ("chunks", "error", "match"),
    [
        ((2, 2), ValueError, r"`chunks` needs one integer per axis \(3\)"),
        ((2, 0, 2), ValueError, "`chunks` must be >= 1"),
        ((2, 2, 1.5), TypeError, "`chunks` must be an integer"),
        (4, TypeError, "`chunks` must be a sequence"),
    ],
)
def test_invalid_output_chunks(chunks, error, match):
    with pytest.raises(error, match=match):
        downsample(da.zeros((4, 4, 4)), (2, 2, 2), chunks=chunks)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (((1, 1), (0, 0, 0), (2, 2)), ValueError, r"`translation` needs one number per axis \(2\)"),
        (((1, 1), (0, 0), (2, 2, 2)), ValueError, r"`factors` needs one integer per axis \(2\)"),
        (((1, 0), (0, 0), (2, 2)), ValueError, "`scale` must hold positive, finite numbers"),
        (((1, -1), (0, 0), (2, 2)), ValueError, "`scale` must hold positive, finite numbers"),
        (((1, np.inf), (0, 0), (2, 2)), ValueError, "`scale` must hold positive, finite"),
        (((1, 1), (0, np.nan), (2, 2)), ValueError, "`translation` must hold finite numbers"),
        (((1, "a"), (0, 0), (2, 2)), TypeError, "`scale` must hold real numbers"),
        ((1.0, (0, 0), (2, 2)), TypeError, "`scale` must be a sequence of numbers, got float"),
        (((1, 1), (0, 0), (2, 0)), ValueError, "`factors` must be >= 1"),
        (((1, 1), (0, 0), (2, 2.5)), TypeError, "`factors` must be an integer"),
    ],
)
def test_level_transform_validation(args, error, match):
    with pytest.raises(error, match=match):
        level_transform(*args, "mean")
    with pytest.raises(ValueError, match="`method` must be one of"):
        level_transform((1, 1), (0, 0), (2, 2), "bilinear")


@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2), (2, 1, 2)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.uint32])
@pytest.mark.parametrize("shape", [(6, 8, 10), (7, 9, 11), (1, 1, 3), (5, 2, 1)])
def test_integer_mean_fast_path_equals_exact_rounding(factors, dtype, shape):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(7)
    image = rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    out_shape = tuple(-(-n // f) for n, f in zip(shape, factors, strict=True))
    expected = np.empty(out_shape, dtype=dtype)
    for index in np.ndindex(*out_shape):
        block = image[tuple(slice(i * f, i * f + f) for i, f in zip(index, factors, strict=True))]
        total, count = int(block.astype(object).sum()), block.size
        expected[index] = (2 * total + count) // (2 * count)  # floor(mean + 1/2), exactly
    np.testing.assert_array_equal(downsample_array(image, factors, "mean"), expected)


def test_mean_in_a_float_dtype_is_the_exact_mean_not_rounded():
    from tests.conftest import block_mean_reference

    image = np.random.default_rng(9).integers(0, 60000, (9, 17, 23), dtype=np.uint16)
    lazy = downsample(da.from_array(image, (4, 8, 7)), (2, 3, 4), "mean", dtype=np.float32)
    assert lazy.dtype == np.float32
    want = block_mean_reference(image, (2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(lazy.compute(), want)
    with pytest.raises(ValueError, match="for the mean only"):
        downsample(da.from_array(image), (2, 2, 2), "max", dtype=np.float32)
    with pytest.raises(TypeError):
        downsample(da.from_array(image), (2, 2, 2), "mean", dtype=np.int32)

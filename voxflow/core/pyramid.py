"""Downsampling for multiscale pyramids: block reductions on NumPy and Dask arrays.

One level of a pyramid reduces blocks of ``f`` voxels per axis to one voxel. The whole-array
NumPy path, :func:`downsample_array`, defines the result; the Dask path, :func:`downsample`,
equals it bitwise for any chunking, because every input block it hands to a kernel starts at a
multiple of the factor (and the Gaussian is computed with an exact halo).
"""

from __future__ import annotations

import enum
import functools
import math
import numbers
from collections.abc import Callable, Sequence

import dask.array as da
import numpy as np
from scipy import ndimage

from voxflow.core import _kernels
from voxflow.core._kernels import reduced_shape
from voxflow.core._validate import validate_choice, validate_dtype
from voxflow.core._validate import validate_int as _validate_int

__all__ = ["Method", "downsample", "downsample_array", "level_transform"]


class Method(enum.StrEnum):
    """How a block of voxels becomes one voxel; the value is what pyramid metadata records."""

    MEAN = "mean"
    """Mean of the block (images); integers round half up."""
    MODE = "mode"
    """Most frequent value, the smallest among ties (label images)."""
    MIN = "min"
    """Minimum of the block."""
    MAX = "max"
    """Maximum of the block."""
    STRIDE = "stride"
    """First voxel of the block, ``image[::f]`` (decimation)."""
    GAUSSIAN = "gaussian"
    """Gaussian smoothing with sigma ``(f - 1) / 2``, sampled at block centres."""


_MAX_REDUCED_AXES = 3
_TRUNCATE = 4.0
_INTEGERS = tuple(
    np.dtype(t) for t in ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64")
)
_NUMERIC = (*_INTEGERS, np.dtype("float32"), np.dtype("float64"))
_DTYPES = {
    Method.MEAN: _NUMERIC,
    Method.GAUSSIAN: _NUMERIC,
    Method.MODE: (*_NUMERIC, np.dtype(bool)),
    Method.MIN: (*_NUMERIC, np.dtype(bool)),
    Method.MAX: (*_NUMERIC, np.dtype(bool)),
    Method.STRIDE: (*_NUMERIC, np.dtype(bool)),
}


# --------------------------------------------------------------------------- validation


def _validate_method(method: Method | str) -> Method:
    return validate_choice(method, Method, "method")


def _validate_ints(values: Sequence[int], n: int, name: str, what: str) -> tuple[int, ...]:
    """`n` integers >= 1, one per axis, as a tuple."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise TypeError(f"`{name}` must be a sequence of integers, got {type(values).__name__}")
    got = tuple(values)
    if len(got) != n:
        raise ValueError(f"`{name}` needs one integer per {what} ({n}), got {got}")
    return tuple(_validate_int(v, name, 1) for v in got)


def _validate_factors(factors: Sequence[int], ndim: int) -> tuple[int, ...]:
    """One integer >= 1 per axis; only the last three axes may be reduced."""
    factors = _validate_ints(factors, ndim, "factors", "axis")
    leading = factors[: max(ndim - _MAX_REDUCED_AXES, 0)]
    if any(f != 1 for f in leading):
        raise ValueError(
            f"`factors` may reduce only the last {_MAX_REDUCED_AXES} axes; axes before them "
            f"(channel, time) need factor 1, got {factors}"
        )
    return factors


def _validate_reals(
    values: Sequence[float], ndim: int | None, name: str, *, positive: bool
) -> tuple[float, ...]:
    """Finite floats (positive ones when `positive`), `ndim` of them unless None, as a tuple."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise TypeError(f"`{name}` must be a sequence of numbers, got {type(values).__name__}")
    got = tuple(values)
    if ndim is not None and len(got) != ndim:
        raise ValueError(f"`{name}` needs one number per axis ({ndim}), got {got}")
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in got):
        raise TypeError(f"`{name}` must hold real numbers, got {got}")
    floats = tuple(float(v) for v in got)
    if not all(math.isfinite(v) and (v > 0 or not positive) for v in floats):
        kind = "positive, finite" if positive else "finite"
        raise ValueError(f"`{name}` must hold {kind} numbers, got {got}")
    return floats


def _validate_image(image: object, method: Method) -> np.ndarray:
    if isinstance(image, da.Array):
        raise TypeError("`image` is a Dask array; use `downsample` for the lazy, chunked path")
    image = np.asarray(image)
    _validate_ndim_dtype(image.ndim, image.dtype, method)
    return image


def _validate_ndim_dtype(ndim: int, dtype: np.dtype, method: Method) -> None:
    if not 2 <= ndim <= 5:
        raise ValueError(f"`image` needs 2 to 5 dimensions (yx .. tczyx), got {ndim}")
    if dtype not in _DTYPES[method]:
        valid = ", ".join(sorted({str(d) for d in _DTYPES[method]}))
        raise TypeError(f"method {method.value!r} supports dtypes {valid}; got {dtype}")


def _validate_chunks(chunks: Sequence[int] | None, ndim: int) -> tuple[int, ...] | None:
    if chunks is None:
        return None
    return _validate_ints(chunks, ndim, "chunks", "axis")


# --------------------------------------------------------------------------- implementations


def _last_three(factors: tuple[int, ...]) -> tuple[int, int, int]:
    padded = (1, 1, 1, *factors)
    return padded[-3], padded[-2], padded[-1]


def _on_4d(kernel: Callable, image: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Run a 4D kernel on an N-D image: leading (factor-1) axes collapse into one batch axis."""
    shape = (1,) * max(4 - image.ndim, 0) + image.shape
    batch = math.prod(shape[:-3])
    view = np.ascontiguousarray(image).reshape(batch, *shape[-3:])
    out = kernel(view, _last_three(factors))
    return out.reshape(reduced_shape(image.shape, factors))


def _stride(image: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(image[tuple(slice(None, None, f) for f in factors)])


def _smooth(image: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Gaussian smoothing in float64, sigma ``(f - 1) / 2`` per axis (0: axis untouched)."""
    sigma = [(f - 1) / 2 for f in factors]
    return ndimage.gaussian_filter(
        np.asarray(image, dtype=np.float64), sigma, mode="nearest", truncate=_TRUNCATE
    )


def _gaussian_depth(factors: tuple[int, ...]) -> tuple[int, ...]:
    """Halo that makes chunked smoothing exact; scipy's radius is ``round(truncate * sigma)``."""
    return tuple(math.ceil(_TRUNCATE * (f - 1) / 2) for f in factors)


def _sample_centres(smoothed: np.ndarray, factors: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Value at each block centre; for even f, the mean of the two middle voxels.

    Indices are clamped to the last voxel, which is what a partial edge block holds.
    """
    out = smoothed
    for axis, f in enumerate(factors):
        if f == 1:
            continue
        n = out.shape[axis]
        starts = np.arange(0, n, f)
        if f % 2:
            out = out.take(np.minimum(starts + (f - 1) // 2, n - 1), axis=axis)
        else:
            left = out.take(np.minimum(starts + f // 2 - 1, n - 1), axis=axis)
            right = out.take(np.minimum(starts + f // 2, n - 1), axis=axis)
            out = (left + right) * 0.5
    return _cast(out, dtype)


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float64 back to `dtype`; integers round half up and clip to the dtype's range."""
    if dtype.kind == "f":
        return values.astype(dtype)
    info = np.iinfo(dtype)
    # The largest float64 not above the maximum, so 64-bit maxima cannot overflow the cast.
    hi = np.nextafter(np.float64(info.max), -np.inf) if info.bits == 64 else info.max
    return np.clip(np.floor(values + 0.5), info.min, hi).astype(dtype)


def _gaussian(image: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    return _sample_centres(_smooth(image, factors), factors, image.dtype)


_IMPLEMENTATIONS: dict[Method, Callable[[np.ndarray, tuple[int, ...]], np.ndarray]] = {
    Method.MEAN: functools.partial(_on_4d, _kernels.block_mean),
    Method.MODE: functools.partial(_on_4d, _kernels.block_mode),
    Method.MIN: functools.partial(_on_4d, _kernels.block_min),
    Method.MAX: functools.partial(_on_4d, _kernels.block_max),
    Method.STRIDE: _stride,
    Method.GAUSSIAN: _gaussian,
}


# --------------------------------------------------------------------------- public API


def downsample_array(
    image: np.ndarray, factors: Sequence[int], method: Method | str = "mean"
) -> np.ndarray:
    """Reduce each block of ``factors`` voxels of a whole NumPy array to one voxel.

    Parameters
    ----------
    image : ndarray, shape (..., [Z,] Y, X)
        Image with 2 to 5 dimensions (``yx`` .. ``tczyx``).
    factors : sequence of int
        Block size per axis, one integer >= 1 per axis of `image`. Only the last three axes
        may have a factor above 1; give 1 for channel and time axes.
    method : Method or str, optional
        ``"mean"`` (images), ``"mode"`` (labels: most frequent value, the smallest among ties),
        ``"min"``, ``"max"``, ``"stride"`` (``image[::f]``) or ``"gaussian"`` (smoothing with
        sigma ``(f - 1) / 2`` per axis, ``mode="nearest"``, ``truncate=4``, in float64, then
        sampled at block centres: voxel ``i*f + (f-1)//2`` for odd f, the mean of voxels
        ``i*f + f/2 - 1`` and ``i*f + f/2`` for even f, indices clamped to the last voxel).

    Returns
    -------
    ndarray, shape ``ceil(image.shape / factors)``
        The reduced image, of the dtype of `image`. A partial block at the far edge of an axis
        is reduced over the voxels it holds. Integer means and Gaussians round half up
        (``floor(x + 0.5)``); integer means of up to 32 bits are summed exactly in int64,
        int64 / uint64 means are summed in float64 (exact below 2**53). Float means sum in
        float64. ``min`` and ``max`` propagate NaN; ``mode`` of data with NaN is unspecified.

    Raises
    ------
    TypeError
        When `image` is a Dask array, its dtype is not supported by `method` (bool only for
        mode, min, max and stride; integers of 8 to 64 bits, float32, float64), a factor is
        not an integer, or `method` is not a str.
    ValueError
        When `image` is not 2D to 5D, `factors` has the wrong length, a factor is below 1 or
        above 1 on an axis before the last three, or `method` is unknown.
    """
    method = _validate_method(method)
    image = _validate_image(image, method)
    factors = _validate_factors(factors, image.ndim)
    return _IMPLEMENTATIONS[method](image, factors)


def _output_chunks(
    image: da.Array, factors: tuple[int, ...], chunks: tuple[int, ...] | None
) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """Regular output chunks, and the input chunks (``chunks * factors``) aligned with them."""
    if chunks is None:
        chunks = tuple(
            max(max(c, default=1) // f, 1) for c, f in zip(image.chunks, factors, strict=True)
        )
    out_shape = reduced_shape(image.shape, factors)
    out_chunks = da.core.normalize_chunks(chunks, out_shape)
    in_chunks = da.core.normalize_chunks(
        tuple(c * f for c, f in zip(chunks, factors, strict=True)), image.shape
    )
    return out_chunks, in_chunks


def _smooth_and_sample(
    aligned: da.Array, factors: tuple[int, ...], out_chunks: tuple, dtype: np.dtype
) -> da.Array:
    depth = _gaussian_depth(factors)
    smoothed = aligned.map_overlap(
        _smooth,
        depth=depth,
        boundary="none",
        factors=factors,
        dtype=np.float64,
        meta=np.empty((0,) * aligned.ndim, np.float64),
    )
    # map_overlap merges chunks smaller than the halo; sampling needs the aligned blocks back.
    smoothed = smoothed.rechunk(aligned.chunks)
    return smoothed.map_blocks(
        functools.partial(_sample_centres, factors=factors, dtype=dtype),
        dtype=dtype,
        chunks=out_chunks,
        meta=np.empty((0,) * aligned.ndim, dtype),
    )


def downsample(
    image: da.Array,
    factors: Sequence[int],
    method: Method | str = "mean",
    *,
    chunks: Sequence[int] | None = None,
    dtype: np.dtype | str | type | None = None,
) -> da.Array:
    """Lazily reduce each block of ``factors`` voxels of a Dask array to one voxel.

    Equals ``downsample_array(image.compute(), factors, method)`` bitwise, for any chunking of
    `image`: the input is rechunked to ``chunks * factors`` so every block starts at a multiple
    of the factor, and the Gaussian smooths with a halo of ``ceil(4 * sigma)`` voxels
    (``map_overlap``, ``boundary="none"``) before sampling the block centres.

    Parameters
    ----------
    image : dask.array.Array, shape (..., [Z,] Y, X)
        Image with 2 to 5 dimensions (``yx`` .. ``tczyx``).
    factors : sequence of int
        Block size per axis, one integer >= 1 per axis; only the last three axes may be reduced.
    method : Method or str, optional
        One of :class:`Method`; see :func:`downsample_array`.
    chunks : sequence of int, optional
        Chunk shape of the output, one integer >= 1 per axis. The result's chunks are regular
        chunks of this shape, the last one along an axis partial, so output blocks can be
        aligned with the shards of a store. None derives it from the input: the largest input
        chunk along each axis divided (floor) by the factor, at least 1.
    dtype : float dtype, optional
        For ``mean`` only: the exact means in this dtype, not rounded to an integer `image`'s
        (each block summed in float64 inside its task). None: the dtype of `image`.

    Returns
    -------
    dask.array.Array, shape ``ceil(image.shape / factors)``
        The reduced image, of the dtype of `image` (or `dtype`), chunked by `chunks`. Lazy;
        each task reads one aligned input block (plus a halo for the Gaussian).

    Raises
    ------
    TypeError
        When `image` is not a Dask array, its dtype is not supported by `method`, a factor or
        chunk size is not an integer, or `method` is not a str.
    ValueError
        When `image` is not 2D to 5D, `factors` or `chunks` has the wrong length or a value
        below 1, a factor above 1 is on an axis before the last three, or `method` is unknown.
    """
    method = _validate_method(method)
    if not isinstance(image, da.Array):
        raise TypeError(
            f"`image` must be a dask.array.Array, got {type(image).__name__}; "
            "use `downsample_array` for NumPy arrays"
        )
    _validate_ndim_dtype(image.ndim, image.dtype, method)
    factors = _validate_factors(factors, image.ndim)
    out_chunks, in_chunks = _output_chunks(image, factors, _validate_chunks(chunks, image.ndim))
    aligned = image.rechunk(in_chunks)
    if method is Method.GAUSSIAN:
        return _smooth_and_sample(aligned, factors, out_chunks, image.dtype)
    kernel, out_dtype = _IMPLEMENTATIONS[method], image.dtype
    if dtype is not None:
        out_dtype = validate_dtype(dtype, "f", "a float dtype")
        if method is not Method.MEAN:
            raise ValueError(f"`dtype` is for the mean only, got method {method.value}")
        kernel = functools.partial(_on_4d, functools.partial(_kernels.block_mean, dtype=out_dtype))
    return aligned.map_blocks(
        kernel,
        factors=factors,
        dtype=out_dtype,
        chunks=out_chunks,
        meta=np.empty((0,) * image.ndim, out_dtype),
    )


def level_transform(
    scale: Sequence[float],
    translation: Sequence[float],
    factors: Sequence[int],
    method: Method | str,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Scale and translation of the next pyramid level, from those of the current one.

    Parameters
    ----------
    scale : sequence of float
        Physical size of a voxel per axis at the current level (positive).
    translation : sequence of float
        Physical position of the centre of the first voxel per axis at the current level.
    factors : sequence of int
        Block size per axis used to make the next level (integers >= 1).
    method : Method or str
        The reduction. Block methods (mean, mode, min, max, gaussian) put a new voxel at the
        centre of its block, ``(f - 1) / 2`` old voxels in; ``stride`` keeps the block's first
        voxel, so the translation does not move.

    Returns
    -------
    scale : tuple of float
        ``scale * factors``.
    translation : tuple of float
        ``translation + (factors - 1) / 2 * scale`` (block methods) or `translation` (stride).

    Raises
    ------
    TypeError
        When a factor is not an integer, `scale` or `translation` holds non-numbers, or
        `method` is not a str.
    ValueError
        When the lengths differ, a scale is not positive, a value is not finite, a factor is
        below 1, or `method` is unknown.
    """
    method = _validate_method(method)
    scale = _validate_reals(scale, None, "scale", positive=True)
    translation = _validate_reals(translation, len(scale), "translation", positive=False)
    factors = _validate_ints(factors, len(scale), "factors", "axis")
    new_scale = tuple(s * f for s, f in zip(scale, factors, strict=True))
    if method is Method.STRIDE:
        return new_scale, translation
    shift = tuple(t + (f - 1) / 2 * s for t, s, f in zip(translation, scale, factors, strict=True))
    return new_scale, shift

"""Seam-free linear upsampling of a low-resolution field, whole or one output block at a time.

A field estimated at low resolution (a bias field, a background) lives in the same physical
space as the full-resolution image: voxel ``i`` of the full grid sits at ``x = t + i * s``.
Field voxel ``k`` sits at ``c_k = t_low + k * s_low``, except the last one, which may sit at a
position of its own, ``c_last`` (``low_last_centre``; None: on the regular grid). The field is
interpolated linearly along each axis (a tensor product) between the centres of the two field
voxels around ``x``: with the continuous field index ``u = (x - t_low) / s_low`` on the regular
grid, and ``u = n_low - 2 + (x - c_{n_low-2}) / (c_last - c_{n_low-2})`` past the last but one
centre when the last voxel is off the grid; ``u`` is clamped to ``[0, n_low - 1]`` so the edge
values carry on past the field's outermost voxel centres.

With the geometry of a pyramid level (:func:`voxflow.core.level_transform`: ``s_low = f * s``,
``t_low = t + (f - 1) / 2 * s``) a field made by block means sits exactly on the blocks it
summarises, except where the axis length ``n`` is not a multiple of ``f``: the last block holds
only ``m = n - (n_low - 1) * f`` voxels and its mean belongs at their centre,
``t + ((n_low - 1) * f + (m - 1) / 2) * s`` (see :func:`voxflow.core.scaled.last_block_centre`),
not at the centre of a whole block. Given that position, the block means of a field linear in
``x`` upsample to that field exactly between the outermost field centres, the partial last
interval included; beyond them the edge values carry on, as before the first centre.

Every output voxel is computed from its global index alone, by the same operations in the same
order, so :func:`upsample` (blockwise, lazy) equals :func:`upsample_array` (whole) bitwise for
any chunking: no seams.

An array made by :func:`upsample` carries its recipe (:func:`upsample_recipe`), so a consumer
can compute the field inside its own tasks instead of reading a block-sized temporary:
:func:`divide_upsampled` divides an image by the field and casts the quotient in one pass.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed

from voxflow.core._upsample_kernels import (
    cast_float_to_int,
    divide_upsampled_3d,
    interpolate_3d,
)
from voxflow.core._validate import validate_dtype as _validate_dtype
from voxflow.core._validate import validate_int as _validate_int

__all__ = [
    "UpsampleRecipe",
    "cast_to_dtype",
    "divide_upsampled",
    "upsample",
    "upsample_array",
    "upsample_block",
    "upsample_recipe",
    "upsample_weights",
]

_MAX_NDIM = 3

# Geometry in the order the kernels use it: full-res scale and translation, then the field's
# scale, translation and centre of its last voxel.
_Geometry = tuple[
    tuple[float, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...]
]

# Name of the attribute by which :func:`upsample` marks the arrays it returns.
_RECIPE = "_voxflow_upsample_recipe"

# Scratch of one fused division task (field rows of the block, cached): about an L2 cache.
_SCRATCH_BYTES = 2**20


@dataclass(frozen=True, eq=False)
class UpsampleRecipe:
    """How an array returned by :func:`upsample` computes its blocks.

    Attributes
    ----------
    name : str
        Name of the Dask array it describes.
    field : numpy.ndarray, shape ([Z,] [Y,] X)
        The validated field: C-contiguous, native float32 or float64.
    shared : dask.delayed.Delayed
        The field as the single graph key every task of the array reads.
    chunks : tuple of tuple of int
        The array's chunks, as Dask spells them (they give its shape).
    geometry : tuple of tuple of float
        ``scale``, ``translation``, ``low_scale``, ``low_translation`` and
        ``low_last_centre`` (resolved: on the regular grid when none was given), one value per
        axis.
    dtype : numpy.dtype
        Its dtype, native float32 or float64: what the interpolated values are rounded to.
    """

    name: str
    field: np.ndarray
    shared: Delayed
    chunks: tuple[tuple[int, ...], ...]
    geometry: _Geometry
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the array."""
        return tuple(sum(sizes) for sizes in self.chunks)


# --------------------------------------------------------------------------- validation


def _validate_real(value: object, name: str, *, positive: bool) -> float:
    """A finite real number (a positive one when `positive`) as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {value!r} ({type(value).__name__})")
    got = float(value)
    if not math.isfinite(got) or (positive and got <= 0):
        kind = "a positive, finite" if positive else "a finite"
        raise ValueError(f"`{name}` must be {kind} number, got {value!r}")
    return got


def _as_tuple(values: object, ndim: int, name: str, what: str) -> tuple:
    """`values` as a tuple of `ndim` items, one per spatial axis."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise TypeError(f"`{name}` must be a sequence of {what}s, got {type(values).__name__}")
    got = tuple(values)
    if len(got) != ndim:
        raise ValueError(f"`{name}` needs one {what} per spatial axis ({ndim}), got {got}")
    return got


def _validate_ints(values: object, ndim: int, name: str, minimum: int) -> tuple[int, ...]:
    return tuple(_validate_int(v, name, minimum) for v in _as_tuple(values, ndim, name, "integer"))


def _validate_reals(values: object, ndim: int, name: str, *, positive: bool) -> tuple[float, ...]:
    got = _as_tuple(values, ndim, name, "number")
    return tuple(_validate_real(v, name, positive=positive) for v in got)


def _validate_field(field: object) -> np.ndarray:
    """A 1D to 3D float32 / float64 NumPy array, C-contiguous."""
    if isinstance(field, da.Array):
        raise TypeError("`field` must be a NumPy array, got a Dask array; compute it first")
    if not isinstance(field, np.ndarray):
        raise TypeError(f"`field` must be a NumPy array, got {type(field).__name__}")
    if not 1 <= field.ndim <= _MAX_NDIM:
        raise ValueError(f"`field` needs 1 to {_MAX_NDIM} spatial dimensions, got {field.ndim}")
    if field.dtype.kind != "f" or field.dtype.itemsize not in (4, 8):
        raise TypeError(f"`field` must be float32 or float64, got {field.dtype}")
    if field.size == 0:
        raise ValueError(f"`field` must hold at least one voxel per axis, got {field.shape}")
    # Native byte order: the compiled kernels read only that.
    return np.ascontiguousarray(field, dtype=field.dtype.newbyteorder("="))


def _validate_geometry(
    field_shape: tuple[int, ...],
    scale: Sequence[float],
    translation: Sequence[float],
    low_scale: Sequence[float],
    low_translation: Sequence[float],
    low_last_centre: Sequence[float] | None = None,
) -> _Geometry:
    """Five tuples of one finite float per axis of the field; the scales positive."""
    ndim = len(field_shape)
    scale = _validate_reals(scale, ndim, "scale", positive=True)
    translation = _validate_reals(translation, ndim, "translation", positive=False)
    low_scale = _validate_reals(low_scale, ndim, "low_scale", positive=True)
    low_translation = _validate_reals(low_translation, ndim, "low_translation", positive=False)
    regular = zip(field_shape, low_scale, low_translation, strict=True)
    if low_last_centre is None:
        last = tuple(t + (n - 1) * s for n, s, t in regular)
    else:
        last = _validate_reals(low_last_centre, ndim, "low_last_centre", positive=False)
        for axis, ((n, s, t), c) in enumerate(zip(regular, last, strict=True)):
            _validate_last_centre(n, s, t, c, axis)
    return scale, translation, low_scale, low_translation, last


def _validate_last_centre(n_low: int, s_low: float, t_low: float, last: float, axis: int) -> None:
    """The last field voxel must lie beyond the last but one (when there is one)."""
    if n_low >= 2 and not last > t_low + (n_low - 2) * s_low:
        raise ValueError(
            f"`low_last_centre` must lie beyond the centre of the last but one field voxel "
            f"({t_low + (n_low - 2) * s_low}) on axis {axis}, got {last}"
        )


def _validate_out_dtype(dtype: object) -> np.dtype:
    got = _validate_dtype(dtype, "f", "float32 or float64")
    if got.itemsize not in (4, 8):
        raise TypeError(f"`dtype` must be float32 or float64, got {dtype!r}")
    return got.newbyteorder("=")


def _validate_block(
    origin: object, block_shape: object, ndim: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Origin and shape of a block, from integer origins or from slices."""
    items = _as_tuple(origin, ndim, "origin", "integer or slice")
    if not all(isinstance(s, slice) for s in items):
        origin = _validate_ints(items, ndim, "origin", 0)
        return origin, _validate_ints(block_shape, ndim, "block_shape", 1)
    starts, shape = [], []
    for s in items:
        if s.start is None or s.stop is None or s.step not in (None, 1):
            raise ValueError(f"`origin` slices need a start, a stop and step 1, got {s}")
        start = _validate_int(s.start, "origin", 0)
        shape.append(_validate_int(s.stop - start, "block_shape", 1))
        starts.append(start)
    if block_shape is not None and tuple(block_shape) != tuple(shape):
        raise ValueError(f"`block_shape` {tuple(block_shape)} disagrees with `origin` {items}")
    return tuple(starts), tuple(shape)


def _validate_chunks(chunks: object, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Dask chunks (an int, one int per axis or one tuple of ints per axis) normalised."""
    if isinstance(chunks, numbers.Integral) and not isinstance(chunks, bool):
        chunks = (chunks,) * len(shape)
    items = _as_tuple(chunks, len(shape), "chunks", "chunk size")
    normalised = []
    for n, item in zip(shape, items, strict=True):
        if isinstance(item, Sequence) and not isinstance(item, str | bytes):
            sizes = tuple(_validate_int(c, "chunks", 1) for c in item)
            if sum(sizes) != n:
                raise ValueError(f"`chunks` {tuple(item)} must add up to the axis length {n}")
        else:
            size = _validate_int(item, "chunks", 1)
            sizes = (size,) * (n // size) + ((n % size,) if n % size else ())
        normalised.append(sizes)
    return tuple(normalised)


# --------------------------------------------------------------------------- implementation


def _weights(
    start: int,
    n_out: int,
    s: float,
    t: float,
    n_low: int,
    s_low: float,
    t_low: float,
    last: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-axis ``(i0, i1, w)`` for output indices ``start .. start + n_out - 1``."""
    index = np.arange(start, start + n_out, dtype=np.float64)
    x = t + index * s
    u = (x - t_low) / s_low
    if n_low >= 2 and last != t_low + (n_low - 1) * s_low:
        # The last interval runs from the last but one centre to the last voxel's own centre.
        before = t_low + (n_low - 2) * s_low
        tail = x > before
        u[tail] = (n_low - 2) + (x[tail] - before) / (last - before)
    u = np.clip(u, 0.0, n_low - 1.0)
    i0 = np.floor(u).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_low - 1)
    return i0, i1, u - i0


def _pad3(array: np.ndarray) -> np.ndarray:
    """`array` with leading axes of length 1 up to three axes (a view)."""
    return array.reshape((1,) * (_MAX_NDIM - array.ndim) + array.shape)


def _block_weights(
    field: np.ndarray, origin: tuple[int, ...], shape: tuple[int, ...], geometry: _Geometry
) -> list[np.ndarray]:
    """The kernels' ``(i0, i1, w)`` for three axes, leading padded axes first."""
    pad = _MAX_NDIM - field.ndim
    args = [np.zeros(1, np.intp), np.zeros(1, np.intp), np.zeros(1, np.float64)] * pad
    for axis, (start, n) in enumerate(zip(origin, shape, strict=True)):
        s, t, s_low, t_low, last = (g[axis] for g in geometry)
        args.extend(_weights(start, n, s, t, field.shape[axis], s_low, t_low, last))
    return args


def _upsample_into(
    field: np.ndarray, origin: tuple[int, ...], out: np.ndarray, geometry: _Geometry
) -> np.ndarray:
    """Fill `out` (the block at `origin`) from a validated `field`; 1D / 2D as 3D."""
    args = _block_weights(field, origin, out.shape, geometry)
    interpolate_3d(_pad3(field), *args, _pad3(out))
    return out


def _upsample_chunk(
    field: np.ndarray, geometry: _Geometry, out_dtype: np.dtype, block_info: dict | None = None
) -> np.ndarray:
    """One block of :func:`upsample`; `block_info` tells where it lies."""
    info = block_info[None]
    origin = tuple(start for start, _ in info["array-location"])
    return _upsample_into(field, origin, np.empty(info["chunk-shape"], out_dtype), geometry)


def _cast_limits(target: np.dtype) -> tuple[float, float, np.integer, np.integer]:
    """``low, high, minimum, maximum`` of :func:`cast_float_to_int` for a native integer."""
    info = np.iinfo(target)
    native = target.type
    return float(info.min), float(info.max + 1), native(info.min), native(info.max)


def _divide_cast(work: np.dtype, native: np.dtype) -> tuple:
    """The `cast` argument of :func:`divide_upsampled_3d` for a `native` result."""
    zero = native.type(0)
    if native.kind == "f":
        return 0, 0.0, 0.0, 0.0, zero, zero, np.int64
    info = np.iinfo(native)
    if int(work.type(info.min)) == info.min and int(work.type(info.max)) == info.max:
        itype = np.int32 if native.itemsize <= 2 else np.int64
        return 1, work.type(info.min), 0.0, work.type(info.max), zero, zero, itype
    low, high, minimum, maximum = _cast_limits(native)
    return 2, low, high, 0.0, minimum, maximum, np.int64


def _divide_chunk(
    full: np.ndarray,
    field: np.ndarray,
    geometry: _Geometry,
    up: np.dtype,
    offset: float,
    target: np.dtype,
    block_info: dict | None = None,
) -> np.ndarray:
    """One block of :func:`divide_upsampled`; `block_info` tells where it lies."""
    work = np.result_type(full.dtype, np.float32)
    # The kernel reads native integers or `work` (floats and bools convert to it exactly)
    # and writes a native integer or float32 / float64; other floats are cast from `work`.
    source = full.dtype.newbyteorder("=") if full.dtype.kind in "iu" else work
    values = np.ascontiguousarray(full, dtype=source)
    native = target.newbyteorder("=") if target.kind in "iu" or target.itemsize in (4, 8) else work
    out = np.empty(full.shape, native)
    origin = tuple(start for start, _ in block_info[None]["array-location"])
    args = _block_weights(field, origin, full.shape, geometry)
    max_rows = max(2, _SCRATCH_BYTES // (40 * out.shape[-1]))  # 5 float64 per field row item
    divide_upsampled_3d(
        _pad3(values), _pad3(field), *args, up.type, work.type, work.type(offset), offset != 0,
        _divide_cast(work, native), max_rows, _pad3(out),
    )  # fmt: skip
    return out if out.dtype == target else out.astype(target)


# --------------------------------------------------------------------------- public API


def upsample_weights(
    n_out: int,
    scale: float,
    translation: float,
    n_low: int,
    low_scale: float,
    low_translation: float,
    start: int = 0,
    *,
    low_last_centre: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights of linear interpolation along one axis.

    Output voxel ``i`` sits at ``x = translation + i * scale``; its field index
    ``u = (x - low_translation) / low_scale`` is clamped to ``[0, n_low - 1]`` and interpolated
    between ``i0 = floor(u)`` and ``i1 = min(i0 + 1, n_low - 1)`` with weight ``w = u - i0``
    on ``i1``. When the last field voxel sits at ``c = low_last_centre``, off the regular grid,
    ``u = n_low - 2 + (x - b) / (c - b)`` for ``x`` past the centre of the last but one,
    ``b = low_translation + (n_low - 2) * low_scale``: the last interval ends at ``c``. All in
    float64.

    Parameters
    ----------
    n_out : int
        Number of output voxels (>= 1).
    scale : float
        Physical size of an output voxel (positive).
    translation : float
        Physical position of the centre of output voxel 0.
    n_low : int
        Length of the field along this axis (>= 1).
    low_scale : float
        Physical size of a field voxel (positive).
    low_translation : float
        Physical position of the centre of field voxel 0.
    start : int, optional
        Global index of the first output voxel (>= 0), for a block that starts inside the axis.
    low_last_centre : float, optional
        Physical position of the centre of the last field voxel, beyond that of the last but
        one; None: ``low_translation + (n_low - 1) * low_scale``. A block mean whose last block
        is partial has its last voxel before that (see
        :func:`voxflow.core.scaled.last_block_centre`). No effect when ``n_low`` is 1.

    Returns
    -------
    i0, i1 : ndarray of intp, shape (n_out,)
        Field indices left and right of each output voxel, non-decreasing.
    w : ndarray of float64, shape (n_out,)
        Weight of ``i1``, in ``[0, 1)``; ``i0`` gets ``1 - w``.

    Raises
    ------
    TypeError
        When a count or `start` is not an integer, or a scale or translation is not a number.
    ValueError
        When a count is below 1, `start` is negative, a scale is not positive and finite, or
        `low_last_centre` is not finite or not beyond the last but one field voxel.
    """
    n_out = _validate_int(n_out, "n_out", 1)
    n_low = _validate_int(n_low, "n_low", 1)
    start = _validate_int(start, "start", 0)
    s, t, s_low, t_low, last = _validate_geometry(
        (n_low,), (scale,), (translation,), (low_scale,), (low_translation,),
        None if low_last_centre is None else (low_last_centre,),
    )  # fmt: skip
    return _weights(start, n_out, s[0], t[0], n_low, s_low[0], t_low[0], last[0])


def upsample_array(
    field: np.ndarray,
    shape: Sequence[int],
    *,
    scale: Sequence[float],
    translation: Sequence[float],
    low_scale: Sequence[float],
    low_translation: Sequence[float],
    low_last_centre: Sequence[float] | None = None,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Upsample a whole low-resolution field linearly onto a full-resolution grid.

    The reference for :func:`upsample` and :func:`upsample_block`; fine for small images.

    Parameters
    ----------
    field : ndarray, shape ([Z,] [Y,] X)
        The low-resolution field, float32 or float64, 1 to 3 spatial axes (loop over channels).
        Non-finite values propagate to the output voxels that depend on them.
    shape : sequence of int
        Shape of the full-resolution grid, one integer >= 1 per axis of `field`.
    scale, translation : sequence of float
        Voxel size and centre of voxel 0 of the full-resolution grid, per axis.
    low_scale, low_translation : sequence of float
        Voxel size and centre of voxel 0 of `field`, per axis, in the same physical space.
    low_last_centre : sequence of float, optional
        Centre of the last voxel of `field` per axis, beyond that of the last but one; None:
        on the regular grid, ``low_translation + (field.shape - 1) * low_scale``. The last
        interval of the interpolation ends there (see :func:`upsample_weights`): give the
        centre of the voxels a block mean's partial last block summarises
        (:func:`voxflow.core.scaled.last_block_centre`) so a linear field stays exact.
    dtype : dtype, optional
        Output dtype, float32 (default) or float64. Arithmetic is in float64 either way.

    Returns
    -------
    ndarray, shape `shape`
        The field interpolated at every full-resolution voxel, clamped at the field's edges.

    Raises
    ------
    TypeError
        When `field` is not a float32 / float64 NumPy array, `dtype` is not float32 / float64,
        or a shape or geometry value has the wrong type.
    ValueError
        When `field` is not 1D to 3D, a length differs from ``field.ndim``, a shape value is
        below 1, a scale is not positive, a value is not finite, or a last centre is not
        beyond the last but one field voxel.
    """
    field = _validate_field(field)
    shape = _validate_ints(shape, field.ndim, "shape", 1)
    geometry = _validate_geometry(
        field.shape, scale, translation, low_scale, low_translation, low_last_centre
    )
    out = np.empty(shape, _validate_out_dtype(dtype))
    return _upsample_into(field, (0,) * field.ndim, out, geometry)


def upsample_block(
    field: np.ndarray,
    origin: Sequence[int] | Sequence[slice],
    block_shape: Sequence[int] | None = None,
    *,
    scale: Sequence[float],
    translation: Sequence[float],
    low_scale: Sequence[float],
    low_translation: Sequence[float],
    low_last_centre: Sequence[float] | None = None,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """One block of the upsampled field, computed from the low-resolution field only.

    Equals ``upsample_array(field, shape, ...)[block]`` bitwise, for any block of any grid.

    Parameters
    ----------
    field : ndarray, shape ([Z,] [Y,] X)
        The low-resolution field, float32 or float64; see :func:`upsample_array`.
    origin : sequence of int or sequence of slice
        Global index of the block's first voxel per axis (>= 0), or the block as one slice
        per axis (``slice(start, stop)``, both given, step 1), as in Dask's ``block_info``.
    block_shape : sequence of int, optional
        Shape of the block, one integer >= 1 per axis. Required with integer origins; None
        with slices derives it from them.
    scale, translation, low_scale, low_translation : sequence of float
        Geometry of the full-resolution grid and of `field`; see :func:`upsample_array`.
    low_last_centre : sequence of float, optional
        Centre of the last voxel of `field` per axis; see :func:`upsample_array`.
    dtype : dtype, optional
        Output dtype, float32 (default) or float64.

    Returns
    -------
    ndarray, shape `block_shape`
        The upsampled field over the block.

    Raises
    ------
    TypeError
        As :func:`upsample_array`, and when `origin` or `block_shape` holds non-integers.
    ValueError
        As :func:`upsample_array`, and when an origin is negative, a slice has no start or
        stop or a step other than 1, or `block_shape` disagrees with slices in `origin`.
    """
    field = _validate_field(field)
    origin, block_shape = _validate_block(origin, block_shape, field.ndim)
    geometry = _validate_geometry(
        field.shape, scale, translation, low_scale, low_translation, low_last_centre
    )
    out = np.empty(block_shape, _validate_out_dtype(dtype))
    return _upsample_into(field, origin, out, geometry)


def upsample(
    field: np.ndarray,
    shape: Sequence[int],
    chunks: int | Sequence[int] | Sequence[Sequence[int]],
    *,
    scale: Sequence[float],
    translation: Sequence[float],
    low_scale: Sequence[float],
    low_translation: Sequence[float],
    low_last_centre: Sequence[float] | None = None,
    dtype: np.dtype | type = np.float32,
) -> da.Array:
    """Lazily upsample a low-resolution field onto a chunked full-resolution grid.

    One task per output block, each computed from the field alone, which sits once in the
    graph (a single key every task depends on); there is no full-resolution temporary. The
    result equals :func:`upsample_array` bitwise for every chunking.

    Parameters
    ----------
    field : ndarray, shape ([Z,] [Y,] X)
        The low-resolution field, float32 or float64; see :func:`upsample_array`.
    shape : sequence of int
        Shape of the full-resolution grid, one integer >= 1 per axis of `field`.
    chunks : int, sequence of int, or sequence of sequence of int
        Chunks of the result, as Dask spells them: one size for all axes, one size per axis
        (the last chunk along an axis partial), or the explicit sizes along each axis.
    scale, translation, low_scale, low_translation : sequence of float
        Geometry of the full-resolution grid and of `field`; see :func:`upsample_array`.
    low_last_centre : sequence of float, optional
        Centre of the last voxel of `field` per axis; see :func:`upsample_array`.
    dtype : dtype, optional
        Output dtype, float32 (default) or float64.

    Returns
    -------
    dask.array.Array, shape `shape`
        The upsampled field, chunked by `chunks`.

    Raises
    ------
    TypeError
        As :func:`upsample_array`, and when `chunks` holds non-integers.
    ValueError
        As :func:`upsample_array`, and when `chunks` has the wrong length, a size below 1,
        or explicit sizes that do not add up to the axis length.
    """
    field = _validate_field(field)
    shape = _validate_ints(shape, field.ndim, "shape", 1)
    chunks = _validate_chunks(chunks, shape)
    geometry = _validate_geometry(
        field.shape, scale, translation, low_scale, low_translation, low_last_centre
    )
    dtype = _validate_out_dtype(dtype)
    # A delayed argument is one graph key shared by all tasks, not a copy inside each task.
    shared = dask.delayed(field, pure=True)
    out = da.map_blocks(
        _upsample_chunk,
        shared,
        geometry=geometry,
        out_dtype=dtype,
        dtype=dtype,
        chunks=chunks,
        meta=np.empty((0,) * field.ndim, dtype),
        name="upsample-" + dask.base.tokenize(shared, shape, chunks, geometry, dtype),
    )
    recipe = UpsampleRecipe(out.name, field, shared, out.chunks, geometry, dtype)
    setattr(out, _RECIPE, recipe)
    return out


def upsample_recipe(array: object) -> UpsampleRecipe | None:
    """The recipe of an array returned by :func:`upsample`, None for any other object.

    An array derived from one (rechunked, sliced, in arithmetic, assigned into) is another
    array, with another name: it has no recipe.

    Parameters
    ----------
    array : object
        Usually a Dask array.

    Returns
    -------
    UpsampleRecipe or None
        How `array` computes its blocks, when :func:`upsample` made it as it is.
    """
    recipe = getattr(array, _RECIPE, None) if isinstance(array, da.Array) else None
    if (
        not isinstance(recipe, UpsampleRecipe)
        or recipe.name != array.name
        or recipe.chunks != array.chunks
    ):
        return None
    return recipe


def cast_to_dtype(values: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """Cast an array to `dtype`, rounding and saturating when the target is an integer.

    Float to integer: round half to even (``np.rint``), clip to the target's range, NaN to 0;
    i.e. ``np.clip(np.rint(values), info.min, info.max).astype(dtype)`` evaluated in float64,
    with NaN mapped to 0. Integer to integer: clip to the target's range, exactly. To a
    float: ``values.astype(dtype)``.

    Parameters
    ----------
    values : ndarray
        Array of any shape, of a float, integer or bool dtype.
    dtype : dtype
        Target: a signed or unsigned integer of 8 to 64 bits, or a float.

    Returns
    -------
    ndarray
        A new C-contiguous array of `dtype`, of the shape of `values`.

    Raises
    ------
    TypeError
        When `values` is not a NumPy array of a float, integer or bool dtype, or `dtype` is
        neither an integer nor a float dtype.
    """
    if not isinstance(values, np.ndarray) or values.dtype.kind not in "fiub":
        got = values.dtype if isinstance(values, np.ndarray) else type(values).__name__
        raise TypeError(f"`values` must be a NumPy array of floats or integers, got {got}")
    target = _validate_dtype(dtype, "fiu", "an integer or float dtype")
    if target.kind == "f" or values.dtype.kind == "b":
        return np.ascontiguousarray(values.astype(target))
    info = np.iinfo(target)
    if values.dtype.kind in "iu":
        source = np.iinfo(values.dtype)
        # Bounds inside both ranges, so the clip itself cannot overflow.
        low, high = max(info.min, source.min), min(info.max, source.max)
        return np.ascontiguousarray(np.clip(values, low, high).astype(target))
    # The compiled kernel reads native float32 / float64 and writes a native integer.
    work = np.float32 if values.dtype.itemsize <= 4 else np.float64
    flat = np.ascontiguousarray(values, dtype=work).reshape(-1)
    out = np.empty(values.shape, target.newbyteorder("="))
    cast_float_to_int(flat, out.reshape(-1), *_cast_limits(out.dtype))
    return out if out.dtype == target else out.astype(target)


def divide_upsampled(
    full: da.Array,
    recipe: UpsampleRecipe,
    offset: float = 0.0,
    *,
    dtype: np.dtype | str | type | None = None,
) -> da.Array:
    """Lazily divide an image by an upsampled field and cast the quotient, in one pass.

    With ``up`` the array `recipe` describes (see :func:`upsample_recipe`) and ``t =
    np.result_type(full.dtype, np.float32)`` (float32 for inputs of up to 16 bits, float64
    for wider ones), the result equals, bit for bit, ::

        q = (full.astype(t) - t.type(offset)) / up.astype(t) + t.type(offset)
        cast_to_dtype(q, dtype)

    with ``q = full.astype(t) / up.astype(t)`` for an offset of 0. Each task computes the
    field over its block from the low-resolution field (one graph key shared by all tasks)
    and walks the block once: there is no block-sized temporary beyond the result (and a
    converted copy for bools, float16, a foreign byte order, or a float16 or foreign result).

    Parameters
    ----------
    full : dask.array.Array, shape ``recipe.shape``
        The image, with the chunks of ``recipe``; integers, floats or bools.
    recipe : UpsampleRecipe
        The upsampled field, from :func:`upsample_recipe`.
    offset : float, optional
        Dark level subtracted before and added back after the division.
    dtype : dtype, optional
        Output dtype: an integer (rounded half to even, saturated, NaN to 0, as
        :func:`cast_to_dtype`) or a float. None: ``t``.

    Returns
    -------
    dask.array.Array
        The result, with the chunks of `full`.

    Raises
    ------
    TypeError
        When `full` is not a Dask array of numbers, `recipe` not an :class:`UpsampleRecipe`,
        `offset` not a real number, or `dtype` neither an integer nor a float dtype.
    ValueError
        When `full` differs from the recipe in shape or chunks, or `offset` is not finite.
    """
    if not isinstance(full, da.Array) or full.dtype.kind not in "biuf":
        got = full.dtype if isinstance(full, da.Array) else type(full).__name__
        raise TypeError(f"`full` must be a Dask array of numbers, got {got}")
    if not isinstance(recipe, UpsampleRecipe):
        raise TypeError(f"`recipe` must be an UpsampleRecipe, got {type(recipe).__name__}")
    if full.chunks != recipe.chunks:
        raise ValueError(
            f"`full` must have the shape {recipe.shape} and the chunks {recipe.chunks} of the "
            f"upsampled field, got {full.shape} and {full.chunks}"
        )
    offset = _validate_real(offset, "offset", positive=False)
    work = np.result_type(full.dtype, np.float32)
    target = work if dtype is None else _validate_dtype(dtype, "fiu", "an integer or float dtype")
    name = "divide-upsampled-" + dask.base.tokenize(
        full, recipe.shared, recipe.geometry, recipe.dtype, offset, target
    )
    return da.map_blocks(
        _divide_chunk, full, recipe.shared, recipe.geometry, recipe.dtype, offset, target,
        dtype=target, meta=np.empty((0,) * full.ndim, target), name=name,
    )  # fmt: skip

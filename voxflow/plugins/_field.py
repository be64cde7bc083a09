"""What the built-in plugins share: parameter checks, foreground masks, offsets, normalisation."""

from __future__ import annotations

import concurrent.futures
import math
import numbers
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numba
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from voxflow.core._validate import validate_dtype
from voxflow.core.threshold import uniform_bin_counts
from voxflow.core.upsample import cast_to_dtype, divide_upsampled, upsample_recipe

__all__ = [
    "FIELD_FLOOR",
    "OFFSET_PERCENTILE",
    "divide_field",
    "estimate_offset",
    "fill_holes",
    "foreground_mask",
    "normalise_field",
    "offset_and_mask",
    "otsu_threshold",
    "require_estimate",
    "validate_bool",
    "validate_choice",
    "validate_fullres",
    "validate_lowres",
    "validate_mask",
    "validate_offset",
    "validate_real",
]

FIELD_FLOOR = 1e-3
"""Smallest value of a multiplicative field normalised to mean 1: guards the division."""

OFFSET_PERCENTILE = 0.5
"""Percentile of the low-resolution image taken as the dark level when ``offset`` is None."""

_MASKS = ("otsu", "all")


# --------------------------------------------------------------------------- parameters


def validate_real(
    value: Any, name: str, *, low: float = -math.inf, high: float = math.inf, open_low=False
) -> float:
    """A finite real number (not a bool) in ``[low, high]`` (``(low, high]`` if `open_low`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    too_low = value <= low if open_low else value < low
    if not math.isfinite(value) or too_low or value > high:
        bracket = "(" if open_low else "["
        raise ValueError(f"`{name}` must be finite and in {bracket}{low}, {high}], got {value}")
    return value


def validate_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """One of `choices`."""
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a str, got {value!r} ({type(value).__name__})")
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {valid}; got {value!r}")
    return value


def validate_bool(value: Any, name: str) -> bool:
    """A bool (NumPy's included)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"`{name}` must be a bool, got {value!r} ({type(value).__name__})")
    return bool(value)


def validate_offset(offset: Any) -> float | None:
    """None (estimate from the data) or a finite number."""
    return None if offset is None else validate_real(offset, "offset")


def validate_mask(mask: Any) -> str | float | np.ndarray:
    """``"otsu"``, ``"all"``, a finite threshold, or a boolean array."""
    if isinstance(mask, str):
        return validate_choice(mask, "mask", _MASKS)
    if isinstance(mask, np.ndarray):
        if mask.dtype != bool:
            raise TypeError(f"`mask` as an array must be boolean, got dtype {mask.dtype}")
        if not mask.any():
            raise ValueError("`mask` as an array must select at least one voxel, got none")
        return mask
    if isinstance(mask, numbers.Real) and not isinstance(mask, bool):
        return validate_real(mask, "mask")
    raise TypeError(
        f"`mask` must be 'otsu', 'all', a threshold or a boolean array, got {mask!r} "
        f"({type(mask).__name__})"
    )


def validate_lowres(
    lowres_array: Any, dtype: np.dtype | type = np.float64, *, copy: bool = True
) -> np.ndarray:
    """The low-resolution array as `dtype` (float64 or float32): 2D or 3D, finite, not empty.

    A copy of its own, unless `copy` is false and the array already has `dtype` (then the
    array itself, which the caller must not modify).
    """
    if not isinstance(lowres_array, np.ndarray):
        raise TypeError(f"`lowres_array` must be a NumPy array, got {type(lowres_array).__name__}")
    if lowres_array.ndim not in (2, 3):
        raise ValueError(
            f"`lowres_array` must be 2D (y, x) or 3D (z, y, x), got shape {lowres_array.shape}"
        )
    if lowres_array.size == 0:
        raise ValueError(f"`lowres_array` must not be empty, got shape {lowres_array.shape}")
    if lowres_array.dtype.kind not in "biuf":
        raise TypeError(f"`lowres_array` must be numeric, got dtype {lowres_array.dtype}")
    values = lowres_array.astype(dtype, copy=copy)
    if not np.isfinite(values).all():
        raise ValueError("`lowres_array` must be finite, got NaN or infinite values")
    return values


def validate_fullres(fullres_array: Any, upsampled_output: Any) -> None:
    """Both full-resolution inputs are Dask arrays of one shape."""
    for name, value in (("fullres_array", fullres_array), ("upsampled_output", upsampled_output)):
        if not isinstance(value, da.Array):
            raise TypeError(f"`{name}` must be a Dask array, got {type(value).__name__}")
    if fullres_array.shape != upsampled_output.shape:
        raise ValueError(
            "`upsampled_output` must have the shape of `fullres_array` "
            f"{fullres_array.shape}, got {upsampled_output.shape}"
        )


def require_estimate(value: Any, plugin: str, what: str) -> Any:
    """`value`, or a clear error when ``lowres_func`` has not run to set it."""
    if value is None:
        raise RuntimeError(
            f"plugin {plugin!r}: highres_func needs the {what} estimated by lowres_func; "
            "call lowres_func on this plugin first"
        )
    return value


# --------------------------------------------------------------------------- estimation


def foreground_mask(image: np.ndarray, mask: str | float | np.ndarray) -> np.ndarray:
    """The voxels a field is estimated from and normalised over.

    Parameters
    ----------
    image : ndarray
        The low-resolution image.
    mask : {"otsu", "all"}, float or ndarray of bool
        ``"otsu"``: above the Otsu threshold of `image`, holes filled (every voxel when the
        image is constant); ``"all"``: every voxel; a number: voxels above it; an array: as
        given, of the shape of `image`.

    Returns
    -------
    ndarray of bool
        The mask, shape of `image`.

    Raises
    ------
    ValueError
        When an array mask has the wrong shape, or a threshold selects no voxel.
    """
    if isinstance(mask, np.ndarray):
        if mask.shape != image.shape:
            raise ValueError(
                f"`mask` must have the shape of the low-resolution array {image.shape}, "
                f"got {mask.shape}"
            )
        return mask
    if isinstance(mask, str):
        if mask == "all" or image.min() == image.max():
            return np.ones(image.shape, dtype=bool)
        # Holes are dark tissue (ventricles, vessels); the field must still be estimated there.
        return fill_holes(image > otsu_threshold(image))
    chosen = image > mask
    if not chosen.any():
        raise ValueError(
            f"`mask` threshold {mask} selects no voxel: the low-resolution image lies in "
            f"[{image.min():.6g}, {image.max():.6g}]"
        )
    return chosen


def otsu_threshold(image: np.ndarray) -> float:
    """``skimage.filters.threshold_otsu(image)``, its histogram made in one compiled pass.

    For a floating-point image with finite values, the 256 bins are those of
    :func:`numpy.histogram` (:func:`voxflow.core.threshold.uniform_bin_counts`), handed to
    scikit-image with its bin centres, so the threshold is the same to the bit; NumPy's
    own pass takes several times longer on a large low-resolution image. Other images go
    to scikit-image as they are.
    """
    if image.dtype not in (np.float32, np.float64) or image.size == 0:
        return threshold_otsu(image)
    low, high = image.min(), image.max()
    if not (np.isfinite(low) and np.isfinite(high)) or low == high:
        return threshold_otsu(image)
    counts, edges = uniform_bin_counts(image, low, high, _OTSU_BINS)
    return threshold_otsu(hist=(counts, (edges[:-1] + edges[1:]) / 2.0))


_OTSU_BINS = 256  # scikit-image's default for floating-point images


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes(mask)``: the background not reached from the border joins.

    A background voxel (face connectivity, as ``binary_fill_holes`` propagates) is outside
    when a path of background voxels joins it to the array's border; the rest are holes.
    For 2D and 3D masks one compiled flood fill along rows of voxels finds the outside in a
    pass or two over the mask, several times faster than labelling the background (and
    far faster than the dilation ``binary_fill_holes`` iterates until nothing changes);
    other masks are labelled.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim not in (2, 3) or mask.size == 0:
        labels, count = ndimage.label(~mask)
        outside = np.zeros(count + 1, dtype=bool)
        for axis in range(mask.ndim):
            for end in (0, -1):
                outside[np.take(labels, end, axis=axis)] = True
        outside[0] = False  # label 0: the mask itself
        return ~outside[labels]
    volume = np.ascontiguousarray(mask).reshape((-1,) * (3 - mask.ndim) + mask.shape)
    state = volume.copy()  # True on the mask, and soon on the outside
    _fill_outside(state, mask.ndim == 3)
    # The outside is what the fill set: the rest (mask and holes) is the filled mask.
    np.logical_not(state, out=state)
    np.logical_or(state, volume, out=state)
    return state.reshape(mask.shape)


@numba.njit(nogil=True, cache=True)
def _fill_outside(state, faces_z):  # pragma: no cover - compiled
    """Set, in `state` (True on the mask), every background voxel joined to the border.

    The border is the first and last row and column of every plane, and with `faces_z`
    the first and last plane too (a 2D mask is one plane whose faces are not border). A
    scanline fill: a popped seed sets its whole run of background along x, then pushes one
    seed per run of unset background beside that run in the four neighbouring rows.
    """
    nz, ny, nx = state.shape
    stack = np.empty((4096, 3), np.int64)
    for plane in range(nz):
        whole = faces_z and (plane == 0 or plane == nz - 1)
        for row in range(ny):
            edge = whole or row == 0 or row == ny - 1
            for col in range(nx):
                if state[plane, row, col] or not (edge or col == 0 or col == nx - 1):
                    continue
                stack[0, 0], stack[0, 1], stack[0, 2] = plane, row, col
                top = 1
                while top > 0:
                    top -= 1
                    z, y, x = stack[top, 0], stack[top, 1], stack[top, 2]
                    if state[z, y, x]:
                        continue
                    x0 = x
                    while x0 > 0 and not state[z, y, x0 - 1]:
                        x0 -= 1
                    x1 = x
                    while x1 < nx - 1 and not state[z, y, x1 + 1]:
                        x1 += 1
                    state[z, y, x0 : x1 + 1] = True
                    for dz, dy in ((0, -1), (0, 1), (-1, 0), (1, 0)):
                        zz, yy = z + dz, y + dy
                        if yy < 0 or yy >= ny or zz < 0 or zz >= nz:
                            continue
                        x = x0
                        while x <= x1:
                            if state[zz, yy, x]:
                                x += 1
                                continue
                            if top == stack.shape[0]:
                                grown = np.empty((2 * top, 3), np.int64)
                                grown[:top] = stack
                                stack = grown
                            stack[top, 0], stack[top, 1], stack[top, 2] = zz, yy, x
                            top += 1
                            while x <= x1 and not state[zz, yy, x]:
                                x += 1


def estimate_offset(image: np.ndarray, offset: float | None) -> float:
    """`offset`, or when None the `OFFSET_PERCENTILE` percentile of `image` (the dark level)."""
    if offset is not None:
        return offset
    return float(np.percentile(image, OFFSET_PERCENTILE))


def offset_and_mask(
    image: np.ndarray, offset: float | None, mask: str | float | np.ndarray
) -> tuple[float, np.ndarray]:
    """:func:`estimate_offset` and :func:`foreground_mask` of `image`, side by side.

    The percentile (a selection in NumPy) runs on a second thread while the mask is made:
    both release the GIL, and each is a pass over the whole low-resolution image.
    """
    if offset is not None:
        return offset, foreground_mask(image, mask)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        level = pool.submit(estimate_offset, image, offset)
        chosen = foreground_mask(image, mask)
        return level.result(), chosen


def normalise_field(field: np.ndarray, mask: np.ndarray, plugin: str) -> np.ndarray:
    """`field` divided by its mean over `mask`, floored at `FIELD_FLOOR`, as float32.

    A float32 `field` is normalised in place (and returned); any other makes a new array.
    The mean is taken in float64.

    Raises
    ------
    ValueError
        When the field's mean over the mask is not positive: nothing lies above the offset.
    """
    mean = float(np.mean(field, where=mask, dtype=np.float64))
    if not math.isfinite(mean) or mean <= 0:
        raise ValueError(
            f"plugin {plugin!r}: the estimated field has no positive mean over the foreground "
            f"({mean:.6g}); is the image above its `offset`?"
        )
    # Straight into float32, without a float64 temporary of the field's size.
    out = field if field.dtype == np.float32 else np.empty(field.shape, np.float32)
    np.divide(field, mean, out=out, casting="same_kind")
    return np.maximum(out, np.float32(FIELD_FLOOR), out=out)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _divide32(full, field, offset, out):  # pragma: no cover - compiled
    """``out = (float32(full) - offset) / field + offset``, every step in float32.

    The same IEEE operations, in the same order, as the NumPy expression (a zero field gives
    inf or NaN, as in NumPy), in one pass instead of four.
    """
    for i in range(out.size):
        out[i] = (numba.float32(full[i]) - offset) / field[i] + offset


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _divide64(full, field, offset, out):  # pragma: no cover - compiled
    """``out = (float64(full) - offset) / field + offset``, every step in float64."""
    for i in range(out.size):
        out[i] = (numba.float64(full[i]) - offset) / field[i] + offset


def _divide_block(full: np.ndarray, field: np.ndarray, offset: float, dtype: np.dtype):
    values = np.ascontiguousarray(full).reshape(-1)
    scale = np.ascontiguousarray(field, dtype=dtype).reshape(-1)
    if offset == 0:  # plain division, as NumPy does it (a -0.0 stays -0.0)
        return np.divide(values.astype(dtype, copy=False), scale).reshape(full.shape)
    out = np.empty(full.shape, dtype)
    kernel = _divide32 if dtype == np.float32 else _divide64
    kernel(values, scale, dtype.type(offset), out.reshape(-1))
    return out


def divide_field(
    full: da.Array, field: da.Array, offset: float, dtype: np.dtype | str | type | None = None
) -> da.Array:
    """``offset + (full - offset) / field``, in float32 for inputs of up to 16 bits.

    Bit for bit equal to the NumPy expression ``(full.astype(t) - t(offset)) /
    field.astype(t) + t(offset)`` (``full.astype(t) / field.astype(t)`` for an offset of 0),
    with ``t = np.result_type(full.dtype, np.float32)``, then cast to `dtype` as
    :func:`voxflow.core.cast_to_dtype` casts (rounded half to even, saturated, NaN to 0).

    When `field` is an array returned by :func:`voxflow.core.upsample` as it is, with the
    chunks of `full`, each block is upsampled, divided and cast in one compiled pass, without
    block-sized temporaries (:func:`voxflow.core.upsample.divide_upsampled`); otherwise the
    division is one compiled pass per block over the two arrays, then the cast another.

    Parameters
    ----------
    full : dask.array.Array
        The image.
    field : dask.array.Array
        The field, of the shape of `full` (rechunked to its chunks when they differ).
    offset : float
        Dark level subtracted before and added back after the division.
    dtype : dtype, optional
        Output dtype, an integer or a float; None: ``t``.

    Returns
    -------
    dask.array.Array
        The result, with the chunks of `full`.

    Raises
    ------
    TypeError
        When `dtype` is neither None, an integer nor a float dtype.
    """
    target = (
        None if dtype is None else validate_dtype(dtype, "iuf", "None, an integer or a float dtype")
    )
    offset = float(offset)
    recipe = upsample_recipe(field)
    if (
        recipe is not None
        and recipe.chunks == full.chunks
        and full.dtype.kind in "biuf"
        and math.isfinite(offset)
    ):
        return divide_upsampled(full, recipe, offset, dtype=target)
    work = np.result_type(full.dtype, np.float32)
    if field.chunks != full.chunks:
        field = field.rechunk(full.chunks)
    out = da.map_blocks(
        _divide_block, full, field, offset, work, dtype=work,
        meta=np.empty((0,) * full.ndim, work),
    )  # fmt: skip
    if target is None or target == work:
        return out
    return out.map_blocks(
        cast_to_dtype, target, dtype=target, meta=np.empty((0,) * full.ndim, target)
    )

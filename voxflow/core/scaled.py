"""Multi-resolution processing: estimate a smooth field at low resolution, apply it blockwise.

A plugin's ``lowres_func`` sees a small, low-resolution copy of each channel (its block means,
computed in floating point whatever the image's dtype: :func:`lowres_block_mean`) and returns a
smooth field of the same shape (a bias field, a background, ...). The field is upsampled to full
resolution one output block at a time (:func:`voxflow.core.upsample.upsample`), so no
full-resolution temporary exists, each field voxel at the centre of the full-resolution voxels
it summarises (:func:`lowres_geometry`, :func:`last_block_centre`); the plugin's
``highres_func`` combines it with the full-resolution voxels, lazily and blockwise.

The plugin is any object with the four hooks of the ``voxflow.plugins`` specification; this
module calls ``lowres_func`` and ``highres_func`` on a per-channel copy of it that carries a
:class:`ScaleContext` in its ``context`` attribute.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import numbers
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, Literal

import dask.array as da
import numpy as np

from voxflow.core.axes import spatial_mask, validate_dims
from voxflow.core.pyramid import Method, downsample, level_transform
from voxflow.core.upsample import cast_to_dtype, upsample

__all__ = [
    "PluginHookError",
    "ScaleContext",
    "ScaledResult",
    "apply_field",
    "apply_scaled_processing",
    "check_lowres_budget",
    "estimate_field",
    "last_block_centre",
    "lowres_block_mean",
    "lowres_geometry",
    "validate_channels",
    "validate_downsample_factor",
]

DtypePolicy = Literal["keep", "float32"]


class PluginHookError(ValueError):
    """A plugin hook failed or broke its contract (wrong shape, non-finite values, ...)."""


@dataclasses.dataclass(frozen=True)
class ScaleContext:
    """What a scaled-processing plugin knows about the arrays its hooks receive.

    Attributes
    ----------
    dims : tuple of str
        Names of the spatial axes of the arrays given to the hooks, e.g. ``("z", "y", "x")``.
    spacing : tuple of float
        Physical voxel size of the low-resolution array per spatial axis (units in `units`).
    fullres_spacing : tuple of float
        Physical voxel size of the full-resolution array per spatial axis.
    factors : tuple of int
        Full-resolution voxels per low-resolution voxel along each spatial axis.
    units : tuple of str or None
        Unit of each spatial axis (``"micrometer"`` for most microscopy), None when unknown.
    channel : int or None
        Index of the channel being processed, None for an image without a channel axis.
    dtype : str or None
        The dtype the result of ``highres_func`` will be cast to by :func:`apply_field` (its
        NumPy name, e.g. ``"uint16"``; ``">u2"`` style for a foreign byte order), None when
        the result keeps the dtype ``highres_func`` returns. A plugin may return that dtype
        directly, rounding half to even and saturating as :func:`voxflow.core.cast_to_dtype`
        does (NaN to 0), to save a pass over the image; a result of any other dtype is cast.
    last_position : tuple of float
        Where the centre of the last low-resolution voxel lies along each spatial axis, in
        low-resolution voxels from the centre of the first: ``n - 1`` on the regular grid,
        up to half a voxel less where the last block of a block mean was partial (its mean
        sits at the centre of the voxels it has, :func:`last_block_centre`). Empty when not
        known: the regular grid. A plugin that fits coordinates uses it to place that voxel.
    """

    dims: tuple[str, ...]
    spacing: tuple[float, ...]
    fullres_spacing: tuple[float, ...]
    factors: tuple[int, ...]
    units: tuple[str | None, ...] = ()
    channel: int | None = None
    dtype: str | None = None
    last_position: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class ScaledResult:
    """What :func:`apply_scaled_processing` returns.

    Attributes
    ----------
    image : dask.array.Array
        The processed image, same shape as the input restricted to the selected channels; lazy.
    field : numpy.ndarray of float32
        The low-resolution fields, one per selected channel, stacked like the image's
        non-spatial axes (shape: non-spatial shape + low-resolution spatial shape).
    field_scale, field_translation : tuple of float
        Physical geometry of `field` per axis of the image (non-spatial axes: 1 and 0), on
        the regular grid of a pyramid level.
    field_last_centre : tuple of float
        Physical centre of the last voxel of `field` per axis of the image: where the
        upsampling puts it, before the regular grid where the last block is partial (see
        :func:`last_block_centre`).
    plugins : list
        The per-channel plugin copies that made the fields (their state and context).
    """

    image: da.Array
    field: np.ndarray
    field_scale: tuple[float, ...]
    field_translation: tuple[float, ...]
    field_last_centre: tuple[float, ...]
    plugins: list[Any]


# --------------------------------------------------------------------------- validation


def _plugin_name(plugin: Any) -> str:
    try:
        return str(plugin.scaled_processing_plugin_name())
    except Exception:  # a broken name hook must not hide the real error
        return type(plugin).__name__


def validate_downsample_factor(
    factor: int | Sequence[int], shape: Sequence[int], dims: Sequence[str]
) -> tuple[int, ...]:
    """Normalise `factor` to one integer per axis of an image (1 on non-spatial axes).

    Parameters
    ----------
    factor : int or sequence of int
        One integer >= 1 for every spatial axis, or one per spatial axis.
    shape : sequence of int
        Shape of the full-resolution image.
    dims : sequence of str
        Its axis names.

    Returns
    -------
    tuple of int
        Factor per axis of the image.

    Raises
    ------
    TypeError
        When a factor is not an integer.
    ValueError
        When a factor is < 1, the count is wrong, or the low-resolution image would have fewer
        than 2 voxels along a reduced axis.
    """
    space = spatial_mask(dims)
    n_space = sum(space)
    values = [factor] * n_space if isinstance(factor, numbers.Integral) else factor
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise TypeError(f"`downsample_factor` must be an integer or a sequence, got {factor!r}")
    values = tuple(values)
    if len(values) != n_space:
        raise ValueError(
            f"`downsample_factor` needs one integer or one per spatial axis ({n_space}), "
            f"got {values}"
        )
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"`downsample_factor` must hold integers, got {values}")
        if v < 1:
            raise ValueError(f"`downsample_factor` must be >= 1, got {values}")
    it = iter(int(v) for v in values)
    full = tuple(next(it) if s else 1 for s in space)
    for name, n, f in zip(dims, shape, full, strict=True):
        if f > 1 and -(-n // f) < 2:
            raise ValueError(
                f"`downsample_factor` {f} leaves fewer than 2 voxels on axis {name!r} "
                f"({n} voxels); use a factor of at most {max(n - 1, 1)} there"
            )
    return full


def check_lowres_budget(
    shape: Sequence[int],
    factors: Sequence[int],
    dims: Sequence[str],
    budget: int | None,
    *,
    limit_name: str = "max_lowres_bytes",
) -> None:
    """Refuse a low-resolution image (float32) larger than `budget` bytes.

    Parameters
    ----------
    shape : sequence of int
        Shape of the full-resolution image (selected channels only).
    factors : sequence of int
        Factor per axis.
    dims : sequence of str
        Axis names; only spatial factors are suggested larger.
    budget : int or None
        Largest size in bytes; None: no limit.
    limit_name : str, optional
        Name of the limit, for the message.

    Raises
    ------
    ValueError
        When it would be larger; the message suggests the smallest doubling of the spatial
        factors that fits.
    """
    if budget is None:
        return
    space = spatial_mask(dims)

    def size(grow: int) -> int:
        return math.prod(-(-n // (f * grow if s else f))
                         for n, f, s in zip(shape, factors, space, strict=True)) * 4  # fmt: skip

    need = size(1)
    if need <= budget:
        return
    grow = 2
    while size(grow) > budget and grow < max(shape):
        grow *= 2
    suggestion = ",".join(str(f * grow) for f, s in zip(factors, space, strict=True) if s)
    raise ValueError(
        f"the low-resolution image would take {need / 2**20:.0f} MiB, over the limit of "
        f"{budget / 2**20:.0f} MiB ({limit_name}); choose a larger downsample factor, "
        f"e.g. {suggestion}"
    )


def _check_finite_input(image: da.Array | np.ndarray, lowres: np.ndarray) -> None:
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(lowres).all():
        raise ValueError("the image holds NaN or infinite values; fix or mask them first")


# --------------------------------------------------------------------------- geometry


def lowres_geometry(
    scale: Sequence[float], translation: Sequence[float], factors: Sequence[int]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Scale and translation of a block-mean reduction by `factors` (block centres).

    This is the regular grid of OME-NGFF's pyramid levels; the last voxel along an axis whose
    length `factors` does not divide summarises a partial block and sits before it, at
    :func:`last_block_centre`.

    Parameters
    ----------
    scale, translation : sequence of float
        Full-resolution geometry per axis.
    factors : sequence of int
        Block size per axis.

    Returns
    -------
    scale, translation : tuple of float
        As :func:`voxflow.core.level_transform` with the mean method.
    """
    return level_transform(scale, translation, factors, Method.MEAN)


def _validate_shape(shape: Sequence[int]) -> list[int]:
    if isinstance(shape, str | bytes) or not isinstance(shape, Sequence | np.ndarray):
        raise TypeError(f"`shape` must be a sequence of integers, got {type(shape).__name__}")
    for n in shape:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"`shape` must hold integers, got {tuple(shape)}")
        if n < 1:
            raise ValueError(f"`shape` must hold integers >= 1, got {tuple(shape)}")
    return [int(n) for n in shape]


def _validate_steps(factors: Sequence[int] | Sequence[Sequence[int]]) -> list[Sequence[int]]:
    """`factors` as a list of steps: one sequence of integers per block mean."""
    if isinstance(factors, str | bytes) or not isinstance(factors, Sequence | np.ndarray):
        raise TypeError(f"`factors` must be a sequence, got {type(factors).__name__}")
    steps = list(factors)
    if not steps:
        raise ValueError("`factors` must hold one integer per axis or at least one step")
    if all(isinstance(f, numbers.Integral) for f in steps):
        return [steps]
    return steps


def last_block_centre(
    shape: Sequence[int],
    scale: Sequence[float],
    translation: Sequence[float],
    factors: Sequence[int] | Sequence[Sequence[int]],
) -> tuple[float, ...]:
    """Physical centre of the last voxel per axis of a block-mean reduction of a grid.

    A block mean sits at the centre of the voxels it summarises. Along an axis of ``n`` voxels
    and factor ``f``, every block is whole but the last when ``f`` does not divide ``n``: it
    holds ``m = n - (n_low - 1) * f`` voxels (``n_low = ceil(n / f)``), and its mean sits at
    ``translation + ((n_low - 1) * f + (m - 1) / 2) * scale``, ``(f - m) / 2`` voxels before
    the regular grid of :func:`lowres_geometry` places it. For a cascade of block means (a
    pyramid made level by level), the last voxel of a level is the plain mean of the voxels
    of the previous level it covers, so it sits at the mean of their centres.

    Parameters
    ----------
    shape : sequence of int
        Shape of the full-resolution grid.
    scale, translation : sequence of float
        Its voxel size and the centre of its first voxel per axis.
    factors : sequence of int, or sequence of sequence of int
        Block size per axis; or one such sequence per step of a cascade, the first applied to
        the full-resolution grid.

    Returns
    -------
    tuple of float
        Centre of the last low-resolution voxel per axis. Where every block is whole (at every
        step), exactly ``t_low + (n_low - 1) * s_low`` of the regular grid.

    Raises
    ------
    TypeError
        When a value has the wrong type.
    ValueError
        When the lengths differ, a factor or a shape value is below 1, a scale is not positive,
        or a value is not finite.
    """
    sizes = _validate_shape(shape)
    if isinstance(scale, Sequence | np.ndarray) and len(sizes) != len(scale):
        raise ValueError(
            f"`shape` needs one integer per axis of `scale` ({len(scale)}), got {tuple(shape)}"
        )
    scale, translation = level_transform(scale, translation, (1,) * len(sizes), Method.MEAN)
    s_low, t_low = scale, translation
    # Per axis, in full-resolution voxels: the centre of the level's first voxel, its voxel
    # size, and the centre of its last voxel (exact fractions).
    first = [Fraction(0)] * len(sizes)
    size = [1] * len(sizes)
    last = [Fraction(n - 1) for n in sizes]
    whole = [True] * len(sizes)
    for step in _validate_steps(factors):
        s_low, t_low = level_transform(s_low, t_low, step, Method.MEAN)
        for axis, f in enumerate(step):
            n, sizes[axis] = sizes[axis], -(-sizes[axis] // f)
            start = (sizes[axis] - 1) * f  # the last block holds voxels start .. n - 1
            m = n - start
            whole[axis] = whole[axis] and m == f
            # Its voxels but the last are whole blocks of the level before: on its grid.
            before = first[axis] + Fraction(start + n - 2, 2) * size[axis]
            last[axis] = ((m - 1) * before + last[axis]) / m
            first[axis] += Fraction(f - 1, 2) * size[axis]
            size[axis] *= f
    axes = zip(sizes, s_low, t_low, whole, last, scale, translation, strict=True)
    return tuple(tl + (n - 1) * sl if w else t + float(c) * s for n, sl, tl, w, c, s, t in axes)


# --------------------------------------------------------------------------- the low resolution


def lowres_block_mean(image: da.Array, factors: Sequence[int]) -> da.Array:
    """Lazy block mean of `image` by `factors`, in floating point: the plugin's input.

    Unlike a pyramid level of an integer image (:func:`voxflow.core.downsample` keeps the
    dtype, rounding each mean), the means are not rounded: each block is summed in float64,
    divided by the number of voxels it holds (a partial block at the far edge: those it has). So
    integer and float copies of the same data give the same low-resolution image.

    Parameters
    ----------
    image : dask.array.Array, shape (..., [Z,] Y, X)
        Image of integers or floats, 2 to 5 axes.
    factors : sequence of int
        Block size per axis; only the last three axes may be reduced.

    Returns
    -------
    dask.array.Array, shape ``ceil(image.shape / factors)``
        Float32 or float64 (see above), computed block by block (``downsample`` with a float
        `dtype`: each block is summed in float64, no converted copy of it is made).

    Raises
    ------
    TypeError, ValueError
        As :func:`voxflow.core.downsample`.
    """
    if not isinstance(image, da.Array):
        raise TypeError(f"`image` must be a dask.array.Array, got {type(image).__name__}")
    if image.dtype.kind not in "iuf":
        raise TypeError(f"`image` must hold integers or floats, got {image.dtype}")
    return downsample(image, factors, Method.MEAN, dtype=np.result_type(image.dtype, np.float32))


# --------------------------------------------------------------------------- the two steps


def _bind(plugin: Any, context: ScaleContext) -> Any:
    run = copy.copy(plugin)
    run.context = context
    return run


def estimate_field(
    lowres: np.ndarray, plugin: Any, context: ScaleContext
) -> tuple[np.ndarray, Any]:
    """Run a plugin's ``lowres_func`` on one channel's low-resolution array.

    Parameters
    ----------
    lowres : numpy.ndarray, shape (Z, Y, X) or (Y, X)
        Low-resolution voxels of one channel (given to the plugin as float32).
    plugin : object
        A scaled-processing plugin (see ``voxflow.plugins``).
    context : ScaleContext
        Geometry of the call; set as ``context`` on the copy of `plugin` that runs.

    Returns
    -------
    field : numpy.ndarray of float32
        The plugin's field, same shape as `lowres`.
    run : object
        The plugin copy that made it; its ``highres_func`` must apply this field.

    Raises
    ------
    PluginHookError
        When the hook raises, returns something that is not an array of that shape, or
        returns NaN or infinite values.
    """
    run = _bind(plugin, context)
    name = _plugin_name(plugin)
    try:
        field = run.lowres_func(lowres_array=np.asarray(lowres, dtype=np.float32))
    except Exception as exc:
        raise PluginHookError(f"plugin {name!r} failed in lowres_func: {exc}") from exc
    if not isinstance(field, np.ndarray) or field.shape != lowres.shape:
        got = getattr(field, "shape", type(field).__name__)
        raise PluginHookError(
            f"plugin {name!r}: lowres_func must return an array of shape {lowres.shape}, got {got}"
        )
    if not np.issubdtype(field.dtype, np.number) or not np.isfinite(field).all():
        raise PluginHookError(f"plugin {name!r}: lowres_func returned NaN or infinite values")
    return field.astype(np.float32, copy=False), run


def _cast_block(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return cast_to_dtype(block, dtype)


def _dtype_name(dtype: np.dtype | str | None) -> str | None:
    """`dtype` as :attr:`ScaleContext.dtype` holds it: its name, with the byte order if foreign."""
    if dtype is None:
        return None
    dtype = np.dtype(dtype)
    return dtype.name if dtype.isnative else dtype.str


def _with_dtype(run: Any, dtype: np.dtype | str | None) -> Any:
    """`run`, or a copy of it whose context names `dtype` when its context names another."""
    context = getattr(run, "context", None)
    name = _dtype_name(dtype)
    if not isinstance(context, ScaleContext) or context.dtype == name:
        return run
    return _bind(run, dataclasses.replace(context, dtype=name))


def apply_field(
    image: da.Array,
    field: np.ndarray,
    run: Any,
    *,
    scale: Sequence[float],
    translation: Sequence[float],
    field_scale: Sequence[float],
    field_translation: Sequence[float],
    field_last_centre: Sequence[float] | None = None,
    dtype: np.dtype | str | None = None,
) -> da.Array:
    """Upsample `field` blockwise to `image`'s grid and apply the plugin's ``highres_func``.

    Parameters
    ----------
    image : dask.array.Array
        Full-resolution voxels of one channel (spatial axes only).
    field : numpy.ndarray
        The low-resolution field of that channel.
    run : object
        The plugin copy returned by :func:`estimate_field`.
    scale, translation : sequence of float
        Physical geometry of `image` per axis.
    field_scale, field_translation : sequence of float
        Physical geometry of `field` per axis (voxel centres).
    field_last_centre : sequence of float, optional
        Physical centre of the last voxel of `field` per axis (:func:`last_block_centre` for
        a block mean); None: on the regular grid of `field_scale` and `field_translation`.
    dtype : numpy.dtype or str, optional
        Output dtype; integers are rounded to nearest and clipped to the dtype's range.
        None keeps the dtype ``highres_func`` returns. ``highres_func`` runs on a copy of
        `run` whose context's ``dtype`` names it (see :class:`ScaleContext`).

    Returns
    -------
    dask.array.Array
        Lazy result with the chunks of `image`.

    Raises
    ------
    PluginHookError
        When ``highres_func`` raises while building the graph or returns something that is
        not a Dask array of `image`'s shape.
    """
    up = upsample(
        field, image.shape, image.chunks, scale=scale, translation=translation,
        low_scale=field_scale, low_translation=field_translation,
        low_last_centre=field_last_centre,
    )  # fmt: skip
    name = _plugin_name(run)
    run = _with_dtype(run, dtype)
    try:
        out = run.highres_func(fullres_array=image, upsampled_output=up)
    except Exception as exc:
        raise PluginHookError(f"plugin {name!r} failed in highres_func: {exc}") from exc
    if not isinstance(out, da.Array) or out.shape != image.shape:
        got = getattr(out, "shape", type(out).__name__)
        raise PluginHookError(
            f"plugin {name!r}: highres_func must return a Dask array of shape {image.shape}, "
            f"got {got}"
        )
    if out.chunks != image.chunks:
        out = out.rechunk(image.chunks)
    if dtype is None or np.dtype(dtype) == out.dtype:
        return out
    return out.map_blocks(_cast_block, np.dtype(dtype), dtype=np.dtype(dtype))


# --------------------------------------------------------------------------- the whole


def validate_channels(channels: Sequence[int] | None, n: int | None) -> tuple[int, ...] | None:
    """Check a channel selection against an image with `n` channels (None: no channel axis).

    Returns
    -------
    tuple of int or None
        The selection; None selects every channel (``range(n)``, or None without a channel
        axis).

    Raises
    ------
    TypeError, ValueError
        For non-integers, channels out of range or repeated, an empty selection, or a
        selection on an image without a channel axis.
    """
    if channels is None:
        return None if n is None else tuple(range(n))
    if n is None:
        raise ValueError("`channels` needs an image with a channel axis 'c'")
    got = tuple(channels)
    if not got:
        raise ValueError("`channels` must name at least one channel")
    for c in got:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise TypeError(f"`channels` must hold integers, got {got}")
        if not 0 <= c < n:
            raise ValueError(f"`channels` must lie in 0..{n - 1}, got {got}")
    if len(set(got)) != len(got):
        raise ValueError(f"`channels` must not repeat a channel, got {got}")
    return got


def _validate_dtype(dtype: DtypePolicy | str, image_dtype: np.dtype) -> np.dtype:
    if dtype == "keep":
        return np.dtype(image_dtype)
    if dtype == "float32":
        return np.dtype(np.float32)
    raise ValueError(f"`dtype` must be 'keep' or 'float32', got {dtype!r}")


def _select(image: da.Array, dims: tuple[str, ...], channels: tuple[int, ...] | None) -> da.Array:
    if channels is None or "c" not in dims:
        return image
    return image[(slice(None),) * dims.index("c") + (list(channels),)]


def _stack(items: list[Any], shape: tuple[int, ...], stack: Any) -> Any:
    """Stack a flat, C-ordered list of arrays into leading axes of `shape`."""
    if not shape:
        return items[0]
    step = math.prod(shape[1:])
    return stack([_stack(items[i * step : (i + 1) * step], shape[1:], stack)
                  for i in range(shape[0])])  # fmt: skip


def apply_scaled_processing(
    image: da.Array | np.ndarray,
    plugin: Any,
    downsample_factor: int | Sequence[int] = 4,
    *,
    chunk_size: Sequence[int] | None = None,
    dims: Sequence[str] | None = None,
    scale: Sequence[float] | None = None,
    translation: Sequence[float] | None = None,
    units: Sequence[str | None] | None = None,
    channels: Sequence[int] | None = None,
    dtype: DtypePolicy = "keep",
    lowres: np.ndarray | None = None,
    lowres_scale: Sequence[float] | None = None,
    lowres_translation: Sequence[float] | None = None,
    lowres_last_centre: Sequence[float] | None = None,
    max_lowres_bytes: int | None = None,
) -> ScaledResult:
    """Estimate a smooth field at low resolution and apply it to every full-resolution block.

    Parameters
    ----------
    image : dask.array.Array or numpy.ndarray, shape ([T,] [C,] [Z,] Y, X)
        Full-resolution image. Non-spatial axes (time, channel) are processed one index at a
        time.
    plugin : object
        A scaled-processing plugin instance (see ``voxflow.plugins.resolve_plugin``).
    downsample_factor : int or sequence of int, optional
        Full-resolution voxels per low-resolution voxel, for every spatial axis or one per
        spatial axis; any integer >= 1.
    chunk_size : sequence of int, optional
        Chunk shape (one per axis) the full-resolution work runs in; None keeps `image`'s
        chunks (NumPy input: one chunk).
    dims : sequence of str, optional
        Axis names; None: ``zyx``-style defaults for the number of axes (``czyx`` for 4D).
    scale, translation : sequence of float, optional
        Physical voxel size and position of voxel 0 per axis; None: 1 and 0.
    units : sequence of str or None, optional
        Unit per axis, given to the plugin.
    channels : sequence of int, optional
        Channels to process (and to return), None: all.
    dtype : {"keep", "float32"}, optional
        "keep" rounds and clips the result into the input's dtype; "float32" returns floats.
    lowres : numpy.ndarray, optional
        An existing low-resolution copy of the image's selected channels (`channels`, all
        by default; e.g. from a pyramid level), used instead of reducing `image`; needs
        `lowres_scale` and `lowres_translation`. None: block mean of `image` by
        `downsample_factor`, in floating point (:func:`lowres_block_mean`), its last voxel
        along each axis at the centre of the voxels it summarises
        (:func:`last_block_centre`). A pyramid level of an integer image holds rounded
        means (by less than half a grey level per pyramid step).
    lowres_scale, lowres_translation : sequence of float, optional
        Geometry of `lowres` per axis.
    lowres_last_centre : sequence of float, optional
        Physical centre of the last voxel of `lowres` per axis; None: on the regular grid of
        `lowres_scale` and `lowres_translation`. For a pyramid level whose last blocks are
        partial, :func:`last_block_centre` of its factors.
    max_lowres_bytes : int, optional
        Refuse when the low-resolution image (float32, selected channels) would be larger.

    Returns
    -------
    ScaledResult
        The lazy processed image and the low-resolution fields.

    Raises
    ------
    ValueError
        For a bad factor, channel selection, dtype or budget, or NaN/Inf in the image.
    PluginHookError
        When a hook fails or breaks its contract; the message names the plugin and the hook.
    """
    arr = image if isinstance(image, da.Array) else da.from_array(np.asarray(image))
    dims = validate_dims(dims) if dims is not None else _default_dims(arr.ndim)
    if chunk_size is not None:
        arr = arr.rechunk(tuple(chunk_size))
    scale = tuple(map(float, scale)) if scale is not None else (1.0,) * arr.ndim
    translation = tuple(map(float, translation)) if translation is not None else (0.0,) * arr.ndim
    factors = validate_downsample_factor(downsample_factor, arr.shape, dims)
    n_chan = arr.shape[dims.index("c")] if "c" in dims else None
    chans = validate_channels(channels, n_chan)
    out_dtype = _validate_dtype(dtype, arr.dtype)
    selected = _select(arr, dims, chans)
    if lowres is None:
        check_lowres_budget(selected.shape, factors, dims, max_lowres_bytes)
        low = lowres_block_mean(selected, factors).compute()
        low_scale, low_trans = lowres_geometry(scale, translation, factors)
        low_last = last_block_centre(selected.shape, scale, translation, factors)
    else:
        if lowres_scale is None or lowres_translation is None:
            raise ValueError("`lowres` needs `lowres_scale` and `lowres_translation`")
        low = np.asarray(lowres)
        space = spatial_mask(dims)
        lead = [n for n, s in zip(selected.shape, space, strict=True) if not s]
        if (
            low.ndim != selected.ndim
            or [n for n, s in zip(low.shape, space, strict=True) if not s] != lead
        ):
            raise ValueError(
                f"`lowres` must hold the selected channels ({selected.ndim} axes, "
                f"non-spatial shape {tuple(lead)}), got shape {low.shape}"
            )
        low_scale, low_trans = tuple(lowres_scale), tuple(lowres_translation)
        low_last = _given_last_centre(lowres_last_centre, low.shape, low_scale, low_trans)
    _check_finite_input(arr, low)
    return _process(selected, low, plugin, dims, chans, factors, scale, translation,
                    (low_scale, low_trans, low_last), units, out_dtype)  # fmt: skip


def _given_last_centre(
    last: Sequence[float] | None, shape: tuple[int, ...], scale: tuple, translation: tuple
) -> tuple[float, ...]:
    if last is None:
        return tuple(
            float(t) + (n - 1) * float(s) for n, s, t in zip(shape, scale, translation, strict=True)
        )
    if len(tuple(last)) != len(shape):
        raise ValueError(
            f"`lowres_last_centre` needs one number per axis ({len(shape)}), got {tuple(last)}"
        )
    return tuple(last)


def _default_dims(ndim: int) -> tuple[str, ...]:
    names = {2: "yx", 3: "zyx", 4: "czyx", 5: "tczyx"}
    if ndim not in names:
        raise ValueError(f"`image` must have 2 to 5 axes, got {ndim}")
    return tuple(names[ndim])


def _process(
    selected, low, plugin, dims, chans, factors, scale, translation, low_geometry, units,
    out_dtype,
) -> ScaledResult:  # fmt: skip
    low_scale, low_trans, low_last = low_geometry
    space = spatial_mask(dims)
    lead = tuple(n for n, s in zip(selected.shape, space, strict=True) if not s)
    lead_dims = [d for d, s in zip(dims, space, strict=True) if not s]

    def spatial(values: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(v for v, s in zip(values, space, strict=True) if s)

    # The last low-resolution voxel's centre, in its grid's voxels from the first one's.
    last_position = tuple(
        float((c - t) / s) for c, t, s in zip(low_last, low_trans, low_scale, strict=True)
    )
    fields, outs, runs = [], [], []
    for index in itertools.product(*(range(n) for n in lead)):
        channel = chans[index[lead_dims.index("c")]] if "c" in lead_dims else None
        context = ScaleContext(
            dims=spatial(dims), spacing=spatial(low_scale), fullres_spacing=spatial(scale),
            factors=spatial(factors), units=spatial(units) if units else (), channel=channel,
            dtype=_dtype_name(out_dtype), last_position=spatial(last_position),
        )  # fmt: skip
        field, run = estimate_field(low[index], plugin, context)
        outs.append(apply_field(
            selected[index], field, run, scale=spatial(scale), translation=spatial(translation),
            field_scale=spatial(low_scale), field_translation=spatial(low_trans),
            field_last_centre=spatial(low_last), dtype=out_dtype,
        ))  # fmt: skip
        fields.append(field)
        runs.append(run)
    image = _stack(outs, lead, da.stack)
    field = _stack(fields, lead, np.stack)
    return ScaledResult(image, field, tuple(low_scale), tuple(low_trans), tuple(low_last), runs)

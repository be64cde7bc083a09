"""Object tables from instance labels, and per-block counts and densities of objects.

:func:`object_table` measures every labelled object of a 3-D label array (centroid, size,
bounding box and, given an image, intensity) one block at a time: each block yields partial
sums, minima and maxima for the labels it holds, and one vectorised reduction merges them, so
an object cut by chunk borders is one row and the label array is never whole in memory.
:func:`count_map` and :func:`density_map` bin object centroids into coarse cells.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import dask
import dask.array as da
import numpy as np
import pandas as pd

__all__ = ["OBJECT_COLUMNS", "count_map", "density_map", "object_table"]

OBJECT_COLUMNS: tuple[str, ...] = (
    "label",
    "z",
    "y",
    "x",
    "z_um",
    "y_um",
    "x_um",
    "voxels",
    "volume_um3",
    "bbox_z0",
    "bbox_y0",
    "bbox_x0",
    "bbox_z1",
    "bbox_y1",
    "bbox_x1",
)
_INTENSITY_COLUMNS = ("mean_intensity", "max_intensity")
_INT_COLUMNS = frozenset({"label", "voxels", *OBJECT_COLUMNS[9:]})
_NDIM = 3
_UM3_PER_MM3 = 1e9

# Partial statistics of one block: the label, then per label these columns, reduced by
# summing, taking the minimum or the maximum when blocks are merged.
_SUMS = ("voxels", "sum_z", "sum_y", "sum_x", "sum_intensity")
_MINS = ("min_z", "min_y", "min_x")
_MAXS = ("max_z", "max_y", "max_x", "max_intensity")


# --------------------------------------------------------------------------- validation


def _validate_vector(values: object, name: str, *, positive: bool) -> np.ndarray:
    """Three finite numbers (z, y, x) as float64; strictly positive when `positive`."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise TypeError(f"`{name}` must be a sequence of 3 numbers, got {type(values).__name__}")
    got = tuple(values)
    if len(got) != _NDIM or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in got
    ):
        raise ValueError(f"`{name}` needs one number per axis (z, y, x), got {got!r}")
    vector = np.asarray(got, dtype=np.float64)
    if not np.all(np.isfinite(vector)) or (positive and np.any(vector <= 0)):
        kind = "positive finite" if positive else "finite"
        raise ValueError(f"`{name}` must hold {kind} numbers, got {got!r}")
    return vector


def _validate_shape(shape: object, name: str = "shape") -> tuple[int, int, int]:
    """Three positive integers."""
    if isinstance(shape, str | bytes) or not isinstance(shape, Sequence | np.ndarray):
        raise TypeError(f"`{name}` must be a sequence of 3 integers, got {type(shape).__name__}")
    got = tuple(shape)
    if len(got) != _NDIM or not all(
        isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0 for n in got
    ):
        raise ValueError(f"`{name}` needs 3 positive integers (z, y, x), got {got!r}")
    return tuple(int(n) for n in got)


def _validate_block(block: object) -> tuple[int, int, int]:
    """An int or three ints >= 1, as a 3-tuple."""
    if isinstance(block, numbers.Integral) and not isinstance(block, bool):
        block = (block,) * _NDIM
    return _validate_shape(block, "block")


def _validate_points(points: object, name: str) -> np.ndarray:
    """An (N, 3) array of finite coordinates as float64."""
    if isinstance(points, str | bytes) or not isinstance(points, np.ndarray | Sequence):
        raise TypeError(f"`{name}` must be an (N, 3) array, got {type(points).__name__}")
    array = np.asarray(points)
    if array.size == 0:
        return np.zeros((0, _NDIM), np.float64)
    if array.ndim != 2 or array.shape[1] != _NDIM:
        raise ValueError(f"`{name}` must have shape (N, 3), got {array.shape}")
    if array.dtype.kind not in "iuf":
        raise TypeError(f"`{name}` must hold numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` must hold finite coordinates")
    return array


def _validate_labels(labels: object, image: object) -> tuple[da.Array, da.Array | None]:
    """Labels and image as Dask arrays with the labels' chunks."""
    if not isinstance(labels, np.ndarray | da.Array):
        raise TypeError(f"`labels` must be a NumPy or Dask array, got {type(labels).__name__}")
    if labels.ndim != _NDIM or labels.dtype.kind not in "iu":
        raise ValueError(
            f"`labels` must be a 3-D integer array (z, y, x), got {labels.ndim}-D {labels.dtype}"
        )
    labels = labels if isinstance(labels, da.Array) else da.from_array(labels, chunks="auto")
    if image is None:
        return labels, None
    if not isinstance(image, np.ndarray | da.Array):
        raise TypeError(f"`image` must be a NumPy or Dask array, got {type(image).__name__}")
    if image.shape != labels.shape:
        raise ValueError(
            f"`image` must have the shape of `labels` {labels.shape}, got {image.shape}"
        )
    if image.dtype.kind not in "iufb":
        raise TypeError(f"`image` must be numeric, got dtype {image.dtype}")
    image = image if isinstance(image, da.Array) else da.from_array(image, chunks=labels.chunks)
    return labels, image.rechunk(labels.chunks)


# --------------------------------------------------------------------------- grouping


def _group(keys: np.ndarray, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reduce `columns` over equal `keys`: sum for _SUMS, min for _MINS, max for _MAXS."""
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if keys.size else keys[:0]
    out = {"label": keys[starts].astype(np.int64)}
    for name, values in columns.items():
        if not keys.size:
            out[name] = values[:0]
            continue
        ufunc = np.add if name in _SUMS else np.minimum if name in _MINS else np.maximum
        out[name] = ufunc.reduceat(values[order], starts)
    return out


def _block_stats(labels: np.ndarray, image: np.ndarray | None, offset: tuple[int, ...]) -> dict:
    """Partial statistics of the foreground labels in one block, in global voxel indices."""
    foreground = labels != 0
    keys = labels[foreground].astype(np.int64)
    coords = [c.astype(np.int64) + o for c, o in zip(np.nonzero(foreground), offset, strict=True)]
    columns = {"voxels": np.ones(keys.size, np.int64)}
    for axis, c in zip("zyx", coords, strict=True):
        columns[f"sum_{axis}"], columns[f"min_{axis}"], columns[f"max_{axis}"] = c, c, c
    if image is not None:
        values = image[foreground].astype(np.float64)
        columns["sum_intensity"], columns["max_intensity"] = values, values
    return _group(keys, columns)


def _merge(partials: Sequence[dict]) -> dict[str, np.ndarray]:
    """One row per label from every block's partial statistics."""
    keys = np.concatenate([p["label"] for p in partials])
    names = [n for n in partials[0] if n != "label"]
    return _group(keys, {n: np.concatenate([p[n] for p in partials]) for n in names})


def _block_offsets(chunks: tuple[tuple[int, ...], ...]) -> list[tuple[int, ...]]:
    """Global index of the first voxel of every block, in `np.ndindex` order."""
    starts = [np.r_[0, np.cumsum(c)[:-1]] for c in chunks]
    return [
        tuple(int(s[i]) for s, i in zip(starts, index, strict=True))
        for index in np.ndindex(*(len(c) for c in chunks))
    ]


# --------------------------------------------------------------------------- object table


def _table(
    stats: dict[str, np.ndarray], scale: np.ndarray, translation: np.ndarray, intensity: bool
) -> pd.DataFrame:
    """The object table from merged statistics."""
    voxels = stats["voxels"].astype(np.int64)
    columns: dict[str, np.ndarray] = {"label": stats["label"]}
    centroid = {a: stats[f"sum_{a}"] / np.maximum(voxels, 1) for a in "zyx"}
    columns.update(centroid)
    for i, a in enumerate("zyx"):
        columns[f"{a}_um"] = translation[i] + scale[i] * centroid[a]
    columns["voxels"] = voxels
    columns["volume_um3"] = voxels * float(np.prod(scale))
    columns.update({f"bbox_{a}0": stats[f"min_{a}"] for a in "zyx"})
    columns.update({f"bbox_{a}1": stats[f"max_{a}"] + 1 for a in "zyx"})
    if intensity:
        columns["mean_intensity"] = stats["sum_intensity"] / np.maximum(voxels, 1)
        columns["max_intensity"] = stats["max_intensity"]
    return pd.DataFrame(
        {
            name: np.asarray(values, np.int64 if name in _INT_COLUMNS else np.float64)
            for name, values in columns.items()
        }
    )


def object_table(
    labels: np.ndarray | da.Array,
    *,
    image: np.ndarray | da.Array | None = None,
    scale: Sequence[float] = (1.0, 1.0, 1.0),
    translation: Sequence[float] = (0.0, 0.0, 0.0),
) -> pd.DataFrame:
    """Centroid, size, bounding box and intensity of every labelled object.

    Each block of `labels` yields partial sums, minima and maxima for the labels it holds;
    these are merged by label, so an object spread over many chunks is one row. The blocks
    are computed with one ``dask.compute`` (on the current distributed client, if any) and
    only one block per worker is in memory at a time.

    Parameters
    ----------
    labels : numpy.ndarray or dask.array.Array of int, shape (Z, Y, X)
        Instance labels; 0 is background and any other value an object. Labels need not be
        consecutive. A NumPy array is split into Dask's automatic chunks.
    image : numpy.ndarray or dask.array.Array, shape (Z, Y, X), optional
        Intensities, rechunked to the chunks of `labels`; None: no intensity columns.
    scale : sequence of float, optional
        Voxel size (z, y, x) in micrometres.
    translation : sequence of float, optional
        Physical position (z, y, x) in micrometres of the centre of voxel (0, 0, 0).

    Returns
    -------
    pandas.DataFrame
        One row per label present, sorted by label, with the columns of `OBJECT_COLUMNS`:
        ``label`` (int64); ``z``, ``y``, ``x``, the centroid as the mean voxel index
        (float64); ``z_um``, ``y_um``, ``x_um``, the centroid as ``translation + scale ×
        index``; ``voxels`` (int64) and ``volume_um3`` (``voxels × prod(scale)``);
        ``bbox_z0`` … ``bbox_x1``, the half-open bounding box in voxels (int64). With `image`,
        also ``mean_intensity`` and ``max_intensity`` (float64). No labels: no rows.

    Raises
    ------
    TypeError
        When `labels` or `image` is not an array or `image` is not numeric.
    ValueError
        When `labels` is not a 3-D integer array, `image` has another shape, or `scale` or
        `translation` is not three finite numbers (`scale` positive).
    """
    labels, image = _validate_labels(labels, image)
    scale = _validate_vector(scale, "scale", positive=True)
    translation = _validate_vector(translation, "translation", positive=False)
    label_blocks = labels.to_delayed().ravel()
    image_blocks = [None] * label_blocks.size if image is None else image.to_delayed().ravel()
    stats = dask.delayed(_block_stats)
    partials = dask.compute(
        *(
            stats(lb, ib, offset)
            for lb, ib, offset in zip(
                label_blocks, image_blocks, _block_offsets(labels.chunks), strict=True
            )
        )
    )
    return _table(_merge(partials), scale, translation, image is not None)


# --------------------------------------------------------------------------- counts, density


def _map_shape(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-(-n // b) for n, b in zip(shape, block, strict=True))


def count_map(
    centroids: np.ndarray, shape: Sequence[int], block: int | Sequence[int]
) -> np.ndarray:
    """Number of objects whose centroid falls in each cell of a coarse grid.

    An object belongs to the voxel ``floor(c + 0.5)`` nearest its centroid ``c`` (clipped to
    the array), and that voxel to the cell ``voxel // block``.

    Parameters
    ----------
    centroids : numpy.ndarray, shape (N, 3)
        Centroids (z, y, x) in voxel coordinates of an array of `shape`.
    shape : sequence of int
        Shape (Z, Y, X) of that array.
    block : int or sequence of int
        Voxels per map cell, for every axis or per axis.

    Returns
    -------
    numpy.ndarray of int64, shape ``ceil(shape / block)``
        Counts; they sum to N.

    Raises
    ------
    TypeError
        When `centroids` is not a numeric array, or `shape` or `block` is not integers.
    ValueError
        When `centroids` is not (N, 3) finite coordinates, or `shape` or `block` is not three
        positive integers.
    """
    points = _validate_points(centroids, "centroids")
    shape = _validate_shape(shape)
    block = _validate_block(block)
    map_shape = _map_shape(shape, block)
    voxel = np.clip(np.floor(points + 0.5).astype(np.int64), 0, np.asarray(shape) - 1)
    cell = voxel // np.asarray(block)
    flat = np.ravel_multi_index(tuple(cell.T), map_shape)
    counts = np.bincount(flat, minlength=int(np.prod(map_shape)))
    return counts.astype(np.int64).reshape(map_shape)


def density_map(
    counts: np.ndarray,
    shape: Sequence[int],
    block: int | Sequence[int],
    scale: Sequence[float],
) -> np.ndarray:
    """Objects per cubic millimetre in each cell of a :func:`count_map`.

    Edge cells are smaller when `block` does not divide `shape`; each cell's volume counts
    its real number of voxels.

    Parameters
    ----------
    counts : numpy.ndarray, shape ``ceil(shape / block)``
        Objects per cell, e.g. from :func:`count_map`.
    shape : sequence of int
        Shape (Z, Y, X) of the array the cells tile.
    block : int or sequence of int
        Voxels per map cell, for every axis or per axis.
    scale : sequence of float
        Voxel size (z, y, x) in micrometres.

    Returns
    -------
    numpy.ndarray of float64
        ``counts / (voxels in the cell × prod(scale) × 1e-9)``, in cells per mm³.

    Raises
    ------
    TypeError
        When `counts` is not a numeric array, or `shape`, `block` or `scale` has the wrong type.
    ValueError
        When `counts` does not have the map shape ``ceil(shape / block)``, or `shape`, `block`
        or `scale` is not three positive values.
    """
    if not isinstance(counts, np.ndarray) or counts.dtype.kind not in "iuf":
        raise TypeError(f"`counts` must be a numeric NumPy array, got {type(counts).__name__}")
    shape = _validate_shape(shape)
    block = _validate_block(block)
    scale = _validate_vector(scale, "scale", positive=True)
    map_shape = _map_shape(shape, block)
    if counts.shape != map_shape:
        raise ValueError(
            f"`counts` must have the map shape ceil(shape / block) = {map_shape}, "
            f"got {counts.shape}"
        )
    sizes = [
        np.minimum(b, n - np.arange(m) * b) for n, b, m in zip(shape, block, map_shape, strict=True)
    ]
    voxels = sizes[0][:, None, None] * sizes[1][None, :, None] * sizes[2][None, None, :]
    volume_mm3 = voxels * float(np.prod(scale)) / _UM3_PER_MM3
    return counts.astype(np.float64) / volume_mm3

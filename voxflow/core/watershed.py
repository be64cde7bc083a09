"""Split touching objects of a chunked mask by a marker watershed, consistently across chunks.

Each block is split with its halo (as ``map_overlap`` with ``boundary="none"`` would see it); the
block's own voxels keep their local labels. Two local labels of neighbouring blocks are one object
when the blocks agree on the voxels next to their common boundary: each block labelled those
voxels, one as its own and one inside its halo. Label pairs that are each other's best match
there are joined by the global step in :mod:`voxflow.core._merge`, which also filters by size and
numbers the objects ``1..n``.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import dask.array as da
import numba
import numpy as np
from dask.base import tokenize
from scipy import ndimage

from voxflow.core import _merge
from voxflow.core._merge import Shell
from voxflow.core._validate import validate_int

__all__ = ["watershed_split"]

_NDIM = 3
_TRUNCATE = 4.0
_TOUCHING = np.ones((3,) * _NDIM, dtype=bool)


@dataclass(frozen=True, eq=False)
class _Params:
    """What every block needs to split itself."""

    spacing: tuple[float, ...]
    min_distance: float
    sigma: tuple[float, ...] | None
    """Gaussian sigma of the image in voxels per axis; None: no smoothing."""
    structure: np.ndarray


@dataclass(frozen=True)
class _BlockPlan:
    """Where a block's extended region comes from and where the block sits in it.

    The region is assembled from ``pieces``: ``(neighbour block index, source slices in that
    block, destination slices in the region)``.
    """

    pieces: tuple[tuple[tuple[int, ...], tuple[slice, ...], tuple[slice, ...]], ...]
    shape: tuple[int, ...]
    core: tuple[slice, ...]
    """The block's own voxels, in region coordinates."""
    rim: tuple[slice, ...]
    """The block grown by one voxel (clipped to the array), in region coordinates."""
    rim_origin: tuple[int, ...]
    """Global index of the first voxel of ``rim``."""


def watershed_split(
    mask: np.ndarray | da.Array,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    min_distance: float = 4.0,
    halo: int | Sequence[int] | None = None,
    image: np.ndarray | da.Array | None = None,
    sigma: float | None = None,
    connectivity: int = 26,
    min_size: int | None = None,
    max_size: int | None = None,
) -> tuple[da.Array, int]:
    """Split touching objects of a binary mask with a marker watershed.

    Parameters
    ----------
    mask : numpy.ndarray or dask.array.Array, shape (Z, Y, X)
        Bool or integer; nonzero voxels are objects. A NumPy array is processed as one chunk.
    spacing : sequence of 3 float, optional
        Voxel size per axis in physical units (µm, say); `min_distance` and `sigma` are in the
        same units.
    min_distance : float, optional
        Markers closer than this are not both kept: a voxel is a marker when it is foreground
        and equals the maximum of the marker surface over an ellipsoid of this radius (per-axis
        radius ``min_distance / spacing`` voxels). Touching maxima (a plateau) are one marker.
    halo : int or sequence of 3 int, optional
        Voxels per axis each block sees beyond its own, at least 1. None: ``ceil(2 *
        min_distance / spacing) + 2`` per axis, plus ``ceil(4 * sigma / spacing)`` with `sigma`.
    image : numpy.ndarray or dask.array.Array, shape (Z, Y, X), optional
        Intensity image (bright object centres). None: the markers are maxima of the Euclidean
        distance transform of `mask` and the watershed floods its negative; given: maxima of
        the image, and the watershed floods ``-image``. Rechunked to the chunks of `mask`.
    sigma : float, optional
        Gaussian smoothing of `image` before finding markers and flooding, in physical units.
        Only with `image`. None: no smoothing.
    connectivity : {6, 18, 26}, optional
        Neighbourhood of the flooding and of the objects.
    min_size, max_size : int, optional
        Inclusive bounds on an object's voxel count over the whole array; objects outside are
        removed and the rest renumbered. None: no bound.

    Returns
    -------
    labels : dask.array.Array
        Lazy, with the chunks of `mask`; objects ``1..n``, background 0; uint32, or uint64 when
        ``n > 2**32 - 1``.
    n : int
        The number of objects.

    Raises
    ------
    TypeError
        If an array is not a NumPy or Dask array of a supported dtype, or a parameter has the
        wrong type.
    ValueError
        If a shape or a parameter value is out of range, or `sigma` comes without `image`.

    Notes
    -----
    A connected component of `mask` that holds no marker (a small object within `min_distance`
    of a larger one) becomes one object of its own.

    Chunking: every block is split on its extended region (the block plus `halo`, clipped at
    the array's edge), so an object is split as on the whole array when it, the objects within
    `min_distance` of it and the background around them lie within the halo of every block it
    touches. Objects farther than the halo from any chunk border therefore come out the same
    for any chunking. Objects larger than the halo may be cut at chunk borders: each block
    then sees part of them, and the parts are joined or split differently from the whole-array
    result. Two local labels of neighbouring blocks are joined only when each is the other's
    best overlap on the voxels next to the border, so the halves of a split pair are not
    chained into one.

    As with :func:`voxflow.core.label.label`, the blocks are processed twice: once (computed
    here, with :func:`dask.compute`) for sizes and border labels, and once in the returned
    array, which maps each block's local labels through its slice of the global lookup.
    """
    mask = _merge.validate_mask(mask, ndims=(_NDIM,))
    structure = _merge.validate_connectivity(connectivity, _NDIM)
    spacing = _validate_spacing(spacing)
    min_distance = _validate_positive(min_distance, "min_distance")
    image = _validate_image(image, mask)
    sigma = _validate_sigma(sigma, image)
    halo = _validate_halo(halo, spacing, min_distance, sigma)
    min_size, max_size = _merge.validate_size_range(min_size, max_size)
    if mask.size == 0:
        return da.zeros(mask.shape, dtype=np.uint32, chunks=mask.chunks), 0
    sigma_voxels = None if sigma is None else tuple(sigma / s for s in spacing)
    params = _Params(spacing, min_distance, sigma_voxels, structure)
    if any(0 in c for c in mask.chunks):
        # Empty blocks would sit between neighbours; split without them, then cut back.
        dense = tuple(tuple(n for n in c if n) for c in mask.chunks)
        image = None if image is None else image.rechunk(dense)
        labels, n = _split(mask.rechunk(dense), image, params, halo, (min_size, max_size))
        return labels.rechunk(mask.chunks), n
    return _split(mask, image, params, halo, (min_size, max_size))


# --------------------------------------------------------------------------- validation


def _validate_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def _validate_positive(value: object, name: str) -> float:
    value = _validate_real(value, name)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be positive and finite, got {value}")
    return value


def _validate_spacing(spacing: object) -> tuple[float, ...]:
    if isinstance(spacing, str | bytes) or not isinstance(spacing, Sequence | np.ndarray):
        raise TypeError(f"`spacing` must be a sequence of numbers, got {type(spacing).__name__}")
    got = tuple(spacing)
    if len(got) != _NDIM:
        raise ValueError(f"`spacing` needs one number per axis ({_NDIM}), got {got}")
    return tuple(_validate_positive(s, "spacing") for s in got)


def _validate_image(image: object, mask: da.Array) -> da.Array | None:
    if image is None:
        return None
    if isinstance(image, np.ndarray):
        image = da.from_array(image, chunks=mask.chunks if image.shape == mask.shape else -1)
    elif not isinstance(image, da.Array):
        raise TypeError(f"`image` must be a NumPy or Dask array, got {type(image).__name__}")
    if image.shape != mask.shape:
        raise ValueError(f"`image` must have the shape of `mask` {mask.shape}, got {image.shape}")
    if image.dtype.kind not in "iuf":
        raise TypeError(f"`image` must hold integers or floats, got {image.dtype}")
    return image if image.chunks == mask.chunks else image.rechunk(mask.chunks)


def _validate_sigma(sigma: object, image: da.Array | None) -> float | None:
    if sigma is None:
        return None
    sigma = _validate_positive(sigma, "sigma")
    if image is None:
        raise ValueError("`sigma` smooths `image`; it needs `image`, got image=None")
    return sigma


def _validate_halo(
    halo: object, spacing: tuple[float, ...], min_distance: float, sigma: float | None
) -> tuple[int, ...]:
    if halo is None:
        blur = [0] * _NDIM if sigma is None else [math.ceil(_TRUNCATE * sigma / s) for s in spacing]
        return tuple(
            math.ceil(2 * min_distance / s) + 2 + b for s, b in zip(spacing, blur, strict=True)
        )
    if isinstance(halo, numbers.Integral) and not isinstance(halo, bool):
        halo = (halo,) * _NDIM
    if isinstance(halo, str | bytes) or not isinstance(halo, Sequence | np.ndarray):
        raise TypeError(f"`halo` must be an integer or a sequence of integers, got {halo!r}")
    if len(halo) != _NDIM:
        raise ValueError(f"`halo` needs one integer per axis ({_NDIM}), got {tuple(halo)}")
    return tuple(validate_int(h, "halo", 1) for h in halo)


# --------------------------------------------------------------------------- graph


def _split(
    mask: da.Array,
    image: da.Array | None,
    params: _Params,
    halo: tuple[int, ...],
    size_range: tuple[int | None, int | None],
) -> tuple[da.Array, int]:
    """:func:`watershed_split` on validated inputs whose blocks are all non-empty."""
    bounds = _merge.block_bounds(mask.chunks)
    arrays = [mask] if image is None else [mask, image]
    token = tokenize(mask, image, params, halo, size_range)
    plans = {index: _plan(bounds, index, halo) for index in np.ndindex(*mask.numblocks)}

    def task(function, index, *extra):
        plan = plans[index]
        keys = [[(a.name, *p[0]) for p in plan.pieces] for a in arrays]
        return (functools.partial(function, plan=plan, params=params), keys, *extra)

    summaries = {index: task(_summarise, index) for index in plans}
    luts, n = _merge.resolve(
        summaries,
        arrays,
        _matching_pairs,
        bounds,
        _merge.neighbour_offsets(params.structure),
        token=f"watershed-{token}",
        min_size=size_range[0],
        max_size=size_range[1],
    )
    tasks = {index: task(_relabel, index, lut) for index, lut in zip(plans, luts, strict=True)}
    return _merge.lookup_array(f"watershed-{token}", tasks, mask, _merge.label_dtype(n), arrays), n


def _plan(
    bounds: tuple[np.ndarray, ...], index: tuple[int, ...], halo: tuple[int, ...]
) -> _BlockPlan:
    """The pieces of the extended region of block `index`, and the block's place in it."""
    per_axis, shape, core, rim, rim_origin = [], [], [], [], []
    for b, i, h in zip(bounds, index, halo, strict=True):
        start, stop, n = int(b[i]), int(b[i + 1]), int(b[-1])
        lo, hi = max(0, start - h), min(n, stop + h)
        first = int(np.searchsorted(b, lo, side="right")) - 1
        last = int(np.searchsorted(b, hi, side="left")) - 1
        per_axis.append(
            [
                (
                    j,
                    slice(max(lo, int(b[j])) - int(b[j]), min(hi, int(b[j + 1])) - int(b[j])),
                    slice(max(lo, int(b[j])) - lo, min(hi, int(b[j + 1])) - lo),
                )
                for j in range(first, last + 1)
            ]
        )
        shape.append(hi - lo)
        core.append(slice(start - lo, stop - lo))
        rim.append(slice(max(0, start - 1) - lo, min(n, stop + 1) - lo))
        rim_origin.append(max(0, start - 1))
    pieces = tuple(
        (tuple(p[0] for p in combo), tuple(p[1] for p in combo), tuple(p[2] for p in combo))
        for combo in itertools.product(*per_axis)
    )
    return _BlockPlan(pieces, tuple(shape), tuple(core), tuple(rim), tuple(rim_origin))


# --------------------------------------------------------------------------- per block


def _assemble(blocks: list[np.ndarray], plan: _BlockPlan) -> np.ndarray:
    """The extended region of a block from the pieces of its neighbours."""
    out = np.empty(plan.shape, dtype=blocks[0].dtype)
    for block, (_, source, destination) in zip(blocks, plan.pieces, strict=True):
        out[destination] = block[source]
    return out


def _split_region(
    blocks: list[list[np.ndarray]], plan: _BlockPlan, params: _Params
) -> tuple[np.ndarray, int]:
    """Watershed labels of a block's extended region, and the number of markers."""
    mask = _assemble(blocks[0], plan) != 0
    image = _assemble(blocks[1], plan) if len(blocks) > 1 else None
    return _split_array(mask, image, params)


def _split_array(
    mask: np.ndarray, image: np.ndarray | None, params: _Params
) -> tuple[np.ndarray, int]:
    """Marker watershed of a whole NumPy mask: int32 labels and the number of markers."""
    if image is None:
        surface = ndimage.distance_transform_edt(mask, sampling=params.spacing)
    else:
        surface = np.asarray(image, dtype=np.float64)
        if params.sigma is not None:
            surface = ndimage.gaussian_filter(
                surface, params.sigma, mode="nearest", truncate=_TRUNCATE
            )
    markers, count = _markers(surface, mask, params)
    return flood(-surface, markers, mask, params.structure), count


def _footprint(spacing: tuple[float, ...], radius: float) -> np.ndarray:
    """The voxels within `radius` (physical units) of the centre, for anisotropic `spacing`."""
    reach = [int(radius // s) for s in spacing]
    grid = np.meshgrid(
        *(np.arange(-r, r + 1) * s for r, s in zip(reach, spacing, strict=True)), indexing="ij"
    )
    return sum(g**2 for g in grid) <= radius**2


def _markers(surface: np.ndarray, mask: np.ndarray, params: _Params) -> tuple[np.ndarray, int]:
    """Labelled maxima of `surface` in `mask`; a component without one becomes one marker."""
    footprint = _footprint(params.spacing, params.min_distance)
    peak = ndimage.maximum_filter(surface, footprint=footprint, mode="nearest")
    maxima = (surface == peak) & mask
    markers, count = ndimage.label(maxima, _TOUCHING)
    objects, n_objects = ndimage.label(mask, params.structure)
    orphan = np.ones(n_objects + 1, dtype=bool)
    orphan[0] = False
    orphan[objects[maxima]] = False
    ids = np.zeros(n_objects + 1, dtype=markers.dtype)
    ids[orphan] = np.arange(count + 1, count + 1 + np.count_nonzero(orphan))
    markers += ids[objects]
    return markers, count + int(np.count_nonzero(orphan))


def _summarise(blocks: list[list[np.ndarray]], *, plan: _BlockPlan, params: _Params) -> tuple:
    """Pass 1 of one block: ``((count, sizes), shell)``; the shell holds the rim's labels."""
    labels, count = _split_region(blocks, plan, params)
    sizes = np.bincount(labels[plan.core].ravel(), minlength=count + 1)[1:]
    return (count, sizes), Shell.of(labels[plan.rim], plan.rim_origin, width=2)


def _relabel(
    blocks: list[list[np.ndarray]], lut: np.ndarray, *, plan: _BlockPlan, params: _Params
) -> np.ndarray:
    """Pass 2 of one block: split it again and map its own voxels through its lookup slice."""
    labels, _ = _split_region(blocks, plan, params)
    return np.take(lut, labels[plan.core])


def _matching_pairs(
    shell_a: Shell, shell_b: Shell, box_a: np.ndarray, box_b: np.ndarray, offset: np.ndarray
) -> np.ndarray:
    """Local labels of blocks A and B that are each other's best overlap next to the border.

    On the voxels of A facing B (which B labelled in its halo) and those of B facing A (which
    A labelled in its halo), every voxel pairs A's label with B's.
    """
    a = np.concatenate([shell_a.take(box).ravel() for box in (box_a, box_b)])
    b = np.concatenate([shell_b.take(box).ravel() for box in (box_a, box_b)])
    pairs, counts = _merge.unique_pairs(a, b)
    return pairs[_best(pairs[:, 0], pairs[:, 1], counts) & _best(pairs[:, 1], pairs[:, 0], counts)]


def _best(key: np.ndarray, other: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per value of `key`, the row of largest count (smallest `other` among ties), as a mask."""
    order = np.lexsort((other, -counts, key))
    first = np.ones(len(order), dtype=bool)
    first[1:] = key[order][1:] != key[order][:-1]
    chosen = np.zeros(len(order), dtype=bool)
    chosen[order[first]] = True
    return chosen


# --------------------------------------------------------------------------- flooding


def flood(
    cost: np.ndarray, markers: np.ndarray, mask: np.ndarray, structure: np.ndarray
) -> np.ndarray:
    """Marker-controlled watershed whose ties do not depend on the rest of the array.

    The flooding of :func:`skimage.segmentation.watershed` (labels spread from the markers to
    unlabelled neighbours in `mask`, lowest `cost` first; a voxel takes the label of the
    neighbour that reached it first), with one difference: voxels of equal cost are taken in
    the order they were reached, the markers in raster order. scikit-image queues all markers
    with the same age, so which of two equal voxels comes first can depend on markers
    elsewhere in the array; here it does not, so a connected component of `mask` is split the
    same way in any crop of the array that holds it whole.

    Parameters
    ----------
    cost : numpy.ndarray, shape (Z, Y, X)
        Flooded from low to high.
    markers : numpy.ndarray of int, shape (Z, Y, X)
        Seeds (nonzero) and their labels; seeds outside `mask` are ignored.
    mask : numpy.ndarray of bool, shape (Z, Y, X)
        Where labels may spread.
    structure : numpy.ndarray of bool, shape (3, 3, 3)
        Which neighbours a label spreads to.

    Returns
    -------
    numpy.ndarray of int32, shape (Z, Y, X)
        The label of every voxel of `mask` reachable from a seed; 0 elsewhere.
    """
    mask = np.ascontiguousarray(mask, dtype=bool)
    labels = np.where(mask, markers, 0).astype(np.int32)
    steps = np.argwhere(structure) - 1
    steps = steps[np.any(steps != 0, axis=1)].astype(np.int64)
    _flood_kernel(np.ascontiguousarray(cost, dtype=np.float64), labels, mask, steps)
    return labels


@numba.njit(nogil=True, cache=True)
def _before(keys, ages, a, b):  # pragma: no cover - compiled
    return keys[a] < keys[b] or (keys[a] == keys[b] and ages[a] < ages[b])


@numba.njit(nogil=True, cache=True)
def _swap(keys, ages, where, a, b):  # pragma: no cover - compiled
    keys[a], keys[b] = keys[b], keys[a]
    ages[a], ages[b] = ages[b], ages[a]
    where[a], where[b] = where[b], where[a]


@numba.njit(nogil=True, cache=True)
def _push(keys, ages, where, size, key, age, index):  # pragma: no cover - compiled
    keys[size], ages[size], where[size] = key, age, index
    at = size
    while at > 0:
        parent = (at - 1) // 2
        if not _before(keys, ages, at, parent):
            break
        _swap(keys, ages, where, at, parent)
        at = parent
    return size + 1


@numba.njit(nogil=True, cache=True)
def _pop(keys, ages, where, size):  # pragma: no cover - compiled
    size -= 1
    _swap(keys, ages, where, 0, size)
    at = 0
    while True:
        child = 2 * at + 1
        if child >= size:
            break
        if child + 1 < size and _before(keys, ages, child + 1, child):
            child += 1
        if not _before(keys, ages, child, at):
            break
        _swap(keys, ages, where, at, child)
        at = child
    return size


@numba.njit(nogil=True, cache=True)
def _flood_kernel(cost, labels, mask, steps):  # pragma: no cover - compiled
    """Flood `labels` in place; a min-heap on (cost, age), ages unique, markers first."""
    nz, ny, nx = cost.shape
    cost_flat, labels_flat, mask_flat = cost.reshape(-1), labels.reshape(-1), mask.reshape(-1)
    capacity = max(np.count_nonzero(mask_flat), 1)
    keys = np.empty(capacity, np.float64)
    ages = np.empty(capacity, np.int64)
    where = np.empty(capacity, np.int64)
    size, age = 0, 0
    for i in range(labels_flat.size):
        if labels_flat[i] != 0:
            size = _push(keys, ages, where, size, cost_flat[i], age, i)
            age += 1
    while size > 0:
        i = where[0]
        size = _pop(keys, ages, where, size)
        z, y, x = i // (ny * nx), (i // nx) % ny, i % nx
        for s in range(steps.shape[0]):
            zz, yy, xx = z + steps[s, 0], y + steps[s, 1], x + steps[s, 2]
            if zz < 0 or zz >= nz or yy < 0 or yy >= ny or xx < 0 or xx >= nx:
                continue
            j = (zz * ny + yy) * nx + xx
            if not mask_flat[j] or labels_flat[j] != 0:
                continue
            labels_flat[j] = labels_flat[i]
            size = _push(keys, ages, where, size, cost_flat[j], age, j)
            age += 1

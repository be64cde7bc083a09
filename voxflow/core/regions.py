"""Atlas regions: a region hierarchy, atlas volumes, and object counts and densities per region.

An atlas is a 3-D integer array of region ids (0 outside every region) on a voxel grid with a
scale and translation in micrometres: voxel ``i`` is centred at ``translation + i × scale``
and covers ``[t + (i − ½) s, t + (i + ½) s)``. A region table (`REGION_COLUMNS`) names the
ids and links each to its parent; counts and volumes of a region cover the region and every
region below it. Without a table, every atlas id is a region of its own.

Left and right. With a split axis, a voxel or point is on the *left* when its physical
coordinate along that axis is below the midline (by default the centre of the atlas box along
the axis, see :func:`atlas_midline`) and on the *right* otherwise, a point exactly on the
midline included.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence

import dask
import dask.array as da
import numpy as np
import pandas as pd

from voxflow.core.objects import _validate_points, _validate_shape, _validate_vector

__all__ = [
    "REGION_COLUMNS",
    "assign_regions",
    "atlas_midline",
    "atlas_volumes",
    "check_atlas_overlap",
    "quantify_regions",
    "side_of",
    "validate_region_table",
]

REGION_COLUMNS = ("id", "acronym", "name", "parent_id")
_NDIM = 3
_UM3_PER_MM3 = 1e9
_OUTSIDE = {"id": 0, "acronym": "outside", "name": "outside the atlas regions"}
_SIDES = ("left", "right")


# --------------------------------------------------------------------------- region table


def _as_ids(values: pd.Series, name: str) -> np.ndarray:
    """Integer-valued entries of a column as int64; ValueError naming the first bad one."""
    numeric = pd.to_numeric(values, errors="coerce")
    as_float = numeric.to_numpy(np.float64, na_value=np.nan)
    bad = ~np.isfinite(as_float) | (as_float != np.round(as_float))
    if bad.any() or pd.api.types.is_bool_dtype(values):
        first = (values[bad] if bad.any() else values).tolist()[0]
        raise ValueError(f"`table` column {name!r} must hold integers, got {first!r}")
    return numeric.to_numpy(np.int64)


def _check_acyclic(ids: np.ndarray, parents: dict[int, int | None]) -> None:
    """ValueError when following parents from some region comes back to it."""
    for start in ids:
        seen, rid = set(), int(start)
        while rid is not None:
            if rid in seen:
                raise ValueError(f"`table` parent_id forms a cycle through region {rid}")
            seen.add(rid)
            rid = parents[rid]


def validate_region_table(table: pd.DataFrame) -> pd.DataFrame:
    """Check a region table and return a normalised copy.

    Parameters
    ----------
    table : pandas.DataFrame
        At least the columns ``id``, ``acronym``, ``name`` and ``parent_id``. Ids are unique
        positive integers; ``parent_id`` is empty (None, NaN or NA) for a root and otherwise
        the id of another row. Further columns are kept.

    Returns
    -------
    pandas.DataFrame
        A copy with a fresh index, ``id`` as int64, ``parent_id`` as nullable Int64 and
        ``acronym`` and ``name`` as str.

    Raises
    ------
    TypeError
        When `table` is not a DataFrame.
    ValueError
        When a column is missing, an id is not a positive integer or is repeated, a parent id
        is not in the table, or the parents form a cycle.
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"`table` must be a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in REGION_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"`table` needs the columns {REGION_COLUMNS}, missing {missing}")
    out = table.reset_index(drop=True).copy()
    ids = _as_ids(out["id"], "id")
    if np.any(ids <= 0):
        raise ValueError(f"`table` ids must be positive, got {int(ids[ids <= 0][0])}")
    unique, counts = np.unique(ids, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"`table` ids must be unique, got repeated {unique[counts > 1].tolist()}")
    root = out["parent_id"].isna().to_numpy()
    parent = np.zeros(ids.size, np.int64)
    parent[~root] = _as_ids(out["parent_id"][~root], "parent_id")
    unknown = ~root & ~np.isin(parent, ids)
    if unknown.any():
        raise ValueError(
            f"`table` parent_id must refer to an id in the table, got {parent[unknown].tolist()}"
        )
    parents = {int(i): (None if r else int(p)) for i, p, r in zip(ids, parent, root, strict=True)}
    _check_acyclic(ids, parents)
    out["id"] = ids
    out["parent_id"] = pd.array(np.where(root, pd.NA, parent).tolist(), dtype="Int64")
    out["acronym"] = out["acronym"].astype(str)
    out["name"] = out["name"].astype(str)
    return out


# --------------------------------------------------------------------------- atlas geometry


def _box(shape: Sequence[int], scale: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """Physical (lo, hi) per axis of a voxel grid, shape (2, 3)."""
    lo = translation - 0.5 * scale
    return np.stack([lo, lo + np.asarray(shape) * scale])


def _format_box(box: np.ndarray) -> str:
    return " × ".join(f"[{lo:g}, {hi:g})" for lo, hi in box.T) + " µm (z × y × x)"


def check_atlas_overlap(
    image_shape: Sequence[int],
    image_scale: Sequence[float],
    image_translation: Sequence[float],
    atlas_shape: Sequence[int],
    atlas_scale: Sequence[float],
    atlas_translation: Sequence[float],
) -> float:
    """Fraction of an image's physical box that an atlas covers.

    Voxel ``i`` of a grid covers ``[t + (i − ½) s, t + (i + ½) s)`` along each axis.

    Parameters
    ----------
    image_shape, atlas_shape : sequence of int
        Grid shapes (Z, Y, X).
    image_scale, atlas_scale : sequence of float
        Voxel sizes (z, y, x) in micrometres.
    image_translation, atlas_translation : sequence of float
        Centres (z, y, x) of voxel (0, 0, 0) in micrometres.

    Returns
    -------
    float
        Volume of the intersection of the two boxes over the volume of the image box, in
        (0, 1].

    Raises
    ------
    ValueError
        When the boxes do not intersect (the message gives both in µm), or an argument is not
        three valid values.
    """
    image = _box(
        _validate_shape(image_shape, "image_shape"),
        _validate_vector(image_scale, "image_scale", positive=True),
        _validate_vector(image_translation, "image_translation", positive=False),
    )
    atlas = _box(
        _validate_shape(atlas_shape, "atlas_shape"),
        _validate_vector(atlas_scale, "atlas_scale", positive=True),
        _validate_vector(atlas_translation, "atlas_translation", positive=False),
    )
    width = np.minimum(image[1], atlas[1]) - np.maximum(image[0], atlas[0])
    if np.any(width <= 0):
        raise ValueError(
            f"the atlas box {_format_box(atlas)} does not overlap the image box "
            f"{_format_box(image)}; check the scale and translation of both"
        )
    return float(np.prod(width) / np.prod(image[1] - image[0]))


def atlas_midline(
    shape: Sequence[int], scale: Sequence[float], translation: Sequence[float], axis: int
) -> float:
    """Physical centre of an atlas box along one axis, the default left/right boundary.

    Parameters
    ----------
    shape : sequence of int
        Atlas shape (Z, Y, X).
    scale, translation : sequence of float
        Atlas voxel size and centre of voxel (0, 0, 0), (z, y, x), in micrometres.
    axis : int
        0, 1 or 2.

    Returns
    -------
    float
        ``translation[axis] + (shape[axis] − 1) / 2 × scale[axis]`` in micrometres.
    """
    shape = _validate_shape(shape)
    scale = _validate_vector(scale, "scale", positive=True)
    translation = _validate_vector(translation, "translation", positive=False)
    axis = _validate_axis(axis, "axis")
    return float(translation[axis] + (shape[axis] - 1) / 2 * scale[axis])


def _validate_axis(axis: object, name: str) -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {type(axis).__name__}")
    if not 0 <= axis < _NDIM:
        raise ValueError(f"`{name}` must be 0, 1 or 2 (z, y or x), got {axis}")
    return int(axis)


def side_of(points_um: np.ndarray, axis: int, midline_um: float) -> np.ndarray:
    """Which points are on the left of a midline.

    Parameters
    ----------
    points_um : numpy.ndarray, shape (N, 3)
        Physical points (z, y, x) in micrometres.
    axis : int
        Axis (0, 1 or 2) across which left and right are told apart.
    midline_um : float
        Boundary along `axis` in micrometres, e.g. from :func:`atlas_midline`.

    Returns
    -------
    numpy.ndarray of bool, shape (N,)
        True (left) where ``points_um[:, axis] < midline_um``.
    """
    points = _validate_points(points_um, "points_um")
    axis = _validate_axis(axis, "axis")
    midline = _validate_midline(midline_um)
    return points[:, axis] < midline


def _validate_midline(midline_um: object) -> float:
    if isinstance(midline_um, bool) or not isinstance(midline_um, numbers.Real):
        raise TypeError(f"`midline_um` must be a number, got {type(midline_um).__name__}")
    if not np.isfinite(midline_um):
        raise ValueError(f"`midline_um` must be finite, got {midline_um}")
    return float(midline_um)


# --------------------------------------------------------------------------- atlas lookups


def _validate_atlas(atlas: object) -> np.ndarray | da.Array:
    if not isinstance(atlas, np.ndarray | da.Array):
        raise TypeError(f"`atlas` must be a NumPy or Dask array, got {type(atlas).__name__}")
    if atlas.ndim != _NDIM or atlas.dtype.kind not in "iu":
        raise ValueError(
            f"`atlas` must be a 3-D integer array (z, y, x), got {atlas.ndim}-D {atlas.dtype}"
        )
    return atlas


def _take(block: np.ndarray, local: np.ndarray) -> np.ndarray:
    return block[tuple(local.T)]


def _gather(atlas: da.Array, index: np.ndarray) -> np.ndarray:
    """``atlas[tuple(index.T)]``, reading only the blocks that hold an index."""
    ends = [np.cumsum(c) for c in atlas.chunks]
    which = tuple(np.searchsorted(e, index[:, d], side="right") for d, e in enumerate(ends))
    starts = np.stack([np.r_[0, e[:-1]][w] for e, w in zip(ends, which, strict=True)], axis=1)
    flat = np.ravel_multi_index(which, atlas.numblocks)
    # Points grouped by block: one sort, not one scan of all points per block.
    order = np.argsort(flat, kind="stable")
    blocks, first = np.unique(flat[order], return_index=True)
    groups = np.split(order, first[1:])
    delayed = atlas.to_delayed()
    take = dask.delayed(_take)
    tasks = [
        take(delayed[np.unravel_index(b, atlas.numblocks)], index[g] - starts[g])
        for b, g in zip(blocks, groups, strict=True)
    ]
    out = np.zeros(index.shape[0], np.int64)
    out[np.concatenate(groups)] = np.concatenate(dask.compute(*tasks))
    return out


def assign_regions(
    points_um: np.ndarray,
    atlas: np.ndarray | da.Array,
    *,
    scale: Sequence[float],
    translation: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Atlas id at the voxel nearest each physical point.

    Point ``p`` falls in atlas voxel ``floor((p − translation) / scale + 0.5)``.

    Parameters
    ----------
    points_um : numpy.ndarray, shape (N, 3)
        Points (z, y, x) in micrometres.
    atlas : numpy.ndarray or dask.array.Array of int, shape (Z, Y, X)
        Region ids. Of a Dask atlas only the blocks that hold a point are read.
    scale : sequence of float
        Atlas voxel size (z, y, x) in micrometres.
    translation : sequence of float, optional
        Centre (z, y, x) of atlas voxel (0, 0, 0) in micrometres.

    Returns
    -------
    numpy.ndarray of int64, shape (N,)
        Region id per point; 0 for points outside the atlas grid.

    Raises
    ------
    TypeError
        When `points_um` or `atlas` has the wrong type.
    ValueError
        When `points_um` is not (N, 3) finite, `atlas` is not a 3-D integer array, or `scale`
        or `translation` is not three finite numbers (`scale` positive).
    """
    points = _validate_points(points_um, "points_um")
    atlas = _validate_atlas(atlas)
    scale = _validate_vector(scale, "scale", positive=True)
    translation = _validate_vector(translation, "translation", positive=False)
    index = np.floor((points - translation) / scale + 0.5)
    inside = np.all((index >= 0) & (index < np.asarray(atlas.shape)), axis=1)
    index = index[inside].astype(np.int64)
    out = np.zeros(points.shape[0], np.int64)
    if not index.size:
        return out
    if isinstance(atlas, da.Array):
        out[inside] = _gather(atlas, index)
    else:
        out[inside] = atlas[tuple(index.T)]
    return out


def _sum_by_id(ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum `counts` over equal `ids`; sorted unique ids and int64 sums."""
    unique, inverse = np.unique(ids, return_inverse=True)
    sums = np.zeros(unique.size, np.int64)
    np.add.at(sums, inverse, counts)
    return unique, sums


def _block_volumes(
    block: np.ndarray, cut: tuple[int, int] | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Voxel counts per id of one block: of the whole block, or of its left and right parts."""
    if cut is None:
        return [np.unique(block, return_counts=True)]
    axis, n_left = cut
    before = (slice(None),) * axis
    parts = (block[(*before, slice(0, n_left))], block[(*before, slice(n_left, None))])
    return [np.unique(p, return_counts=True) for p in parts]


def atlas_volumes(
    atlas: np.ndarray | da.Array,
    *,
    scale: Sequence[float],
    translation: Sequence[float] = (0.0, 0.0, 0.0),
    split_axis: int | None = None,
    midline_um: float | None = None,
) -> pd.DataFrame:
    """Voxels and volume of every id in an atlas, optionally per side of a midline.

    Ids are counted per block (``np.unique``) and the counts combined, so ids can be
    arbitrarily large.

    Parameters
    ----------
    atlas : numpy.ndarray or dask.array.Array of int, shape (Z, Y, X)
        Region ids, 0 outside every region.
    scale : sequence of float
        Atlas voxel size (z, y, x) in micrometres.
    translation : sequence of float, optional
        Centre (z, y, x) of atlas voxel (0, 0, 0) in micrometres.
    split_axis : int or None, optional
        Axis (0, 1 or 2) across which left and right are told apart; None: no split.
    midline_um : float or None, optional
        Boundary along `split_axis` in micrometres: a voxel is on the left when the
        coordinate of its centre is below it, on the right otherwise. None: the centre of the
        atlas box along `split_axis` (:func:`atlas_midline`). Ignored without `split_axis`.

    Returns
    -------
    pandas.DataFrame
        One row per id present, 0 included, sorted by id: ``id``, ``voxels`` (int64),
        ``volume_mm3``; with `split_axis` also ``voxels_left``, ``voxels_right``,
        ``volume_left_mm3`` and ``volume_right_mm3``.

    Raises
    ------
    TypeError
        When `atlas`, `split_axis` or `midline_um` has the wrong type.
    ValueError
        When `atlas` is not a 3-D integer array, `split_axis` is not 0, 1 or 2, or `scale`,
        `translation` or `midline_um` is not finite (`scale` positive).
    """
    atlas = _validate_atlas(atlas)
    scale = _validate_vector(scale, "scale", positive=True)
    translation = _validate_vector(translation, "translation", positive=False)
    cuts = _split_cuts(atlas, scale, translation, split_axis, midline_um)
    dask_atlas = atlas if isinstance(atlas, da.Array) else da.from_array(atlas, chunks=atlas.shape)
    volumes = dask.delayed(_block_volumes)
    parts = dask.compute(
        *(volumes(b, c) for b, c in zip(dask_atlas.to_delayed().ravel(), cuts, strict=True))
    )
    voxel_mm3 = float(np.prod(scale)) / _UM3_PER_MM3
    sides = (None,) if split_axis is None else _SIDES
    ids = np.unique(np.concatenate([u for part in parts for u, _ in part]))
    table = {"id": ids.astype(np.int64)}
    for k, side in enumerate(sides):
        got_ids, got = _sum_by_id(
            np.concatenate([part[k][0] for part in parts]),
            np.concatenate([part[k][1] for part in parts]),
        )
        suffix = "" if side is None else f"_{side}"
        voxels = np.zeros(ids.size, np.int64)
        voxels[np.searchsorted(ids, got_ids)] = got
        table[f"voxels{suffix}"] = voxels
    if split_axis is not None:
        table["voxels"] = table["voxels_left"] + table["voxels_right"]
    columns = ["id", "voxels", "volume_mm3"]
    if split_axis is not None:
        columns += ["voxels_left", "voxels_right", "volume_left_mm3", "volume_right_mm3"]
    for suffix in ("", *(f"_{s}" for s in sides if s is not None)):
        table[f"volume{suffix}_mm3"] = table[f"voxels{suffix}"] * voxel_mm3
    return pd.DataFrame(table)[columns]


def _split_cuts(atlas, scale, translation, split_axis, midline_um) -> list:
    """Per block (in `np.ndindex` order): None, or (axis, number of left voxels in the block)."""
    chunks = atlas.chunks if isinstance(atlas, da.Array) else tuple((n,) for n in atlas.shape)
    n_blocks = int(np.prod([len(c) for c in chunks]))
    if split_axis is None:
        return [None] * n_blocks
    axis = _validate_axis(split_axis, "split_axis")
    midline = (
        atlas_midline(atlas.shape, scale, translation, axis)
        if midline_um is None
        else _validate_midline(midline_um)
    )
    # The rule of `side_of` on voxel centres; centres grow along the axis, so left is a prefix.
    centres = translation[axis] + np.arange(atlas.shape[axis]) * scale[axis]
    n_left = int(np.count_nonzero(centres < midline))
    starts = np.r_[0, np.cumsum(chunks[axis])[:-1]]
    sizes = np.asarray(chunks[axis])
    left = np.clip(n_left - starts, 0, sizes)
    return [(axis, int(left[index[axis]])) for index in np.ndindex(*(len(c) for c in chunks))]


# --------------------------------------------------------------------------- quantification


def _validate_region_ids(region_ids: object) -> np.ndarray:
    if isinstance(region_ids, str | bytes) or not isinstance(region_ids, np.ndarray | Sequence):
        raise TypeError(f"`region_ids` must be an array, got {type(region_ids).__name__}")
    ids = np.asarray(region_ids)
    if ids.size == 0:
        return np.zeros(0, np.int64)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"`region_ids` must be a 1-D integer array, got {ids.ndim}-D {ids.dtype}")
    return ids.astype(np.int64)


def _validate_sides(sides: object, n: int) -> np.ndarray | None:
    if sides is None:
        return None
    if isinstance(sides, str | bytes) or not isinstance(sides, np.ndarray | Sequence):
        raise TypeError(f"`sides` must be a boolean array or None, got {type(sides).__name__}")
    got = np.asarray(sides)
    if got.size == 0 and n == 0:
        return np.zeros(0, bool)
    if got.dtype != bool or got.shape != (n,):
        raise ValueError(
            f"`sides` must be a boolean array of shape ({n},) like `region_ids`, "
            f"got {got.dtype} {got.shape}"
        )
    return got


def _validate_volumes(volumes: object, split: bool) -> pd.DataFrame:
    if not isinstance(volumes, pd.DataFrame):
        raise TypeError(f"`volumes` must be a pandas DataFrame, got {type(volumes).__name__}")
    needed = ["id", "volume_mm3"] + (["volume_left_mm3", "volume_right_mm3"] if split else [])
    missing = [c for c in needed if c not in volumes.columns]
    if missing:
        hint = " (`sides` needs atlas_volumes with `split_axis`)" if split else ""
        raise ValueError(f"`volumes` needs the columns {needed}, missing {missing}{hint}")
    ids = _as_ids(volumes["id"], "id") if len(volumes) else np.zeros(0, np.int64)
    if np.unique(ids).size != ids.size:
        raise ValueError("`volumes` ids must be unique, as from atlas_volumes")
    out = pd.DataFrame({c: volumes[c].to_numpy(np.float64) for c in needed[1:]}, index=ids)
    return out


def _per_id(region_ids: np.ndarray, volumes: pd.DataFrame, sides: np.ndarray | None):
    """Objects and volume of every id, without roll-up; index: every id seen, 0 included."""
    ids = np.union1d(np.union1d(volumes.index.to_numpy(), region_ids), [0]).astype(np.int64)
    frame = pd.DataFrame(0.0, index=ids, columns=_value_columns(sides is not None))
    frame.loc[volumes.index, volumes.columns] = volumes.to_numpy()
    groups = {"count": np.ones(region_ids.size, bool)}
    if sides is not None:
        groups.update(count_left=sides, count_right=~sides)
    for column, keep in groups.items():
        unique, counts = np.unique(region_ids[keep], return_counts=True)
        frame.loc[unique, column] = counts
    return frame


def _value_columns(split: bool) -> list[str]:
    columns = ["count", "volume_mm3"]
    if split:
        columns += ["count_left", "count_right", "volume_left_mm3", "volume_right_mm3"]
    return columns


def _roll_up(table: pd.DataFrame, per_id: pd.DataFrame) -> np.ndarray:
    """Values of each table region plus all its descendants, shape (regions, columns)."""
    ids = table["id"].to_numpy()
    row = {int(rid): k for k, rid in enumerate(ids)}
    parent = dict(zip(row, table["parent_id"].tolist(), strict=True))
    own = per_id.reindex(ids, fill_value=0.0).to_numpy()
    total = own.copy()
    for rid, k in row.items():
        ancestor = parent[rid]
        while ancestor is not None and ancestor is not pd.NA:
            total[row[int(ancestor)]] += own[k]
            ancestor = parent[int(ancestor)]
    return total


def _output_columns(split: bool) -> list[str]:
    columns = [*REGION_COLUMNS, "count", "volume_mm3", "density_per_mm3"]
    if split:
        columns += ["count_left", "count_right", "volume_left_mm3", "volume_right_mm3"]
        columns += ["density_left_per_mm3", "density_right_per_mm3"]
    return columns


def _with_densities(frame: pd.DataFrame, split: bool) -> pd.DataFrame:
    """Add count / volume columns (0 where the volume is 0); counts become int64."""
    for side in ("", *(f"_{s}" for s in _SIDES if split)):
        count, volume = frame[f"count{side}"].to_numpy(), frame[f"volume{side}_mm3"].to_numpy()
        frame[f"density{side}_per_mm3"] = np.divide(
            count, volume, out=np.zeros(volume.size), where=volume > 0
        )
        frame[f"count{side}"] = count.astype(np.int64)
    return frame[_output_columns(split)]


def _extra_rows(per_id: pd.DataFrame, extra: list[int], *, named: bool) -> pd.DataFrame:
    """Rows of `extra` ids, then of id 0 (outside every region), not rolled up.

    With a region table (`named`) the extra ids are those it does not list, labelled
    ``unlisted``; without one they are every id, each labelled by itself.
    """
    ids = [*extra, 0]
    rows = per_id.loc[ids].reset_index(drop=True)
    rows["id"] = ids
    if named:
        acronyms, names = ["unlisted"] * len(extra), [f"unlisted region {i}" for i in extra]
    else:
        acronyms, names = [str(i) for i in extra], [f"atlas region {i}" for i in extra]
    rows["acronym"] = [*acronyms, _OUTSIDE["acronym"]]
    rows["name"] = [*names, _OUTSIDE["name"]]
    rows["parent_id"] = pd.array([pd.NA] * len(ids), dtype="Int64")
    return rows


def _warn_unlisted(unlisted: list[int]) -> None:
    shown = ", ".join(map(str, unlisted[:20])) + (", …" if len(unlisted) > 20 else "")
    warnings.warn(
        f"{len(unlisted)} atlas id(s) are not in the region table and get 'unlisted' rows: {shown}",
        UserWarning,
        stacklevel=3,
    )


def quantify_regions(
    region_ids: np.ndarray,
    volumes: pd.DataFrame,
    table: pd.DataFrame | None = None,
    *,
    sides: np.ndarray | None = None,
) -> tuple[pd.DataFrame, list[int]]:
    """Objects, volume and density of every atlas region, rolled up the region hierarchy.

    Parameters
    ----------
    region_ids : numpy.ndarray of int, shape (N,)
        Atlas id of each object, from :func:`assign_regions` (0: outside every region).
    volumes : pandas.DataFrame
        From :func:`atlas_volumes`: ``id`` and ``volume_mm3``, and with `sides` also
        ``volume_left_mm3`` and ``volume_right_mm3`` (``split_axis`` given).
    table : pandas.DataFrame or None, optional
        Region table, see :func:`validate_region_table`. None, or a table without rows,
        names no region: every atlas id is then a region of its own, without a parent.
    sides : numpy.ndarray of bool, shape (N,), optional
        True where an object is on the left, from :func:`side_of` with the midline that
        `volumes` was split at; None: no per-side columns.

    Returns
    -------
    pandas.DataFrame
        One row per region of `table` (table order); then, sorted by id, one row per id in
        `volumes` or `region_ids` that `table` does not list (acronym ``"unlisted"``, name
        ``"unlisted region <id>"``, no parent); then id 0, ``"outside"``: objects outside
        every region and the volume of the atlas' 0 voxels. Columns ``id``, ``acronym``,
        ``name``, ``parent_id`` (Int64), ``count`` (int64), ``volume_mm3`` and
        ``density_per_mm3`` (count / volume, 0 where the volume is 0); with `sides` also
        ``count_left``, ``count_right``, ``volume_left_mm3``, ``volume_right_mm3``,
        ``density_left_per_mm3`` and ``density_right_per_mm3``. A region's counts and volumes
        cover the region itself and all its descendants. Without a region table: one row
        per id other than 0 in `volumes` or `region_ids`, sorted by id, labelled by the id
        (acronym ``"<id>"``, name ``"atlas region <id>"``, no parent, no roll-up), then
        id 0.
    list of int
        The unlisted ids, sorted; a warning names them when there are any. Empty without
        a region table: no id can be missing from a table that is not there.

    Raises
    ------
    TypeError
        When an argument has the wrong type.
    ValueError
        When `table` is not a valid region table, `volumes` lacks a column or repeats an id,
        `region_ids` is not 1-D integers, or `sides` does not match `region_ids`.
    """
    table = None if table is None else validate_region_table(table)
    region_ids = _validate_region_ids(region_ids)
    sides = _validate_sides(sides, region_ids.size)
    split = sides is not None
    per_id = _per_id(region_ids, _validate_volumes(volumes, split), sides)
    ids = per_id.index
    if table is None or table.empty:
        unlisted = []
        frame = _extra_rows(per_id, ids[ids != 0].astype(np.int64).tolist(), named=False)
    else:
        unlisted = ids[(ids != 0) & ~ids.isin(table["id"])].astype(np.int64).tolist()
        if unlisted:
            _warn_unlisted(unlisted)
        regions = pd.DataFrame(_roll_up(table, per_id), columns=per_id.columns)
        regions[list(REGION_COLUMNS)] = table[list(REGION_COLUMNS)]
        frame = pd.concat([regions, _extra_rows(per_id, unlisted, named=True)], ignore_index=True)
    frame["id"] = frame["id"].astype(np.int64)
    frame["parent_id"] = frame["parent_id"].astype("Int64")
    return _with_densities(frame, split), unlisted

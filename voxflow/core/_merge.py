"""The global step shared by the blockwise labellers: block pairs → union → one lookup.

A blockwise labeller labels every block of a chunked array on its own, so each block numbers its
objects ``1..count``. Three steps turn those local labels into one consistent labelling:

1. Pass 1 (:func:`resolve`). One task per block returns a summary: the count, the voxel count of
   every local label and a :class:`Shell`, the block's labels on its boundary slabs. One more task
   per block pairs its local labels with those of each forward neighbour (across faces, edges and
   corners), reading only two shells. A shell is freed once the pair tasks that read it have run,
   so memory follows the blocks in flight, not the volume.
2. The global step (:func:`global_lookup`). Global id = block offset + local label; connected
   components of the pair graph (``scipy.sparse.csgraph``); sizes summed per component; size
   filter; consecutive renumbering into one lookup, cut into one slice per block.
3. Pass 2 (:func:`lookup_array`). A lazy Dask array whose block tasks recompute the block's local
   labels and map them through that block's slice of the lookup; each task carries only its own
   slice, never the whole lookup.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph
from scipy import ndimage
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from voxflow.core._validate import validate_int

__all__ = [
    "Shell",
    "block_bounds",
    "global_lookup",
    "label_dtype",
    "lookup_array",
    "neighbour_offsets",
    "resolve",
    "unique_pairs",
    "validate_connectivity",
    "validate_mask",
    "validate_size_range",
]

_RANKS = {2: {4: 1, 8: 2}, 3: {6: 1, 18: 2, 26: 3}}
_UINT32_MAX = int(np.iinfo(np.uint32).max)

# A pair function maps (shell_a, shell_b, box_a, box_b, offset) to local label pairs (k, 2).
PairFunction = Callable[["Shell", "Shell", np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- validation


def validate_mask(mask: object, ndims: Sequence[int]) -> da.Array:
    """A Dask array of bool or integers; a NumPy array becomes one chunk."""
    if isinstance(mask, np.ndarray):
        mask = da.from_array(mask, chunks=mask.shape)
    elif not isinstance(mask, da.Array):
        raise TypeError(f"`mask` must be a NumPy or Dask array, got {type(mask).__name__}")
    if mask.ndim not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise ValueError(f"`mask` must have {want} dimensions, got {mask.ndim}")
    if mask.dtype != np.bool_ and mask.dtype.kind not in "iu":
        raise TypeError(f"`mask` must hold bool or integers (nonzero = object), got {mask.dtype}")
    return mask


def validate_connectivity(connectivity: object, ndim: int) -> np.ndarray:
    """The structuring element for a connectivity given as a neighbour count (6, 18, 26; 4, 8)."""
    valid = _RANKS[ndim]
    if isinstance(connectivity, bool) or not isinstance(connectivity, numbers.Integral):
        raise TypeError(
            f"`connectivity` must be an integer, got {connectivity!r} "
            f"({type(connectivity).__name__})"
        )
    if connectivity not in valid:
        raise ValueError(
            f"`connectivity` for a {ndim}-D mask must be one of {sorted(valid)}, got {connectivity}"
        )
    return ndimage.generate_binary_structure(ndim, valid[int(connectivity)])


def validate_size_range(min_size: object, max_size: object) -> tuple[int | None, int | None]:
    """Inclusive voxel-count bounds, each None or an integer >= 0, min <= max."""
    low = None if min_size is None else validate_int(min_size, "min_size", 0)
    high = None if max_size is None else validate_int(max_size, "max_size", 0)
    if low is not None and high is not None and low > high:
        raise ValueError(f"`min_size` ({low}) must not exceed `max_size` ({high})")
    return low, high


# --------------------------------------------------------------------------- geometry


def label_dtype(n: int) -> np.dtype:
    """The output dtype for labels ``0..n``: uint32 while they fit, else uint64.

    Parameters
    ----------
    n : int
        The largest label.

    Returns
    -------
    numpy.dtype
        ``uint32`` for ``n <= 2**32 - 1``, ``uint64`` above.
    """
    return np.dtype(np.uint32) if n <= _UINT32_MAX else np.dtype(np.uint64)


def block_bounds(chunks: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, ...]:
    """Per axis, the start of every block and the end of the last (``len(chunks) + 1`` values)."""
    return tuple(np.concatenate([[0], np.cumsum(c)]).astype(np.int64) for c in chunks)


def neighbour_offsets(structure: np.ndarray) -> list[tuple[int, ...]]:
    """Block offsets whose blocks can hold voxels adjacent under `structure`, forward half only.

    An offset is kept when `structure` links some voxel to one displaced by the offset on its
    nonzero axes; of ``d`` and ``-d`` only the one whose first nonzero entry is +1 is kept.
    """
    kept = []
    for offset in itertools.product((-1, 0, 1), repeat=structure.ndim):
        nonzero = [d for d in offset if d]
        if not nonzero or nonzero[0] < 0:
            continue
        view = structure[tuple(d + 1 if d else slice(None) for d in offset)]
        if np.any(view):
            kept.append(offset)
    return kept


def _contact_box(lo: list[int], hi: list[int], offset: Sequence[int]) -> list[list[int]]:
    """The voxels of block ``[lo, hi)`` that face the neighbour at `offset`: [starts, stops]."""
    start = [h - 1 if d > 0 else a for a, h, d in zip(lo, hi, offset, strict=True)]
    stop = [a + 1 if d < 0 else h for a, h, d in zip(lo, hi, offset, strict=True)]
    return [start, stop]


@dataclass(frozen=True)
class Shell:
    """A block's labels on the slabs along its faces, each with its global origin.

    Parameters
    ----------
    slabs : tuple of (tuple of int, numpy.ndarray)
        ``(origin, labels)`` per slab: the global index of the slab's first voxel and a copy of
        the labels there.
    """

    slabs: tuple[tuple[tuple[int, ...], np.ndarray], ...]

    @classmethod
    def of(cls, labels: np.ndarray, origin: Sequence[int], width: int) -> Shell:
        """The `width`-thick slabs at both ends of every axis of `labels`, placed at `origin`."""
        slabs = []
        for axis, n in enumerate(labels.shape):
            w = min(width, n)
            for start in sorted({0, n - w}):
                index = [slice(None)] * labels.ndim
                index[axis] = slice(start, start + w)
                at = [int(o) for o in origin]
                at[axis] += start
                # A copy: a view would keep the whole block alive.
                slabs.append((tuple(at), labels[tuple(index)].copy()))
        return cls(tuple(slabs))

    def take(self, box: np.ndarray) -> np.ndarray:
        """The labels in the global `box` ((2, ndim) bounds), read from a slab that holds it."""
        starts, stops = np.asarray(box).tolist()
        for origin, slab in self.slabs:
            lo = [a - o for a, o in zip(starts, origin, strict=True)]
            hi = [b - o for b, o in zip(stops, origin, strict=True)]
            if min(lo) >= 0 and all(h <= n for h, n in zip(hi, slab.shape, strict=True)):
                return slab[tuple(map(slice, lo, hi))]
        raise ValueError(f"no slab of the shell holds the box {[starts, stops]}")


def unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct pairs ``(a[i], b[i])`` with both nonzero, as (k, 2) int64, and their counts."""
    a, b = np.ravel(a), np.ravel(b)
    both = (a > 0) & (b > 0)
    # Local labels stay below 2**31, so one int64 key per pair orders and dedupes them at once.
    keys = (a[both].astype(np.int64) << 32) | b[both].astype(np.int64)
    keys, counts = np.unique(keys, return_counts=True)
    return np.stack([keys >> 32, keys & 0xFFFFFFFF], axis=1), counts


# --------------------------------------------------------------------------- pass 1


def _block_pairs(
    pair_fn: PairFunction, summary_a: tuple, summaries_b: list, geometry: np.ndarray
) -> tuple[tuple, list[np.ndarray]]:
    """Block A's ``(count, sizes)`` and its pairs with each neighbour.

    `geometry` holds one row per neighbour: box A, box B and the offset (twice, to stack).
    """
    shell_a = summary_a[1]
    pairs = [
        pair_fn(shell_a, summary_b[1], rows[0], rows[1], rows[2, 0])
        for summary_b, rows in zip(summaries_b, geometry, strict=True)
    ]
    return summary_a[0], pairs


def _neighbours(
    index: tuple[int, ...], bounds: tuple[np.ndarray, ...], offsets: list[tuple[int, ...]]
) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """The forward neighbours of block `index` and, per neighbour, box A, box B and offset."""
    numblocks = [len(b) - 1 for b in bounds]

    def extent(at: Sequence[int]) -> tuple[list[int], list[int]]:
        lo = [int(b[i]) for b, i in zip(bounds, at, strict=True)]
        hi = [int(b[i + 1]) for b, i in zip(bounds, at, strict=True)]
        return lo, hi

    lo, hi = extent(index)
    neighbours, geometry = [], []
    for offset in offsets:
        there = tuple(i + d for i, d in zip(index, offset, strict=True))
        if min(there) < 0 or any(t >= n for t, n in zip(there, numblocks, strict=True)):
            continue
        back = [-d for d in offset]
        geometry.append(
            [_contact_box(lo, hi, offset), _contact_box(*extent(there), back), [offset, offset]]
        )
        neighbours.append(there)
    return neighbours, np.array(geometry, dtype=np.int64).reshape(-1, 3, 2, len(bounds))


def _pass_one(
    summaries: dict[tuple[int, ...], tuple],
    dependencies: Sequence[da.Array],
    pair_fn: PairFunction,
    bounds: tuple[np.ndarray, ...],
    offsets: list[tuple[int, ...]],
    token: str,
) -> tuple[list, list[list[int]]]:
    """Compute pass 1: per block ``((count, sizes), pairs)``, and each block's partner indices.

    A raw graph, not ``dask.delayed`` calls: those cost milliseconds each, per block.
    """
    numblocks = tuple(len(b) - 1 for b in bounds)
    summary, paired = f"summary-{token}", f"pairs-{token}"
    layer: dict = {(summary, *index): task for index, task in summaries.items()}
    partners = []
    for index in np.ndindex(*numblocks):
        neighbours, geometry = _neighbours(index, bounds, offsets)
        partners.append([int(np.ravel_multi_index(n, numblocks)) for n in neighbours])
        layer[(paired, *index)] = (
            _block_pairs,
            pair_fn,
            (summary, *index),
            [(summary, *n) for n in neighbours],
            geometry,
        )
    layer[paired] = [(paired, *index) for index in np.ndindex(*numblocks)]
    graph = HighLevelGraph.from_collections(paired, layer, dependencies=list(dependencies))
    (results,) = dask.compute(Delayed(paired, graph, layer=paired))
    return results, partners


def resolve(
    summaries: dict[tuple[int, ...], tuple],
    dependencies: Sequence[da.Array],
    pair_fn: PairFunction,
    bounds: tuple[np.ndarray, ...],
    offsets: list[tuple[int, ...]],
    *,
    token: str,
    min_size: int | None,
    max_size: int | None,
) -> tuple[list[np.ndarray], int]:
    """Run pass 1 and the global step: per-block lookup slices and the number of objects.

    Parameters
    ----------
    summaries : dict
        Block index → Dask task tuple ``(function, *arguments)`` (arguments may name blocks of
        `dependencies` by key) that computes ``((count, sizes), shell)``: the number of local
        labels, the voxel count of labels ``1..count`` in the block's own voxels and the block's
        :class:`Shell`.
    dependencies : sequence of dask.array.Array
        The arrays whose blocks the summary tasks read.
    pair_fn : callable
        ``pair_fn(shell_a, shell_b, box_a, box_b, offset)`` → (k, 2) local label pairs that are
        one object; ``box_a`` and ``box_b`` are the global (2, ndim) bounds of the voxels of A
        that face B and of B that face A, ``offset`` the block offset from A to B.
    bounds : tuple of numpy.ndarray
        :func:`block_bounds` of the chunks.
    offsets : list of tuple of int
        Forward block offsets to pair, from :func:`neighbour_offsets`.
    token : str
        Names the graph's keys; deterministic in the inputs.
    min_size, max_size : int or None
        Inclusive bounds on an object's total voxel count.

    Returns
    -------
    luts : list of numpy.ndarray
        Per block (C order), the final label of local labels ``0..count``.
    n : int
        The number of objects kept.
    """
    results, partners = _pass_one(summaries, dependencies, pair_fn, bounds, offsets, token)
    counts = np.array([count for (count, _), _ in results], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    u, v = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for a, ((_, pairs), block_partners) in enumerate(zip(results, partners, strict=True)):
        for found, b in zip(pairs, block_partners, strict=True):
            u.append(starts[a] + found[:, 0])
            v.append(starts[b] + found[:, 1])
    sizes = np.concatenate([[0], *(sizes for (_, sizes), _ in results)]).astype(np.int64)
    edges = (np.concatenate(u), np.concatenate(v))
    lookup, n = global_lookup(sizes, edges, min_size=min_size, max_size=max_size)
    luts = [lookup[s : s + c + 1].copy() for s, c in zip(starts[:-1], counts, strict=True)]
    for lut in luts:
        lut[0] = 0
    return luts, n


# --------------------------------------------------------------------------- global step


def global_lookup(
    sizes: np.ndarray,
    edges: tuple[np.ndarray, np.ndarray],
    *,
    min_size: int | None = None,
    max_size: int | None = None,
) -> tuple[np.ndarray, int]:
    """Final labels for global ids: union of the edges, size filter, consecutive renumbering.

    Parameters
    ----------
    sizes : numpy.ndarray of int
        Voxel count of every global id; id 0 is the background.
    edges : tuple of numpy.ndarray
        ``(u, v)``: global ids that are one object.
    min_size, max_size : int or None
        Inclusive bounds on an object's total voxel count; objects of no voxels are always
        dropped.

    Returns
    -------
    lookup : numpy.ndarray
        ``lookup[id]`` is the final label of global id ``id`` (0: dropped or background); uint32,
        or uint64 past ``2**32 - 1`` objects.
    n : int
        The number of objects kept, labelled ``1..n``.
    """
    n_ids = len(sizes)
    u, v = edges
    graph = coo_array((np.ones(len(u), np.int8), (u, v)), shape=(n_ids, n_ids))
    n_components, component = connected_components(graph, directed=False)
    # float64 sums are exact for any volume below 2**53 voxels.
    total = np.rint(np.bincount(component, weights=sizes, minlength=n_components))
    keep = total > 0
    if min_size is not None:
        keep &= total >= min_size
    if max_size is not None:
        keep &= total <= max_size
    n = int(np.count_nonzero(keep))
    final = np.zeros(n_components, dtype=label_dtype(n))
    final[keep] = np.arange(1, n + 1, dtype=final.dtype)
    return final[component], n


# --------------------------------------------------------------------------- pass 2


def lookup_array(
    name: str,
    tasks: dict[tuple[int, ...], tuple],
    like: da.Array,
    dtype: np.dtype,
    dependencies: Sequence[da.Array],
) -> da.Array:
    """A Dask array with the chunks of `like` whose block ``index`` is computed by ``tasks[index]``.

    Each task is a Dask task tuple ``(function, *arguments)``; arguments may name blocks of the
    `dependencies` by key.
    """
    layer = {(name, *index): task for index, task in tasks.items()}
    graph = HighLevelGraph.from_collections(name, layer, dependencies=list(dependencies))
    meta = np.empty((0,) * like.ndim, dtype=dtype)
    return da.Array(graph, name, chunks=like.chunks, dtype=dtype, meta=meta)

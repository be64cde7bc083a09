"""Foreground masks from intensity: global thresholds from a blockwise histogram, local ones.

A global threshold is estimated apart from being applied, as in scikit-image: a histogram is
gathered block by block (two passes over the data, never the whole array in memory), a number
is derived from it (:func:`threshold_from_histogram`), and :func:`apply_threshold` turns it into
a mask, ``image > value``. For integer images every integer value from the minimum to the
maximum gets its own bin, so the thresholds are the ones scikit-image finds on the whole array.

A local threshold (:func:`threshold_local`) is a chunk-local filter: one ``map_overlap`` whose
depth is the support of the kernel, so the Dask mask equals the whole-array mask.
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Callable, Sequence

import dask
import dask.array as da
import numba
import numpy as np
import skimage.filters

from voxflow.core._validate import validate_choice
from voxflow.core._validate import validate_int as _validate_int

__all__ = [
    "ThresholdMethod",
    "apply_threshold",
    "global_threshold",
    "histogram",
    "threshold_from_histogram",
    "threshold_local",
    "uniform_bin_counts",
]

# Above this span an integer image is binned like a float one: one bin per value would make a
# histogram larger than many blocks.
_MAX_INTEGER_SPAN = 2**16
_DEFAULT_NBINS = 256
# scikit-image's Gaussian for `threshold_local` keeps the SciPy default truncation.
_GAUSSIAN_TRUNCATE = 4.0
_LOCAL_METHODS = ("gaussian", "mean", "median")
_LOCAL_MODES = ("reflect", "constant", "nearest", "mirror", "wrap")


class ThresholdMethod(enum.StrEnum):
    """How a global threshold is derived from an intensity histogram.

    The value is what goes into configuration and metadata.
    """

    OTSU = "otsu"
    LI = "li"
    TRIANGLE = "triangle"


# --------------------------------------------------------------------------- validation


def _validate_image(image: object, name: str = "image") -> da.Array:
    """A NumPy or Dask array of integers or floats, as a Dask array."""
    if not isinstance(image, np.ndarray | da.Array):
        raise TypeError(f"`{name}` must be a NumPy or Dask array, got {type(image).__name__}")
    if image.dtype.kind not in "iuf":
        raise TypeError(f"`{name}` must hold integers or floats, got dtype {image.dtype}")
    return image if isinstance(image, da.Array) else da.asarray(image)


def _validate_method(method: object) -> ThresholdMethod:
    return validate_choice(method, ThresholdMethod, "method")


def _validate_real(value: object, name: str) -> float:
    """A finite real number as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {value!r} ({type(value).__name__})")
    got = float(value)
    if not math.isfinite(got):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")
    return got


def _validate_histogram(counts: object, centers: object) -> tuple[np.ndarray, np.ndarray]:
    """Counts and centres as float64, trimmed of empty bins at both ends."""
    counts = np.asarray(counts)
    centers = np.asarray(centers)
    if counts.dtype.kind not in "iuf" or centers.dtype.kind not in "iuf":
        raise TypeError(
            f"`counts` and `centers` must be numeric, got {counts.dtype} and {centers.dtype}"
        )
    if counts.ndim != 1 or counts.shape != centers.shape:
        raise ValueError(
            "`counts` and `centers` must be 1-D arrays of one length, "
            f"got shapes {counts.shape} and {centers.shape}"
        )
    counts, centers = counts.astype(np.float64), centers.astype(np.float64)
    if not (np.all(np.isfinite(counts)) and np.all(counts >= 0)):
        raise ValueError("`counts` must be finite and non-negative")
    if not np.all(np.isfinite(centers)) or np.any(np.diff(centers) <= 0):
        raise ValueError("`centers` must be finite and strictly increasing")
    full = np.flatnonzero(counts)
    if full.size == 0:
        return counts[:0], centers[:0]
    return counts[full[0] : full[-1] + 1], centers[full[0] : full[-1] + 1]


def _validate_block_size(block_size: object, ndim: int) -> tuple[int, ...]:
    """One odd positive integer per axis."""
    if isinstance(block_size, Sequence) and not isinstance(block_size, str | bytes):
        sizes = tuple(block_size)
        if len(sizes) != ndim:
            raise ValueError(
                f"`block_size` needs one odd integer per axis ({ndim}), got {tuple(block_size)}"
            )
    else:
        sizes = (block_size,) * ndim
    sizes = tuple(_validate_int(b, "block_size", 1) for b in sizes)
    if any(b % 2 == 0 for b in sizes):
        raise ValueError(f"`block_size` must be odd along every axis, got {block_size!r}")
    return sizes


def _validate_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


# --------------------------------------------------------------------------- histogram


def _finite_range(image: da.Array) -> tuple[object, object]:
    """Minimum and maximum over the finite voxels, as scalars of the image dtype."""
    if image.size == 0:
        return None, None
    if image.dtype.kind == "f":
        finite = da.isfinite(image)
        low = da.where(finite, image, np.inf).min()
        high = da.where(finite, image, -np.inf).max()
    else:
        low, high = image.min(), image.max()
    low, high = dask.compute(low, high)
    if not (np.isfinite(low) and np.isfinite(high)):
        return None, None
    return image.dtype.type(low), image.dtype.type(high)


def _integer_counts(block: np.ndarray, low: object, nbins: int, ndim: int) -> np.ndarray:
    """Counts of every integer value ``low .. low + nbins - 1`` in one block."""
    if block.dtype.kind == "u":
        # Unsigned subtraction cannot overflow here: every value is >= low.
        offsets = (block - block.dtype.type(low)).astype(np.intp)
    else:
        offsets = block.astype(np.int64) - int(low)
    counts = np.bincount(offsets.ravel(), minlength=nbins).astype(np.int64)
    return counts.reshape((1,) * ndim + (nbins,))


def _binned_counts(block: np.ndarray, low: object, high: object, nbins: int) -> np.ndarray:
    """Counts of one block in `nbins` equal bins over ``[low, high]``; non-finite values drop."""
    # The range as scalars of the image dtype makes NumPy bin every block exactly as it bins
    # the whole array when it finds the range itself.
    if block.dtype in (np.float32, np.float64):
        counts, _ = uniform_bin_counts(block, low, high, nbins)
    else:
        counts, _ = np.histogram(block, bins=nbins, range=(low, high))
    return counts.astype(np.int64).reshape((1,) * block.ndim + (nbins,))


def uniform_bin_counts(
    values: np.ndarray, low: np.floating, high: np.floating, nbins: int
) -> tuple[np.ndarray, np.ndarray]:
    """``numpy.histogram(values, bins=nbins, range=(low, high))`` in one compiled pass.

    For float32 or float64 `values` with `low` < `high`, both finite scalars of the values'
    dtype: the same bins to the last count, since each value goes through NumPy's own
    uniform-bin arithmetic (in the values' dtype) and its one-bin corrections against the
    same edges; values outside the range, NaN included, are left out. NumPy's pass over
    blocks of 65536 values takes several times longer.

    Returns
    -------
    counts : numpy.ndarray of int64, shape (nbins,)
    edges : numpy.ndarray of the values' dtype, shape (nbins + 1,)
    """
    edges = np.linspace(low, high, nbins + 1, endpoint=True, dtype=values.dtype)
    counts = np.zeros(nbins, np.int64)
    _bin_counts(np.ascontiguousarray(values).reshape(-1), low, high, edges, counts)
    return counts, edges


@numba.njit(nogil=True, cache=True)
def _bin_counts(values, low, high, edges, counts):  # pragma: no cover - compiled
    """Add each value in ``[low, high]`` to its bin, as NumPy's uniform-bin fast path does."""
    nbins = counts.size
    span = high - low
    scale = values.dtype.type(nbins)
    for i in range(values.size):
        x = values[i]
        if not (x >= low and x <= high):
            continue
        k = int(((x - low) / span) * scale)
        if k == nbins:
            k -= 1
        if x < edges[k]:
            k -= 1
        elif k != nbins - 1 and x >= edges[k + 1]:
            k += 1
        counts[k] += 1


def _sum_block_counts(image: da.Array, func: Callable, nbins: int, **kwargs) -> np.ndarray:
    """Per-block histograms from `func`, summed by a Dask tree reduction."""
    ndim = image.ndim
    chunks = (*((1,) * len(c) for c in image.chunks), (nbins,))
    per_block = image.map_blocks(
        func, **kwargs, nbins=nbins, chunks=chunks, new_axis=ndim, dtype=np.int64
    )
    (total,) = dask.compute(per_block.sum(axis=tuple(range(ndim))))
    return np.asarray(total, dtype=np.int64)


def histogram(
    image, *, nbins: int | None = None, value_range: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Intensity histogram of an image of any size, computed block by block.

    Two passes over the data: the minimum and maximum, then one histogram per block, summed.
    Both run through :func:`dask.compute`, so a Dask distributed client is used when one is
    active. Non-finite voxels (NaN, ±inf) are left out.

    Parameters
    ----------
    image : numpy.ndarray or dask.array.Array
        Integers or floats, any number of dimensions.
    nbins : int, optional
        Number of equal bins over ``[min, max]``. None: for an integer image whose values span
        at most 2**16, one bin per integer value from the minimum to the maximum (exact, as
        :func:`skimage.exposure.histogram` does for integers); otherwise 256 bins, with the
        edges and centres of :func:`skimage.exposure.histogram` for floats.
    value_range : tuple of float, optional
        The finite minimum and maximum of `image` when already known: the first pass is
        skipped. None: computed.

    Returns
    -------
    counts : numpy.ndarray of int64, shape (n,)
        Voxels per bin.
    centers : numpy.ndarray of float64, shape (n,)
        Centre of each bin. A constant image gives one bin centred on its value; an image
        without finite voxels gives two empty arrays.
    """
    image = _validate_image(image)
    nbins = None if nbins is None else _validate_int(nbins, "nbins", 1)
    image = image[None] if image.ndim == 0 else image
    if value_range is None:
        low, high = _finite_range(image)
    else:
        low, high = (image.dtype.type(v) for v in value_range)
    if low is None:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    if low == high:
        return np.array([image.size], np.int64), np.array([low], np.float64)
    if image.dtype.kind in "iu" and nbins is None and int(high) - int(low) <= _MAX_INTEGER_SPAN:
        span = int(high) - int(low) + 1
        counts = _sum_block_counts(image, _integer_counts, span, low=low, ndim=image.ndim)
        return counts, np.arange(int(low), int(high) + 1, dtype=np.float64)
    nbins = _DEFAULT_NBINS if nbins is None else nbins
    counts = _sum_block_counts(image, _binned_counts, nbins, low=low, high=high)
    edges = np.histogram_bin_edges(np.zeros(0, image.dtype), bins=nbins, range=(low, high))
    return counts, ((edges[:-1] + edges[1:]) / 2.0).astype(np.float64)


# --------------------------------------------------------------------------- global threshold


def _otsu(counts: np.ndarray, centers: np.ndarray) -> float:
    return float(skimage.filters.threshold_otsu(hist=(counts, centers)))


def _li(counts: np.ndarray, centers: np.ndarray) -> float:
    """Li's iterative minimum cross-entropy, on the histogram (skimage's integer path)."""
    low = centers[0]
    values = centers - low  # the logarithms need positive intensities
    # skimage stops at half the smallest intensity step: 0.5 for integers, half a bin here.
    tolerance = float(np.min(np.diff(values))) / 2
    t_next = float(np.average(values, weights=counts))
    t_curr = -2 * tolerance
    while abs(t_next - t_curr) > tolerance:
        t_curr = t_next
        foreground = values > t_curr
        if not foreground.any():
            break
        mean_fore = np.average(values[foreground], weights=counts[foreground])
        mean_back = np.average(values[~foreground], weights=counts[~foreground])
        if mean_back == 0:
            break
        t_next = float((mean_back - mean_fore) / (np.log(mean_back) - np.log(mean_fore)))
    return t_next + float(low)


def _triangle(counts: np.ndarray, centers: np.ndarray) -> float:
    """The triangle method on the histogram, step for step as skimage does it."""
    nbins = len(counts)
    arg_peak = int(np.argmax(counts))
    peak_height = counts[arg_peak]
    arg_low, arg_high = np.flatnonzero(counts)[[0, -1]]
    # The peak is joined to the end of its longer tail.
    flip = arg_peak - arg_low < arg_high - arg_peak
    if flip:
        counts = counts[::-1]
        arg_low = nbins - arg_high - 1
        arg_peak = nbins - arg_peak - 1
    width = arg_peak - arg_low
    x1 = np.arange(width)
    y1 = counts[x1 + arg_low]
    norm = np.sqrt(peak_height**2 + width**2)
    length = peak_height / norm * x1 - width / norm * y1
    arg_level = int(np.argmax(length)) + arg_low
    if flip:
        arg_level = nbins - arg_level - 1
    return float(centers[arg_level])


_METHODS: dict[ThresholdMethod, Callable[[np.ndarray, np.ndarray], float]] = {
    ThresholdMethod.OTSU: _otsu,
    ThresholdMethod.LI: _li,
    ThresholdMethod.TRIANGLE: _triangle,
}


def threshold_from_histogram(counts, centers, method: str | ThresholdMethod) -> float:
    """Global threshold derived from an intensity histogram.

    Parameters
    ----------
    counts : array_like, shape (n,)
        Voxels per bin, non-negative.
    centers : array_like, shape (n,)
        Bin centres, strictly increasing.
    method : {'otsu', 'li', 'triangle'} or ThresholdMethod
        'otsu': :func:`skimage.filters.threshold_otsu` on the histogram. 'li': Li's iterative
        minimum cross-entropy, weighted by the counts and started at the mean, stopping when
        the threshold moves by less than half a bin. 'triangle': the triangle method of
        :func:`skimage.filters.threshold_triangle`, on these bins.

    Returns
    -------
    float
        Foreground is ``image > threshold``. A histogram with a single non-empty bin (a
        constant image) has no meaningful threshold: its centre is returned, so the mask is
        empty. An empty histogram (no finite voxels) gives 0.0.

    Notes
    -----
    On the exact histogram of an integer image (see :func:`histogram`) the three methods give
    what scikit-image gives on the whole array; on binned histograms Li's threshold is that of
    the binned intensities.
    """
    method = _validate_method(method)
    counts, centers = _validate_histogram(counts, centers)
    if counts.size == 0:
        return 0.0
    if counts.size == 1:
        return float(centers[0])
    return _METHODS[method](counts, centers)


def global_threshold(image, method: str | ThresholdMethod = "otsu", *, nbins=None) -> float:
    """Global threshold of an image of any size, from its blockwise histogram.

    Parameters
    ----------
    image : numpy.ndarray or dask.array.Array
        Integers or floats, any number of dimensions.
    method : {'otsu', 'li', 'triangle'} or ThresholdMethod, optional
        See :func:`threshold_from_histogram`.
    nbins : int, optional
        See :func:`histogram`; None: exact for integer images, 256 bins otherwise.

    Returns
    -------
    float
        Foreground is ``image > threshold``. A constant image gives its value (an empty mask);
        an empty image, or one without finite voxels, gives 0.0.
    """
    method = _validate_method(method)
    counts, centers = histogram(image, nbins=nbins)
    return threshold_from_histogram(counts, centers, method)


def apply_threshold(image, value: float):
    """Foreground mask ``image > value``, the scikit-image convention.

    Parameters
    ----------
    image : numpy.ndarray or dask.array.Array
        Integers or floats.
    value : float
        Finite threshold, e.g. from :func:`global_threshold`.

    Returns
    -------
    numpy.ndarray or dask.array.Array of bool
        Same shape (and chunks, for a Dask array) and kind of array as `image`.
    """
    _validate_image(image)
    return image > _validate_real(value, "value")


# --------------------------------------------------------------------------- local threshold


def _local_depth(block_size: tuple[int, ...], method: str) -> tuple[int, ...]:
    """Voxels each side that the filter of `method` reads, per axis."""
    if method != "gaussian":
        return tuple(b // 2 for b in block_size)
    # skimage: sigma = (b - 1) / 6; SciPy reads int(truncate * sigma + 0.5) voxels each side,
    # more than b // 2 for most sizes.
    return tuple(int(_GAUSSIAN_TRUNCATE * (b - 1) / 6.0 + 0.5) for b in block_size)


def _local_mask(block: np.ndarray, block_size, method, offset, mode) -> np.ndarray:
    thresholds = skimage.filters.threshold_local(
        block, block_size, method=method, offset=offset, mode=mode
    )
    return block > thresholds


def threshold_local(
    image, block_size, *, method: str = "gaussian", offset: float = 0.0, mode: str = "reflect"
) -> da.Array:
    """Foreground where a voxel is brighter than its neighbourhood, computed blockwise.

    Equals ``image > skimage.filters.threshold_local(image, block_size, method, offset,
    mode)`` on the whole array, for any chunking: one ``map_overlap`` whose depth is the support
    of the filter, with no padding beyond the array so that `mode` treats its edges as
    scikit-image does.

    Parameters
    ----------
    image : numpy.ndarray or dask.array.Array
        Integers or floats, any number of dimensions.
    block_size : int or sequence of int
        Odd size of the neighbourhood, for every axis or per axis.
    method : {'gaussian', 'mean', 'median'}, optional
        'gaussian': a Gaussian of sigma ``(block_size - 1) / 6`` truncated at 4 sigma (it
        reads ``int(4 * sigma + 0.5)`` voxels each side); 'mean' and 'median': over the block.
    offset : float, optional
        Subtracted from the local statistic.
    mode : {'reflect', 'constant', 'nearest', 'mirror', 'wrap'}, optional
        How the filter extends the array beyond its edges ('constant': zeros).

    Returns
    -------
    dask.array.Array of bool
        Same shape and chunks as `image` (a NumPy image gives a single chunk).
    """
    image = _validate_image(image)
    block_size = _validate_block_size(block_size, image.ndim)
    method = _validate_choice(method, "method", _LOCAL_METHODS)
    mode = _validate_choice(mode, "mode", _LOCAL_MODES)
    offset = _validate_real(offset, "offset")
    # Reading further than the array is long adds nothing: the block is then the whole axis.
    depth = tuple(
        min(d, n) for d, n in zip(_local_depth(block_size, method), image.shape, strict=True)
    )
    mask = image.map_overlap(
        _local_mask,
        depth=depth,
        # 'wrap' reads the far side of the array; every other mode only the block itself.
        boundary="periodic" if mode == "wrap" else "none",
        dtype=bool,
        block_size=block_size,
        method=method,
        offset=offset,
        mode=mode,
    )
    # map_overlap merges chunks thinner than the depth; the mask keeps the image's chunks.
    return mask if mask.chunks == image.chunks else mask.rechunk(image.chunks)

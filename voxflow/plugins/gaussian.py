"""Bias-field correction by Gaussian-weighted smoothing of the low-resolution image."""

from __future__ import annotations

import concurrent.futures
import math
import os
from typing import Any

import dask.array as da
import numba
import numpy as np
from scipy import ndimage

from voxflow.plugins._field import (
    divide_field,
    normalise_field,
    offset_and_mask,
    require_estimate,
    validate_choice,
    validate_fullres,
    validate_lowres,
    validate_mask,
    validate_offset,
    validate_real,
)
from voxflow.plugins._spec import hookimpl
from voxflow.plugins.base import ScaledProcessingPlugin

__all__ = ["GaussianBiasFieldCorrection", "local_fit"]

_MODES = ("linear", "mean")
_UNITS = ("um", "voxel")
# The smoothing runs on blocks of voxels small enough to keep this many blocks per sigma: the
# field is then within about 1 % of the exact Gaussian smoothing (a relative error that stays
# far below that of any bias-field estimate).
_BLOCKS_PER_SIGMA = 4.0
# ... but no more blocks than this (14 moments of 8 bytes each: about 120 MB), so memory does
# not grow with the image; a larger image gets larger blocks, fewer per sigma. At the cap, a
# 256³ low-resolution image with sigma 8 voxels gets blocks of 3 × 3 × 2 voxels: its field
# stays within 1.5 % of the one on the 4-per-sigma grid (0.5 % at the 99th percentile), in a
# third of the time and half the memory.
_MAX_BLOCKS = 1 << 20
# Ridge on the local slopes (in units of sigma): keeps a flat or thin mask solvable, where it
# picks the fit with no slope across the mask, and is too small to bias anything else.
_RIDGE = 1e-9
# Where the mask's Gaussian weight falls below this fraction of its peak, the local fit has
# no data to stand on and the field continues the nearest fitted value instead.
_SUPPORT = 1e-2


# --------------------------------------------------------------------------- local fit


def _axis_view(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)


# Rows of the moment block: w, wf, then w u_i, w f u_i and w u_i u_j (i <= j) per axis.
_PAIRS = [(i, j) for i in range(3) for j in range(i, 3)]


def _axes3(coords: list[np.ndarray]) -> list[np.ndarray]:
    """Per-axis voxel coordinates (1D float64) of z, y, x; a 2D image is one plane at 0."""
    flat = [np.ascontiguousarray(c.ravel(), np.float64) for c in coords]
    return [np.zeros(1)] * (3 - len(coords)) + flat


def _over_slabs(run, units: int, unit: int, planes: int) -> None:
    """``run(z0, z1)`` over `planes` split into ranges of whole `unit`s, one per thread.

    Planes of voxels in whole blocks of planes, or the points of a grid (``unit`` 1).
    """
    workers = max(1, min(os.cpu_count() or 1, units))
    cuts = np.linspace(0, units, workers + 1).astype(int) * unit
    cuts[-1] = planes
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda k: run(cuts[k], cuts[k + 1]), range(workers)))


@numba.njit(cache=True, nogil=True)
def _block_moments(values, mask, cz, cy, cx, steps, z0, z1, out, offset):  # pragma: no cover
    """Add the moments of the masked voxels of planes ``z0 .. z1 − 1`` into their blocks.

    `out` is (14, Bz, By, Bx): w, wf, w u_a, w f u_a (a = z, y, x), then w u_a u_b for
    (zz, zy, zx, yy, yx, xx); u_a are the voxel coordinates `cz`, `cy`, `cx` and f the value
    less `offset` (in the values' own precision). One pass over the voxels, nothing of their
    size allocated.
    """
    _, ny, nx = values.shape
    sz, sy, sx = steps
    for z in range(z0, z1):
        bz, uz = z // sz, cz[z]
        for y in range(ny):
            by, uy = y // sy, cy[y]
            for x in range(nx):
                if not mask[z, y, x]:
                    continue
                bx, ux, f = x // sx, cx[x], values[z, y, x] - offset
                out[0, bz, by, bx] += 1.0
                out[1, bz, by, bx] += f
                out[2, bz, by, bx] += uz
                out[3, bz, by, bx] += uy
                out[4, bz, by, bx] += ux
                out[5, bz, by, bx] += f * uz
                out[6, bz, by, bx] += f * uy
                out[7, bz, by, bx] += f * ux
                out[8, bz, by, bx] += uz * uz
                out[9, bz, by, bx] += uz * uy
                out[10, bz, by, bx] += uz * ux
                out[11, bz, by, bx] += uy * uy
                out[12, bz, by, bx] += uy * ux
                out[13, bz, by, bx] += ux * ux


def _gaussian_weights(sigma: float) -> np.ndarray:
    """SciPy's Gaussian kernel: ``exp(-x² / 2σ²)`` for ``|x| <= int(4σ + 0.5)``, summing to 1."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / (sigma * sigma) * x * x)
    return weights / weights.sum()


@numba.njit(cache=True, nogil=True)
def _smooth_lines(src, weights, dst):  # pragma: no cover - compiled
    """Smooth (A, N, B) along N with symmetric `weights`, zero outside; B is the inner loop."""
    na, n, nb = src.shape
    r = (weights.size - 1) // 2
    centre = weights[r]
    for a in range(na):
        for i in range(n):
            out = dst[a, i]
            here = src[a, i]
            for b in range(nb):
                out[b] = centre * here[b]
            for t in range(1, min(r, max(i, n - 1 - i)) + 1):
                k = weights[r + t]
                if t <= i and i + t < n:
                    lo, hi = src[a, i - t], src[a, i + t]
                    for b in range(nb):
                        out[b] += k * (lo[b] + hi[b])
                else:
                    one = src[a, i - t] if t <= i else src[a, i + t]
                    for b in range(nb):
                        out[b] += k * one[b]


@numba.njit(cache=True, nogil=True)
def _smooth_rows(src, weights, dst):  # pragma: no cover - compiled
    """Smooth (A, N) along its contiguous N with symmetric `weights`, zero outside."""
    na, n = src.shape
    r = (weights.size - 1) // 2
    centre = weights[r]
    for a in range(na):
        row, out = src[a], dst[a]
        for j in range(n):
            out[j] = centre * row[j]
        for t in range(1, min(r, n - 1) + 1):
            k = weights[r + t]
            for j in range(n - t):
                out[j] += k * row[j + t]
            for j in range(t, n):
                out[j] += k * row[j - t]


def _gaussian_smooth(block: np.ndarray, sigma: list[float], spare: np.ndarray) -> np.ndarray:
    """``ndimage.gaussian_filter(block, sigma, mode="constant")``, in place, `spare` its size.

    One compiled pass per axis whose inner loop runs along contiguous memory: about twice as
    fast as SciPy's line-by-line filter for the wide kernels of the moment grid.
    """
    src, dst = block, spare
    for axis, s in enumerate(sigma):
        if s <= 1e-15:  # as SciPy: no smoothing along this axis
            continue
        weights = _gaussian_weights(s)
        if axis == block.ndim - 1:
            _smooth_rows(src.reshape(-1, block.shape[-1]), weights,
                         dst.reshape(-1, block.shape[-1]))  # fmt: skip
        else:
            lines = (math.prod(block.shape[:axis]), block.shape[axis], -1)
            _smooth_lines(src.reshape(lines), weights, dst.reshape(lines))
        src, dst = dst, src
    if src is not block:
        block[...] = src
    return block


def _moments(values, mask, coords, steps, sigma, mode="linear", offset=0.0):
    """Gaussian-weighted moments of (1, u, u u, f, f u) on the block grid, about the origin.

    f is ``values − offset``, subtracted voxel by voxel in the values' dtype.

    The block sums take one compiled pass over the masked voxels (slabs of whole blocks of
    planes on as many threads), so nothing of the image's size is made; the Gaussian then
    smooths the block sums that `mode` needs (``"mean"``: w and wf only).
    """
    ndim = values.ndim
    lead = 3 - ndim  # a 2D image is one plane of a 3D one
    vol, msk = values.reshape((1,) * lead + values.shape), mask.reshape((1,) * lead + mask.shape)
    step3 = (1,) * lead + tuple(steps)
    blocks = tuple(-(-n // k) for n, k in zip(vol.shape, step3, strict=True))
    sums = np.zeros((14, *blocks))
    vol, msk, axes = (
        np.ascontiguousarray(vol, vol.dtype if vol.dtype == np.float32 else np.float64),
        np.ascontiguousarray(msk),
        _axes3(coords),
    )
    # Whole blocks of planes per thread, so no two threads add into one block.
    shift = vol.dtype.type(offset)
    _over_slabs(lambda z0, z1: _block_moments(vol, msk, *axes, step3, z0, z1, sums, shift),
                blocks[0], step3[0], vol.shape[0])  # fmt: skip
    names = {0: "w", 1: "wf"}
    if mode == "linear":
        for i in range(ndim):
            names[2 + lead + i] = f"w{i}"
            names[5 + lead + i] = f"wf{i}"
        for row, (a, b) in enumerate(_PAIRS):
            if a >= lead and b >= lead:
                names[8 + row] = f"w{a - lead}{b - lead}"
    smooth = [s / k for s, k in zip(sigma, steps, strict=True)]

    workers = max(1, min(os.cpu_count() or 1, len(names)))
    spares = [np.empty(blocks) for _ in range(workers)]

    def reduce(k):
        # In place, with one spare array per thread: memory stays that of the block sums.
        for row in sorted(names)[k::workers]:
            block = sums[row].reshape(sums.shape[1 + lead :])
            _gaussian_smooth(block, smooth, spares[k].reshape(block.shape))

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(reduce, range(workers)))
    return {names[row]: sums[row].reshape(sums.shape[1 + lead :]) for row in sorted(names)}


def _solve(m: dict, centres: list[np.ndarray], mode: str, support: np.ndarray):
    """Intercept (at the origin) and slopes of the local fit at every supported block centre."""
    ndim = len(centres)
    s0 = m["w"]
    if mode == "mean":
        return m["wf"] / np.where(s0 > 0, s0, 1.0), np.zeros((ndim, *s0.shape))
    flat = [np.ascontiguousarray(m[k]).ravel() for k in ("w", "wf")]
    flat += [np.ascontiguousarray(m[f"w{i}"]).ravel() for i in range(ndim)]
    flat += [np.ascontiguousarray(m[f"wf{i}"]).ravel() for i in range(ndim)]
    flat += [np.ascontiguousarray(m[f"w{i}{j}"]).ravel() for i in range(ndim)
             for j in range(i, ndim)]  # fmt: skip
    axes = tuple(np.ascontiguousarray(c.ravel(), dtype=np.float64) for c in centres)
    axes += (np.zeros(1),) * (3 - ndim)
    shape = np.array(list(s0.shape) + [1] * (3 - ndim), dtype=np.int64)
    intercept = np.empty(s0.size)
    slopes = np.empty((ndim, s0.size))
    args = (tuple(flat), axes, shape, ndim, np.ascontiguousarray(support).ravel(), _RIDGE,
            intercept, slopes)  # fmt: skip
    # Points are independent: contiguous ranges of them on as many threads.
    _over_slabs(lambda p0, p1: _solve_points(*args, p0, p1), s0.size, 1, s0.size)
    return intercept.reshape(s0.shape), slopes.reshape((ndim, *s0.shape))


@numba.njit(cache=True, nogil=True)
def _solve_points(
    moments, axes, shape, ndim, support, ridge, intercept, slopes, start, stop
):  # pragma: no cover
    """Solve every point's (ndim + 1)² normal equations in place, without a batch of matrices.

    `moments` holds w, wf, w_i, wf_i and w_ij (i <= j), each flat over the block grid; the
    system is moved to the point's own centre (well conditioned), solved by Gaussian
    elimination with partial pivoting, and the intercept moved back to the origin.
    Unsupported points get zeros (their fit is replaced later). Only points ``start .. stop
    − 1`` are solved.
    """
    d = ndim + 1
    a = np.empty((d, d))
    b = np.empty(d)
    c = np.zeros(3)
    pair = np.zeros((3, 3), dtype=np.int64)
    k = 2 + 2 * ndim
    for i in range(ndim):
        for j in range(i, ndim):
            pair[i, j] = k
            pair[j, i] = k
            k += 1
    for p in range(start, stop):
        if not support[p]:
            intercept[p] = 0.0
            for i in range(ndim):
                slopes[i, p] = 0.0
            continue
        rest = p
        for axis in range(2, -1, -1):
            if axis < ndim:
                c[axis] = axes[axis][rest % shape[axis]]
                rest //= shape[axis]
        s0, f0 = moments[0][p], moments[1][p]
        a[0, 0] = s0
        b[0] = f0
        for i in range(ndim):
            si = moments[2 + i][p] - c[i] * s0
            a[0, i + 1] = si
            a[i + 1, 0] = si
            b[i + 1] = moments[2 + ndim + i][p] - c[i] * f0
            for j in range(i, ndim):
                sij = (moments[pair[i, j]][p] - c[i] * moments[2 + j][p]
                       - c[j] * moments[2 + i][p] + c[i] * c[j] * s0)  # fmt: skip
                a[i + 1, j + 1] = sij
                a[j + 1, i + 1] = sij
            a[i + 1, i + 1] += ridge * s0
        for col in range(d):
            best = col
            for row in range(col + 1, d):
                if abs(a[row, col]) > abs(a[best, col]):
                    best = row
            if best != col:
                for q in range(d):
                    a[col, q], a[best, q] = a[best, q], a[col, q]
                b[col], b[best] = b[best], b[col]
            for row in range(col + 1, d):
                factor = a[row, col] / a[col, col]
                for q in range(col, d):
                    a[row, q] -= factor * a[col, q]
                b[row] -= factor * b[col]
        for row in range(d - 1, -1, -1):
            total = b[row]
            for q in range(row + 1, d):
                total -= a[row, q] * b[q]
            b[row] = total / a[row, row]
        value = b[0]
        for i in range(ndim):
            slopes[i, p] = b[i + 1]
            value -= b[i + 1] * c[i]
        intercept[p] = value


def _extend(intercept, slopes, centres, support):
    """Beyond the support, continue the nearest supported fitted value, flat."""
    if support.all():
        return intercept, slopes
    value = intercept + sum(slopes[i] * centres[i] for i in range(len(centres)))
    nearest = ndimage.distance_transform_edt(~support, return_distances=False, return_indices=True)
    intercept = np.where(support, intercept, value[tuple(nearest)])
    slopes = np.where(support, slopes, 0.0)
    return intercept, slopes


def _interpolation(n: int, k: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per voxel along an axis: the block centres below and above it, and the upper's weight.

    Linear between centres, constant past the end centres.
    """
    pos = np.clip((np.arange(n) - (k - 1) / 2) / k, 0, size - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), max(size - 2, 0))
    return lo, np.minimum(lo + 1, size - 1), pos - lo


@numba.njit(cache=True, nogil=True, inline="always")
def _trilinear(a, z0, z1, tz, y0, y1, ty, x0, x1, tx):  # pragma: no cover
    lower = (a[z0, y0, x0] * (1 - tx) + a[z0, y0, x1] * tx) * (1 - ty)
    lower += (a[z0, y1, x0] * (1 - tx) + a[z0, y1, x1] * tx) * ty
    upper = (a[z1, y0, x0] * (1 - tx) + a[z1, y0, x1] * tx) * (1 - ty)
    upper += (a[z1, y1, x0] * (1 - tx) + a[z1, y1, x1] * tx) * ty
    return lower * (1 - tz) + upper * tz


@numba.njit(cache=True, nogil=True)
def _assemble(coarse, cz, cy, cx, lo, hi, wt, z0, z1, out):  # pragma: no cover
    """``out = c0 + c_z u_z + c_y u_y + c_x u_x`` at every voxel of planes ``z0 .. z1 − 1``.

    `coarse` is (4, Bz, By, Bx): the intercept and the slopes along z, y, x, each
    interpolated trilinearly between block centres (`lo`, `hi`, `wt` per axis).
    """
    _, ny, nx = out.shape
    c0, c1, c2, c3 = coarse[0], coarse[1], coarse[2], coarse[3]
    for z in range(z0, z1):
        za, zb, tz, uz = lo[0][z], hi[0][z], wt[0][z], cz[z]
        for y in range(ny):
            ya, yb, ty, uy = lo[1][y], hi[1][y], wt[1][y], cy[y]
            for x in range(nx):
                xa, xb, tx = lo[2][x], hi[2][x], wt[2][x]
                out[z, y, x] = (
                    _trilinear(c0, za, zb, tz, ya, yb, ty, xa, xb, tx)
                    + _trilinear(c1, za, zb, tz, ya, yb, ty, xa, xb, tx) * uz
                    + _trilinear(c2, za, zb, tz, ya, yb, ty, xa, xb, tx) * uy
                    + _trilinear(c3, za, zb, tz, ya, yb, ty, xa, xb, tx) * cx[x]
                )


def _to_field(intercept, slopes, shape, steps, coords, dtype=np.float64) -> np.ndarray:
    """The fitted plane of the nearest block centres, interpolated, at every voxel.

    Evaluated in float64 and stored as `dtype`.
    """
    ndim = len(shape)
    lead = 3 - ndim
    coarse = np.zeros((4, *((1,) * lead + intercept.shape)))
    coarse[0] = intercept.reshape(coarse.shape[1:])
    for i in range(ndim):
        coarse[1 + lead + i] = slopes[i].reshape(coarse.shape[1:])
    shape3, steps3 = (1,) * lead + tuple(shape), (1,) * lead + tuple(steps)
    axes = _axes3(coords)
    ramps = [_interpolation(n, k, b) for n, k, b in zip(shape3, steps3, coarse.shape[1:],
                                                        strict=True)]  # fmt: skip
    lo, hi, wt = (tuple(r[j] for r in ramps) for j in range(3))
    out = np.empty(shape3, dtype)
    _over_slabs(lambda z0, z1: _assemble(coarse, *axes, lo, hi, wt, z0, z1, out),
                shape3[0], 1, shape3[0])  # fmt: skip
    return out.reshape(shape)


def _block_steps(shape: tuple[int, ...], sigma: tuple[float, ...]) -> tuple[int, ...]:
    """Voxels per block and axis: four blocks per sigma, or fewer within `_MAX_BLOCKS`.

    Where the grid would exceed `_MAX_BLOCKS`, the axis with the most blocks grows first.
    """
    steps = [max(1, math.floor(s / _BLOCKS_PER_SIGMA)) for s in sigma]
    while math.prod(-(-n // k) for n, k in zip(shape, steps, strict=True)) > _MAX_BLOCKS:
        axis = max(range(len(shape)), key=lambda i: -(-shape[i] // steps[i]))
        steps[axis] += 1
    return tuple(steps)


_POSITION_TOLERANCE = 1e-9


def _voxel_positions(
    shape: tuple[int, ...], last_position: tuple[float, ...] | None
) -> list[np.ndarray]:
    """Voxel positions per axis: ``0 .. n - 1``, the last moved to `last_position`."""
    positions = [np.arange(n, dtype=np.float64) for n in shape]
    if last_position is None:
        return positions
    last = tuple(float(v) for v in last_position)
    if len(last) != len(shape):
        raise ValueError(
            f"`last_position` needs one value per axis ({len(shape)}), got {last_position}"
        )
    for axis, (p, n, v) in enumerate(zip(positions, shape, last, strict=True)):
        # A position computed from physical coordinates may be off n - 1 by a rounding error.
        if not (n - 2 < v <= n - 1 + _POSITION_TOLERANCE):
            raise ValueError(
                f"`last_position` along axis {axis} must lie in ({n - 2}, {n - 1}], got {v}"
            )
        p[-1] = min(v, n - 1)
    return positions


def local_fit(
    values: np.ndarray,
    mask: np.ndarray,
    sigma: tuple[float, ...],
    *,
    mode: str = "linear",
    dtype: np.dtype | type = np.float64,
    offset: float = 0.0,
    last_position: tuple[float, ...] | None = None,
) -> np.ndarray:
    """Smooth `values` over `mask` with a Gaussian window, by a local fit at every voxel.

    ``mode="mean"`` is normalised convolution: the Gaussian-weighted mean of the masked
    values, ``G(m f) / G(m)``. ``mode="linear"`` fits a plane to the masked values under the
    Gaussian window (locally weighted linear regression) and takes its value at the voxel:
    the mean is pulled towards the inside of the mask near its edge, the plane is not, so a
    linear trend is reproduced exactly up to the edge of the mask. For a wide window the
    moments are computed on blocks of voxels (about four blocks per sigma, fewer where that
    would make more than 1 M blocks, so memory stays bounded) and the fit is interpolated
    linearly back to every voxel; the voxel coordinates enter the moments exactly, so linear
    trends stay exact. Away from the mask (its Gaussian weight below 1 % of its peak) the
    nearest fitted value continues unchanged.

    Parameters
    ----------
    values : ndarray, shape ([Z,] Y, X)
        Values to smooth; those outside `mask` are ignored.
    mask : ndarray of bool, shape of `values`
        The voxels to fit; at least one.
    sigma : tuple of float
        Standard deviation of the Gaussian window in voxels, one per axis, each > 0.
    mode : {"linear", "mean"}, optional
        Local model: a plane or a constant.
    dtype : {float64, float32}, optional
        Dtype of the result; the fit itself runs in float64 either way.
    offset : float, optional
        Subtracted from every value first (in the values' dtype, voxel by voxel, so no
        shifted copy of `values` is made): the fit is that of ``values - offset``.
    last_position : tuple of float, optional
        Position of the last voxel along each axis, in voxels from the first, where it is
        not ``n - 1``: the last voxel of a block mean whose last block was partial sits up
        to half a voxel closer (:attr:`voxflow.core.ScaleContext.last_position`). The fit
        takes that voxel's value at that position and returns the plane's value there, so
        a linear trend stays exact up to the array's edge. None: the regular grid.

    Returns
    -------
    ndarray of `dtype`, shape of `values`
        The smoothed values, everywhere.

    Raises
    ------
    ValueError
        If `last_position` has not one value per axis, or one does not lie after the last
        but one voxel and at most at ``n - 1``.
    """
    ndim = values.ndim
    steps = _block_steps(values.shape, sigma)
    positions = _voxel_positions(values.shape, last_position)
    # Coordinates in units of sigma, centred on the array: well conditioned moments.
    coords = [
        _axis_view((p - (n - 1) / 2) / s, i, ndim)
        for i, (p, n, s) in enumerate(zip(positions, values.shape, sigma, strict=True))
    ]
    m = _moments(values, mask, coords, steps, sigma, mode, offset)
    coarse_shape = m["w"].shape
    centres = [
        _axis_view(((np.arange(c) * k + (k - 1) / 2) - (n - 1) / 2) / s, i, ndim)
        for i, (c, k, n, s) in enumerate(zip(coarse_shape, steps, values.shape, sigma, strict=True))
    ]
    support = m["w"] >= _SUPPORT * m["w"].max()
    intercept, slopes = _solve(m, centres, mode, support)
    del m  # the moments are the largest arrays here; the field needs none of them
    intercept, slopes = _extend(intercept, slopes, centres, support)
    return _to_field(intercept, slopes, values.shape, steps, coords, np.dtype(dtype))


# --------------------------------------------------------------------------- plugin


class GaussianBiasFieldCorrection(ScaledProcessingPlugin):
    """Multiplicative bias field from Gaussian-weighted smoothing of the low-resolution image.

    The estimate subtracts the dark level `offset` from the low-resolution image, smooths it
    over the foreground `mask` with a Gaussian window of standard deviation `sigma`
    (:func:`local_fit`; anisotropic spacing is honoured), and normalises the result to mean 1
    over the foreground, floored at 0.001. The full-resolution image is corrected as
    ``offset + (full - offset) / field``: plain division when the offset is 0, and corrected
    intensities stay in the input's units.

    Parameters
    ----------
    sigma : float, optional
        Width of the window, > 0: micrometres (``units="um"``; the context's units are
        converted) or full-resolution voxels (``units="voxel"``). The default suits
        illumination that varies over hundreds of micrometres; a smaller window follows
        faster variation but also more of the tissue's own structure.
    units : {"um", "voxel"}, optional
        Unit of `sigma`.
    mode : {"linear", "mean"}, optional
        Local model under the window: ``"linear"`` (a plane: no pull towards the inside
        at the edge of the tissue) or ``"mean"`` (masked normalised Gaussian smoothing).
    mask : {"otsu", "all"}, float or ndarray of bool, optional
        Foreground the field is estimated from and normalised over: Otsu threshold of the
        low-resolution image with holes filled, every voxel, voxels above a threshold (input
        units), or a boolean array of the low-resolution shape.
    offset : float or None, optional
        Dark level (camera offset) under the multiplicative field. None derives it from the
        data: the 0.5th percentile of the low-resolution image, i.e. the background around
        the sample; pass 0 for an image whose offset was removed (plain division).

    Examples
    --------
    >>> GaussianBiasFieldCorrection(sigma=150.0)
    GaussianBiasFieldCorrection(sigma=150.0, units='um', mode='linear', mask='otsu', offset=None)
    """

    def __init__(
        self,
        sigma: float = 200.0,
        units: str = "um",
        mode: str = "linear",
        mask: Any = "otsu",
        offset: float | None = None,
    ) -> None:
        self.sigma = validate_real(sigma, "sigma", low=0.0, open_low=True)
        self.units = validate_choice(units, "units", _UNITS)
        self.mode = validate_choice(mode, "mode", _MODES)
        self.mask = validate_mask(mask)
        self.offset = validate_offset(offset)
        self.estimated_offset: float | None = None

    def sigma_voxels(self, ndim: int) -> tuple[float, ...]:
        """`sigma` in voxels of the low-resolution array, per axis (see `length_voxels`)."""
        return self.length_voxels(self.sigma, self.units, ndim)

    @hookimpl
    def scaled_processing_plugin_name(self) -> str:
        """``"gaussian"``."""
        return "gaussian"

    @hookimpl
    def scaled_processing_plugin_description(self) -> str:
        """One line on the method."""
        return (
            "bias field by Gaussian-weighted local fit over the foreground (sigma in µm), "
            "mean 1; divides it out above the dark offset"
        )

    @hookimpl
    def lowres_func(self, lowres_array: np.ndarray) -> np.ndarray:
        """Estimate the bias field, normalised to mean 1 over the foreground.

        Parameters
        ----------
        lowres_array : ndarray, shape ([Z,] Y, X)
            Low-resolution image, finite.

        Returns
        -------
        ndarray of float32, shape of `lowres_array`
            The field, >= 0.001. The offset used is kept in `estimated_offset`.
        """
        # Float32 throughout, and no copy of the image: the fit subtracts the offset as it
        # reads each value once into float64 block sums, the largest arrays of the estimate.
        image = validate_lowres(lowres_array, np.float32, copy=False)  # not to be modified
        offset, mask = offset_and_mask(image, self.offset, self.mask)
        last = self.context.last_position if self.context is not None else ()
        field = local_fit(image, mask, self.sigma_voxels(image.ndim), mode=self.mode,
                          dtype=np.float32, offset=offset,
                          last_position=last or None)  # fmt: skip
        self.estimated_offset = offset
        return normalise_field(field, mask, self.name)

    @hookimpl
    def highres_func(self, fullres_array: da.Array, upsampled_output: da.Array) -> da.Array:
        """Divide the full-resolution image by the field: ``offset + (full - offset) / field``.

        Parameters
        ----------
        fullres_array : dask.array.Array
            Full-resolution image.
        upsampled_output : dask.array.Array
            The field upsampled to the full-resolution grid.

        Returns
        -------
        dask.array.Array
            Corrected image, float32 for inputs of up to 16 bits (float64 for wider ones), or
            already of the context's ``dtype`` when it has one.
        """
        validate_fullres(fullres_array, upsampled_output)
        offset = self.estimated_offset if self.estimated_offset is not None else self.offset
        offset = require_estimate(offset, self.name, "offset")
        dtype = self.context.dtype if self.context else None
        return divide_field(fullres_array, upsampled_output, offset, dtype=dtype)

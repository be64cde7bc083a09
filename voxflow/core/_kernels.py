"""Block reductions over a C-contiguous 4D view ``(batch, z, y, x)``, compiled with numba.

Every kernel reduces blocks of ``fz × fy × fx`` voxels of the last three axes; a partial block at
the far edge of an axis is reduced over the voxels it holds. The kernels release the GIL
(``nogil=True``) so Dask threads run them in parallel, and are cached on disk (``cache=True``).

The wrappers at the bottom (``block_mean``, ``block_mode``, ``block_min``, ``block_max``)
allocate the output, pick the accumulator and take care of ``bool``; callers pass a 4D
C-contiguous array and a 3-tuple of factors.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["block_max", "block_mean", "block_min", "block_mode", "reduced_shape"]

# Above this many voxels per block the mode sorts with numpy's sort instead of an insertion sort.
_INSERTION_SORT_MAX = 32


@numba.njit(nogil=True, cache=True)
def _mean_exact(a, fz, fy, fx, out):
    """Integer mean: exact int64 sums, rounded half up as ``floor(sum / count + 1/2)``."""
    nb, nz, ny, nx = a.shape
    _, oz, oy, ox = out.shape
    acc = np.empty(nx, np.int64)
    for b in range(nb):
        for k in range(oz):
            z0, z1 = k * fz, min(k * fz + fz, nz)
            for j in range(oy):
                y0, y1 = j * fy, min(j * fy + fy, ny)
                acc[:] = 0
                for z in range(z0, z1):
                    for y in range(y0, y1):
                        row = a[b, z, y]
                        for x in range(nx):
                            acc[x] += row[x]
                rows = (z1 - z0) * (y1 - y0)
                for i in range(ox):
                    x0, x1 = i * fx, min(i * fx + fx, nx)
                    s = np.int64(0)
                    for x in range(x0, x1):
                        s += acc[x]
                    c = np.int64(rows * (x1 - x0))
                    # floor((2 s + c) / (2 c)) == floor(s / c + 1/2), floor division on int64.
                    out[b, k, j, i] = (2 * s + c) // (2 * c)


@numba.njit(nogil=True, cache=True)
def _mean_float(a, fz, fy, fx, out, round_half_up, lo, hi):
    """Float64-accumulated mean; optionally rounded half up and clipped to ``[lo, hi]``."""
    nb, nz, ny, nx = a.shape
    _, oz, oy, ox = out.shape
    acc = np.empty(nx, np.float64)
    for b in range(nb):
        for k in range(oz):
            z0, z1 = k * fz, min(k * fz + fz, nz)
            for j in range(oy):
                y0, y1 = j * fy, min(j * fy + fy, ny)
                acc[:] = 0.0
                for z in range(z0, z1):
                    for y in range(y0, y1):
                        row = a[b, z, y]
                        for x in range(nx):
                            acc[x] += row[x]
                rows = (z1 - z0) * (y1 - y0)
                for i in range(ox):
                    x0, x1 = i * fx, min(i * fx + fx, nx)
                    s = 0.0
                    for x in range(x0, x1):
                        s += acc[x]
                    m = s / (rows * (x1 - x0))
                    if round_half_up:
                        m = min(max(np.floor(m + 0.5), lo), hi)
                    out[b, k, j, i] = m


@numba.njit(nogil=True, cache=True)
def _min(a, fz, fy, fx, out):
    """Block minimum; NaN propagates as in ``numpy.min``."""
    nb, nz, ny, nx = a.shape
    _, oz, oy, ox = out.shape
    acc = np.empty(nx, a.dtype)
    for b in range(nb):
        for k in range(oz):
            z0, z1 = k * fz, min(k * fz + fz, nz)
            for j in range(oy):
                y0, y1 = j * fy, min(j * fy + fy, ny)
                acc[:] = a[b, z0, y0]
                for z in range(z0, z1):
                    for y in range(y0, y1):
                        row = a[b, z, y]
                        for x in range(nx):
                            v = row[x]
                            # `v != v` is only true for NaN and folds away for integers.
                            if v < acc[x] or v != v:
                                acc[x] = v
                for i in range(ox):
                    x0, x1 = i * fx, min(i * fx + fx, nx)
                    m = acc[x0]
                    for x in range(x0 + 1, x1):
                        v = acc[x]
                        if v < m or v != v:
                            m = v
                    out[b, k, j, i] = m


@numba.njit(nogil=True, cache=True)
def _max(a, fz, fy, fx, out):
    """Block maximum; NaN propagates as in ``numpy.max``."""
    nb, nz, ny, nx = a.shape
    _, oz, oy, ox = out.shape
    acc = np.empty(nx, a.dtype)
    for b in range(nb):
        for k in range(oz):
            z0, z1 = k * fz, min(k * fz + fz, nz)
            for j in range(oy):
                y0, y1 = j * fy, min(j * fy + fy, ny)
                acc[:] = a[b, z0, y0]
                for z in range(z0, z1):
                    for y in range(y0, y1):
                        row = a[b, z, y]
                        for x in range(nx):
                            v = row[x]
                            if v > acc[x] or v != v:
                                acc[x] = v
                for i in range(ox):
                    x0, x1 = i * fx, min(i * fx + fx, nx)
                    m = acc[x0]
                    for x in range(x0 + 1, x1):
                        v = acc[x]
                        if v > m or v != v:
                            m = v
                    out[b, k, j, i] = m


@numba.njit(nogil=True, cache=True)
def _mode_of(buf, n):
    """Most frequent of ``buf[:n]``, the smallest value among ties; sorts ``buf[:n]``."""
    first = buf[0]
    uniform = True
    for t in range(1, n):
        if buf[t] != first:
            uniform = False
            break
    if uniform:
        return first
    if n <= _INSERTION_SORT_MAX:
        for t in range(1, n):
            v = buf[t]
            s = t - 1
            while s >= 0 and buf[s] > v:
                buf[s + 1] = buf[s]
                s -= 1
            buf[s + 1] = v
    else:
        buf[:n].sort()
    # Ascending order and a strict `>` keep the smallest value among equally frequent ones.
    best, best_count = buf[0], 0
    run_value, run = buf[0], 0
    for t in range(n):
        if buf[t] == run_value:
            run += 1
        else:
            run_value, run = buf[t], 1
        if run > best_count:
            best, best_count = run_value, run
    return best


@numba.njit(nogil=True, cache=True)
def _mode(a, fz, fy, fx, out):
    """Block mode, ties broken towards the smallest value."""
    nb, nz, ny, nx = a.shape
    _, oz, oy, ox = out.shape
    buf = np.empty(fz * fy * fx, a.dtype)
    for b in range(nb):
        for k in range(oz):
            z0, z1 = k * fz, min(k * fz + fz, nz)
            for j in range(oy):
                y0, y1 = j * fy, min(j * fy + fy, ny)
                for i in range(ox):
                    x0, x1 = i * fx, min(i * fx + fx, nx)
                    n = 0
                    for z in range(z0, z1):
                        for y in range(y0, y1):
                            for x in range(x0, x1):
                                buf[n] = a[b, z, y, x]
                                n += 1
                    out[b, k, j, i] = _mode_of(buf, n)


def reduced_shape(shape: tuple[int, ...], factors: tuple[int, ...]) -> tuple[int, ...]:
    """Shape after block reduction: ``ceil(n / f)`` per axis."""
    return tuple(-(-n // f) for n, f in zip(shape, factors, strict=True))


def _run(kernel, a: np.ndarray, factors: tuple[int, int, int], *args) -> np.ndarray:
    # bool shares the uint8 compilation: a uint8 view has the same order and equality.
    work = a.view(np.uint8) if a.dtype == np.bool_ else a
    out = np.empty(reduced_shape(a.shape, (1, *factors)), dtype=work.dtype)
    kernel(work, *factors, out, *args)
    return out.view(a.dtype)


def block_mean(a: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Block mean of a 4D array; integers round half up, 64-bit integers accumulate in float64."""
    if a.dtype.kind == "f":
        out = np.empty(reduced_shape(a.shape, (1, *factors)), dtype=a.dtype)
        _mean_float(a, *factors, out, False, 0.0, 0.0)
        return out
    if a.dtype.itemsize < 8:
        return _run(_mean_exact, a, factors)
    # The largest float64 not above the dtype's maximum, so the cast back cannot overflow.
    info = np.iinfo(a.dtype)
    hi = float(np.nextafter(np.float64(info.max), -np.inf))
    return _run(_mean_float, a, factors, True, float(info.min), hi)


def block_mode(a: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Most frequent value of each block of a 4D array, the smallest among ties."""
    return _run(_mode, a, factors)


def block_min(a: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Minimum of each block of a 4D array."""
    return _run(_min, a, factors)


def block_max(a: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Maximum of each block of a 4D array."""
    return _run(_max, a, factors)

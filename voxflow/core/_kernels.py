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

# Up to this many voxels per block the mode counts (n² vectorised comparisons); above, it sorts.
# Measured on int32: counting is ~8x faster at 2×2×2, ~3x at 4×4×4, break-even near 128.
MODE_COUNTING_MAX = 64


@numba.njit(nogil=True, cache=True)
def _mean_exact(a, fz, fy, fx, out):
    """Integer mean: exact int64 sums, rounded half up as ``floor(sum / count + 1/2)``."""
    nb, nz, ny, nx = a.shape
    _, oz, oy, ox = out.shape
    acc = np.empty(nx, np.int64)
    # A whole block of 2**k voxels divides by an arithmetic shift (a floor, also below zero):
    # several times faster than an int64 division per output voxel, and bit-identical.
    full = np.int64(fz * fy * fx)
    shift = np.int64(-1)
    if full & (full - 1) == 0:
        shift = np.int64(0)
        while (np.int64(1) << shift) < full:
            shift += 1
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
                    if c == full and shift >= 0:
                        out[b, k, j, i] = (s + (full >> 1)) >> shift
                    else:
                        # floor((2 s + c) / (2 c)) == floor(s / c + 1/2), on int64.
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
def _better(count, value, best_count, best):
    """Whether `value`, seen `count` times, beats the pick: more often, or as often and smaller."""
    return (count > best_count) | ((count == best_count) & (value < best))


@numba.njit(nogil=True, cache=True)
def _mode_by_counting(buf, n):
    """Mode of ``buf[:n]`` by counting every value against all others (n² comparisons)."""
    best, best_count = buf[0], 0
    for t in range(n):
        v = buf[t]
        c = 0
        for s in range(n):
            c += buf[s] == v
        if _better(c, v, best_count, best):
            best, best_count = v, c
    return best


@numba.njit(nogil=True, cache=True)
def _mode_small(a, fz, fy, fx, out):
    """Block mode for small blocks, counting equal values across a row of blocks at once.

    The voxels of the ``ox`` blocks of one output row are laid out as ``vals[voxel, block]`` so
    the n² comparisons run as contiguous, branch-free (SIMD) loops over blocks; for 2×2×2
    this is several times faster than sorting each block.
    """
    nb, nz, ny, nx = a.shape
    _, oz, oy, _ = out.shape
    full = nx // fx  # blocks that hold all fx columns; a partial last one goes through `edge`
    width = max(full, 1)
    vals = np.empty((fz * fy * fx, width), a.dtype)
    count = np.empty(width, np.int64)
    best_count = np.empty(width, np.int64)
    best = np.empty(width, a.dtype)
    edge = np.empty(fz * fy * fx, a.dtype)
    for b in range(nb):
        for k in range(oz):
            z0, z1 = k * fz, min(k * fz + fz, nz)
            for j in range(oy):
                y0, y1 = j * fy, min(j * fy + fy, ny)
                n, q = 0, 0
                for z in range(z0, z1):
                    for y in range(y0, y1):
                        row = a[b, z, y]
                        for xx in range(fx):
                            dst = vals[n]
                            for i in range(full):
                                dst[i] = row[i * fx + xx]
                            n += 1
                        for x in range(full * fx, nx):
                            edge[q] = row[x]
                            q += 1
                best_count[:] = 0
                best[:] = vals[0]
                for t in range(n):
                    vt = vals[t]
                    count[:] = 0
                    for s in range(n):
                        vs = vals[s]
                        for i in range(full):
                            count[i] += vs[i] == vt[i]
                    for i in range(full):
                        better = _better(count[i], vt[i], best_count[i], best[i])
                        best[i] = vt[i] if better else best[i]
                        best_count[i] = count[i] if better else best_count[i]
                out[b, k, j, :full] = best[:full]
                if q:
                    out[b, k, j, full] = _mode_by_counting(edge, q)


@numba.njit(nogil=True, cache=True)
def _shell_sort(buf, n):
    """Sort ``buf[:n]`` in place; compiles far faster than ``ndarray.sort`` in numba."""
    gap = n // 2
    while gap > 0:
        for t in range(gap, n):
            v = buf[t]
            s = t
            while s >= gap and buf[s - gap] > v:
                buf[s] = buf[s - gap]
                s -= gap
            buf[s] = v
        gap //= 2


@numba.njit(nogil=True, cache=True)
def _mode_by_sorting(buf, n):
    """Mode of ``buf[:n]`` by sorting it in place and scanning the runs."""
    uniform = True
    for t in range(1, n):
        if buf[t] != buf[0]:
            uniform = False
            break
    if uniform:
        return buf[0]
    _shell_sort(buf, n)
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
def _mode_large(a, fz, fy, fx, out):
    """Block mode for large blocks, where n² comparisons cost more than a sort per block."""
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
                    out[b, k, j, i] = _mode_by_sorting(buf, n)


@numba.njit(nogil=True, cache=True)
def _mean_222(a, out):
    """Integer mean of whole 2×2×2 blocks: an unrolled sum and a shift."""
    for b in range(a.shape[0]):
        for k in range(a.shape[1] // 2):
            for j in range(a.shape[2] // 2):
                r0, r1 = a[b, 2 * k, 2 * j], a[b, 2 * k, 2 * j + 1]
                r2, r3 = a[b, 2 * k + 1, 2 * j], a[b, 2 * k + 1, 2 * j + 1]
                row = out[b, k, j]
                for i in range(a.shape[3] // 2):
                    x = 2 * i
                    s = (np.int64(r0[x]) + np.int64(r0[x + 1]) + np.int64(r1[x])
                         + np.int64(r1[x + 1]) + np.int64(r2[x]) + np.int64(r2[x + 1])
                         + np.int64(r3[x]) + np.int64(r3[x + 1]))  # fmt: skip
                    row[i] = (s + 4) >> 3


@numba.njit(nogil=True, cache=True)
def _mean_122(a, out):
    """Integer mean of whole 1×2×2 blocks: an unrolled sum and a shift."""
    for b in range(a.shape[0]):
        for k in range(a.shape[1]):
            for j in range(a.shape[2] // 2):
                r0, r1 = a[b, k, 2 * j], a[b, k, 2 * j + 1]
                row = out[b, k, j]
                for i in range(a.shape[3] // 2):
                    x = 2 * i
                    s = (
                        np.int64(r0[x])
                        + np.int64(r0[x + 1])
                        + np.int64(r1[x])
                        + np.int64(r1[x + 1])
                    )
                    row[i] = (s + 2) >> 2


# The factor sets of nearly every pyramid step; a shift is a floor division, also below zero.
_HALVING = {(2, 2, 2): _mean_222, (1, 2, 2): _mean_122}


def _mean_integer(a: np.ndarray, factors: tuple[int, int, int], out: np.ndarray) -> None:
    """Integer block mean into `out`: the fast kernel on whole blocks, the exact one on edges."""
    fast = _HALVING.get(tuple(factors))
    if fast is None:
        _mean_exact(a, *factors, out)
        return
    whole = tuple(n // f for n, f in zip(a.shape[1:], factors, strict=True))
    fast(a, out)
    # Partial edge blocks (odd sizes), one slab per axis, reduced over the voxels they have.
    for axis in range(3):
        if whole[axis] == out.shape[axis + 1]:
            continue
        lead = tuple(slice(0, w * f) for w, f in zip(whole[:axis], factors[:axis], strict=True))
        src = a[(slice(None), *lead, slice(whole[axis] * factors[axis], None))]
        dst = out[(slice(None), *(slice(0, w) for w in whole[:axis]), slice(whole[axis], None))]
        part = np.empty_like(dst)
        _mean_exact(np.ascontiguousarray(src), *factors, part)
        dst[...] = part


def reduced_shape(shape: tuple[int, ...], factors: tuple[int, ...]) -> tuple[int, ...]:
    """Shape after block reduction: ``ceil(n / f)`` per axis."""
    return tuple(-(-n // f) for n, f in zip(shape, factors, strict=True))


def _run(kernel, a: np.ndarray, factors: tuple[int, int, int], *args) -> np.ndarray:
    # bool shares the uint8 compilation: a uint8 view has the same order and equality.
    work = a.view(np.uint8) if a.dtype == np.bool_ else a
    out = np.empty(reduced_shape(a.shape, (1, *factors)), dtype=work.dtype)
    kernel(work, *factors, out, *args)
    return out.view(a.dtype)


def block_mean(
    a: np.ndarray, factors: tuple[int, int, int], dtype: np.dtype | None = None
) -> np.ndarray:
    """Block mean of a 4D array; integers round half up, 64-bit integers accumulate in float64.

    A float `dtype` gives the exact means in that dtype (summed in float64, not rounded),
    whatever the dtype of `a`.
    """
    if a.dtype.kind == "f" or dtype is not None:
        out = np.empty(reduced_shape(a.shape, (1, *factors)), dtype=dtype or a.dtype)
        _mean_float(a, *factors, out, False, 0.0, 0.0)
        return out
    if a.dtype.itemsize < 8:
        out = np.empty(reduced_shape(a.shape, (1, *factors)), dtype=a.dtype)
        _mean_integer(a, factors, out)
        return out
    # The largest float64 not above the dtype's maximum, so the cast back cannot overflow.
    info = np.iinfo(a.dtype)
    hi = float(np.nextafter(np.float64(info.max), -np.inf))
    return _run(_mean_float, a, factors, True, float(info.min), hi)


def block_mode(a: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Most frequent value of each block of a 4D array, the smallest among ties."""
    kernel = _mode_small if np.prod(factors) <= MODE_COUNTING_MAX else _mode_large
    return _run(kernel, a, factors)


def block_min(a: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Minimum of each block of a 4D array."""
    return _run(_min, a, factors)


def block_max(a: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Maximum of each block of a 4D array."""
    return _run(_max, a, factors)

"""Compiled CPU kernels of the registration loss: weighted moments of a bilinear warp.

One pass per pair samples the fixed image at the affine image of every moving pixel (as
``torch.nn.functional.grid_sample`` with ``align_corners=True`` and zero padding), weighs it
by its distance inside the fixed frame and sums the six moments the losses need; a second
pass gives the gradient of any function of the moments with respect to the affine map.
Nothing per pixel is stored between them, where torch's graph keeps several images' worth.
"""

from __future__ import annotations

import functools
import threading

import numba
import numpy as np

# Pixels per parallel work item: large enough to amortise a task, small enough that one
# pair's pixels split over the cores.
_CHUNK = 1 << 14


@numba.njit(cache=True, nogil=True, inline="always")
def _sample(fixed, b, ix, iy):  # pragma: no cover - compiled
    """Bilinear sample of ``fixed[b]`` at pixel (ix, iy) in the frame; and its gradient.

    Only points of positive weight are sampled, and those lie inside the frame, strictly
    before its last row and column: the four neighbours exist (the clamps only guard against
    a rounding onto the last one, where the sample is then the same).
    """
    h, w = fixed.shape[1], fixed.shape[2]
    x0 = min(max(int(ix), 0), w - 2)
    y0 = min(max(int(iy), 0), h - 2)
    fx, fy = ix - x0, iy - y0
    v00, v01 = float(fixed[b, y0, x0]), float(fixed[b, y0, x0 + 1])
    v10, v11 = float(fixed[b, y0 + 1, x0]), float(fixed[b, y0 + 1, x0 + 1])
    upper = v00 + (v01 - v00) * fx
    lower = v10 + (v11 - v10) * fx
    value = upper + (lower - upper) * fy
    d_ix = (v01 - v00) + ((v11 - v10) - (v01 - v00)) * fy
    d_iy = lower - upper
    return value, d_ix, d_iy


@numba.njit(cache=True, nogil=True, inline="always")
def _weight(gx, gy, ramp):  # pragma: no cover - compiled
    """Weight of a grid point: 0 up to `ramp[2]` ramps inside the fixed frame, then up to 1."""
    inside = min(ramp[0] - ramp[2] - ramp[0] * abs(gx), ramp[1] - ramp[2] - ramp[1] * abs(gy))
    return min(max(inside, 0.0), 1.0)


def _sums_py(fixed, moving, rows, xs, ys, grid, lin, off, ramp, coef, gradient):  # pragma: no cover
    """Per pair, the six moments, or (`gradient`) the six sums of the gradient's terms.

    Moments: Σw, Σwm, Σwm², Σws, Σwms, Σws². Gradient of ``Σ coef[k] · (Σws, Σwms, Σws²)``:
    with ``g = ∂/∂(gx, gy)`` at each point, Σ g_x x, Σ g_x y, Σ g_y x, Σ g_y y, Σ g_x, Σ g_y,
    i.e. the derivatives by ``lin`` (row-major) then ``off``.
    """
    n, npix = len(rows), moving.shape[1]
    # Work items: whole raster rows (grid) or points, about `_CHUNK` pixels of one pair.
    per_unit = len(xs) if grid else 1
    units = npix // per_unit
    per = max(1, _CHUNK // per_unit)
    chunks = (units + per - 1) // per
    h, w = fixed.shape[1], fixed.shape[2]
    sx, sy = 0.5 * (w - 1), 0.5 * (h - 1)
    part = np.zeros((n, chunks, 6))
    for item in numba.prange(n * chunks):
        k, c = item // chunks, item % chunks
        lo, hi = c * per, min((c + 1) * per, units)
        b = rows[k]
        a00, a01, a10, a11 = lin[k, 0, 0], lin[k, 0, 1], lin[k, 1, 0], lin[k, 1, 1]
        c_s, c_ms, c_ss = coef[k, 0], coef[k, 1], 2.0 * coef[k, 2]
        t0 = t1 = t2 = t3 = t4 = t5 = 0.0
        # Raster rows lo .. hi - 1, each sharing its y; or one line of the points lo .. hi - 1.
        first, last = (lo, hi) if grid else (0, 1)
        for r in range(first, last):
            bx = a01 * float(ys[r]) + off[k, 0] if grid else off[k, 0]
            by = a11 * float(ys[r]) + off[k, 1] if grid else off[k, 1]
            start, stop = (r * len(xs), (r + 1) * len(xs)) if grid else (lo, hi)
            for p in range(start, stop):
                x = float(xs[p - start]) if grid else float(xs[p])
                y = float(ys[r]) if grid else float(ys[p])
                gx = a00 * x + bx + (0.0 if grid else a01 * y)
                gy = a10 * x + by + (0.0 if grid else a11 * y)
                wt = _weight(gx, gy, ramp)
                if wt <= 0.0:
                    continue
                s, d_ix, d_iy = _sample(fixed, b, (gx + 1.0) * sx, (gy + 1.0) * sy)
                m = float(moving[b, p])
                if gradient:
                    d_s = wt * (c_s + c_ms * m + c_ss * s)
                    d_gx, d_gy = d_s * d_ix * sx, d_s * d_iy * sy
                    t0 += d_gx * x
                    t1 += d_gx * y
                    t2 += d_gy * x
                    t3 += d_gy * y
                    t4 += d_gx
                    t5 += d_gy
                else:
                    wm, ws = wt * m, wt * s
                    t0 += wt
                    t1 += wm
                    t2 += wm * m
                    t3 += ws
                    t4 += wm * s
                    t5 += ws * s
        part[k, c, 0], part[k, c, 1], part[k, c, 2] = t0, t1, t2
        part[k, c, 3], part[k, c, 4], part[k, c, 5] = t3, t4, t5
    return part.sum(axis=1)


_sums_parallel = numba.njit(cache=True, parallel=True)(_sums_py)
_probe_lock = threading.Lock()
_threadsafe: list[bool] = []


def _sums(*args) -> np.ndarray:
    """`_sums_py` compiled, its pairs and chunks spread over the cores where that is safe.

    Numba's parallel loops run on its threading layer: TBB or OpenMP take calls from any
    number of threads at once (Dask workers make them); its own fallback aborts on a second
    concurrent call, so without them the loop runs on the calling thread. The layer is known
    once a parallel loop has run: the first call probes it, alone.
    """
    if not _threadsafe:
        with _probe_lock:
            if not _threadsafe:
                sums = _sums_parallel(*args)
                _threadsafe.append(numba.threading_layer() in ("tbb", "omp"))
                return sums
    if _threadsafe[0]:
        return _sums_parallel(*args)
    return _serial()(*args)


@functools.cache
def _serial():
    return numba.njit(nogil=True)(_sums_py)


def weighted_moments(fixed, moving, rows, xs, ys, grid, lin, off, ramp) -> np.ndarray:
    """(n, 6) moments Σw, Σwm, Σwm², Σws, Σwms, Σws² of the pairs `rows`.

    `fixed` (B, H, W) and `moving` (B, N) are every pair's level images, the moving one at
    its N pixels: the raster of ``xs`` (W',) × ``ys`` (H',) when `grid`, else the points
    ``(xs[p], ys[p])``. ``lin`` (n, 2, 2) and ``off`` (n, 2) map (x, y) to grid_sample's
    normalised (gx, gy); `ramp` is the edge weight's (x scale, y scale, dead band).
    """
    coef = np.zeros((len(rows), 3))
    return _sums(fixed, moving, rows, xs, ys, grid, lin, off, ramp, coef, False)


def moments_gradient(fixed, moving, rows, xs, ys, grid, lin, off, ramp, coef):
    """Gradients (n, 2, 2) and (n, 2) of ``Σ coef[k] · (Σws, Σwms, Σws²)`` in `lin`, `off`.

    The weight counts as a constant (it only fades pixels in at the frame edge), as in the
    moments' torch counterpart.
    """
    total = _sums(fixed, moving, rows, xs, ys, grid, lin, off, ramp, coef, True)
    return total[:, :4].reshape(-1, 2, 2).copy(), total[:, 4:].copy()

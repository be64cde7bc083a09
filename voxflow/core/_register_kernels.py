"""Compiled CPU kernels of the registration loss: weighted moments of a bilinear warp.

One pass per pair samples the fixed image at the affine image of every moving pixel (as
``torch.nn.functional.grid_sample`` with ``align_corners=True`` and zero padding), weighs it
by its distance inside the fixed frame and sums the six moments the losses need, and in the
same pass their derivatives by the affine map, from which the gradient of any function of
the moments follows. Nothing per pixel is stored, where torch's graph keeps several images'
worth.
"""

from __future__ import annotations

import functools
import math
import threading

import numba
import numpy as np

# Pixels per parallel work item: large enough to amortise a task, small enough that one
# pair's pixels split over the cores.
_CHUNK = 1 << 14
_COLUMNS = 24  # six moments, then the derivatives of three of them by six map entries


@numba.njit(cache=True, nogil=True, inline="always")
def _weight(gx, gy, ramp):  # pragma: no cover - compiled
    """Weight of a grid point: 0 up to `ramp[2]` ramps inside the fixed frame, then up to 1."""
    inside = min(ramp[0] - ramp[2] - ramp[0] * abs(gx), ramp[1] - ramp[2] - ramp[1] * abs(gy))
    return min(max(inside, 0.0), 1.0)


_FAST = {"reassoc", "contract"}  # sums in any order, fused multiply-adds: they vectorise
_BLOCK = 256  # points gathered at a time, then summed in one vectorised loop


@numba.njit(cache=True, nogil=True)
def _gather(fixed, moving, b, xs, ys, grid, lin, off, ramp, row, start, n, buf):  # pragma: no cover
    """Gather points ``start .. start + n − 1`` of pair `b` into `buf` (10, n), one at a time.

    Per point: weight, the interpolation fractions (fx, fy), the four neighbours, x, y and
    the moving value; a point of zero weight gets a zero weight and zero neighbours. Points
    of positive weight lie inside the frame, strictly before its last row and column, so
    the four neighbours exist (the clamps only guard against a rounding onto the last one,
    where the sample is then the same). Loads at scattered addresses run faster one by one
    than as vector gathers, so this loop stays scalar (no fast-math) while the sums that
    follow vectorise.
    """
    h, w = fixed.shape[1], fixed.shape[2]
    sx, sy = 0.5 * (w - 1), 0.5 * (h - 1)
    a00, a01, a10, a11 = lin[0, 0], lin[0, 1], lin[1, 0], lin[1, 1]
    for j in range(n):
        p = start + j
        x = float(xs[p - row * len(xs)]) if grid else float(xs[p])
        y = float(ys[row]) if grid else float(ys[p])
        gx = a00 * x + a01 * y + off[0]
        gy = a10 * x + a11 * y + off[1]
        wt = _weight(gx, gy, ramp)
        v00 = v01 = v10 = v11 = fx = fy = 0.0
        if wt > 0.0:
            ix, iy = (gx + 1.0) * sx, (gy + 1.0) * sy
            x0 = min(max(int(ix), 0), w - 2)
            y0 = min(max(int(iy), 0), h - 2)
            fx, fy = ix - x0, iy - y0
            v00, v01 = float(fixed[b, y0, x0]), float(fixed[b, y0, x0 + 1])
            v10, v11 = float(fixed[b, y0 + 1, x0]), float(fixed[b, y0 + 1, x0 + 1])
        buf[0, j], buf[1, j], buf[2, j], buf[3, j], buf[4, j] = wt, fx, fy, v00, v01
        buf[5, j], buf[6, j], buf[7, j], buf[8, j] = v10, v11, x, y
        buf[9, j] = float(moving[b, p])


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def _chunk_sums(fixed, moving, b, xs, ys, grid, lin, off, ramp, lo, hi, out):  # pragma: no cover
    """The 24 sums of :func:`_sums_py` over the work item ``lo .. hi - 1`` of pair `b`, to `out`.

    Compiled once and called by the parallel and the serial loop alike, so both add in the
    same order and agree bit for bit.
    """
    h, w = fixed.shape[1], fixed.shape[2]
    sx, sy = 0.5 * (w - 1), 0.5 * (h - 1)
    buf = np.empty((10, _BLOCK))
    # Scalar sums, so they stay in registers: the moments, then per factor (w, wm, 2ws)
    # the six derivative terms.
    m0 = m1 = m2 = m3 = m4 = m5 = 0.0
    p0 = p1 = p2 = p3 = p4 = p5 = 0.0
    q0 = q1 = q2 = q3 = q4 = q5 = 0.0
    r0 = r1 = r2 = r3 = r4 = r5 = 0.0
    # Raster rows lo .. hi - 1, each sharing its y; or one line of the points lo .. hi - 1.
    first, last = (lo, hi) if grid else (0, 1)
    for r in range(first, last):
        start, stop = (r * len(xs), (r + 1) * len(xs)) if grid else (lo, hi)
        for begin in range(start, stop, _BLOCK):
            n = min(_BLOCK, stop - begin)
            _gather(fixed, moving, b, xs, ys, grid, lin, off, ramp, r, begin, n, buf)
            for j in range(n):
                wt, fx, fy = buf[0, j], buf[1, j], buf[2, j]
                v00, v01, v10, v11 = buf[3, j], buf[4, j], buf[5, j], buf[6, j]
                x, y, m = buf[7, j], buf[8, j], buf[9, j]
                # The bilinear sample and its derivatives by the grid position.
                upper = v00 + (v01 - v00) * fx
                lower = v10 + (v11 - v10) * fx
                s = upper + (lower - upper) * fy
                d_gx = ((v01 - v00) + ((v11 - v10) - (v01 - v00)) * fy) * sx
                d_gy = (lower - upper) * sy
                wm, ws = wt * m, wt * s
                m0 += wt
                m1 += wm
                m2 += wm * m
                m3 += ws
                m4 += wm * s
                m5 += ws * s
                v0, v1, v2, v3 = d_gx * x, d_gx * y, d_gy * x, d_gy * y
                p0 += wt * v0
                p1 += wt * v1
                p2 += wt * v2
                p3 += wt * v3
                p4 += wt * d_gx
                p5 += wt * d_gy
                q0 += wm * v0
                q1 += wm * v1
                q2 += wm * v2
                q3 += wm * v3
                q4 += wm * d_gx
                q5 += wm * d_gy
                ws2 = 2.0 * ws
                r0 += ws2 * v0
                r1 += ws2 * v1
                r2 += ws2 * v2
                r3 += ws2 * v3
                r4 += ws2 * d_gx
                r5 += ws2 * d_gy
    out[0], out[1], out[2], out[3], out[4], out[5] = m0, m1, m2, m3, m4, m5
    out[6], out[7], out[8], out[9], out[10], out[11] = p0, p1, p2, p3, p4, p5
    out[12], out[13], out[14], out[15], out[16], out[17] = q0, q1, q2, q3, q4, q5
    out[18], out[19], out[20], out[21], out[22], out[23] = r0, r1, r2, r3, r4, r5


def _sums_py(fixed, moving, rows, xs, ys, grid, lin, off, ramp):  # pragma: no cover
    """Per pair, the six moments and their derivatives by the affine map, in one pass.

    Columns 0-5, the moments: Σw, Σwm, Σwm², Σws, Σwms, Σws². Columns 6-23, the derivatives
    of the three that depend on the map (Σws, Σwms, Σws², six columns each) by ``lin``
    (row-major) then ``off``: with ``f`` the moment's factor of ``∂s`` (w, wm, 2ws) and
    ``g = ∂s/∂(gx, gy)`` at each point, Σ f g_x x, Σ f g_x y, Σ f g_y x, Σ f g_y y, Σ f g_x,
    Σ f g_y. The weight counts as a constant (it only fades pixels in at the frame edge).
    """
    n, npix = len(rows), moving.shape[1]
    # Work items: whole raster rows (grid) or points, about `_CHUNK` pixels of one pair.
    per_unit = len(xs) if grid else 1
    units = npix // per_unit
    per = max(1, _CHUNK // per_unit)
    chunks = (units + per - 1) // per
    part = np.zeros((n, chunks, _COLUMNS))
    for item in numba.prange(n * chunks):
        k, c = item // chunks, item % chunks
        lo, hi = c * per, min((c + 1) * per, units)
        _chunk_sums(fixed, moving, rows[k], xs, ys, grid, lin[k], off[k], ramp, lo, hi,
                    part[k, c])  # fmt: skip
    return part.sum(axis=1)


_probe_lock = threading.Lock()
_threadsafe: list[bool] = []


def _on_cores(function, *args):
    """`function` compiled, its ``prange`` loops spread over the cores where that is safe.

    Numba's parallel loops run on its threading layer: TBB or OpenMP take calls from any
    number of threads at once (Dask workers make them); its own fallback aborts on a second
    concurrent call, so without them the loop runs on the calling thread. The layer is known
    once a parallel loop has run: the first call probes it, alone.
    """
    if not _threadsafe:
        with _probe_lock:
            if not _threadsafe:
                result = _compiled(function, True)(*args)
                _threadsafe.append(numba.threading_layer() in ("tbb", "omp"))
                return result
    return _compiled(function, _threadsafe[0])(*args)


@functools.cache
def _compiled(function, parallel: bool):
    # Only the parallel build is cached on disk: both would share one cache entry.
    if parallel:
        return numba.njit(cache=True, parallel=True)(function)
    return numba.njit(nogil=True)(function)


def moments_and_jacobian(fixed, moving, rows, xs, ys, grid, lin, off, ramp):
    """The (n, 6) moments of the pairs `rows` and (n, 3, 6) their derivatives, in one pass.

    The moments are Σw, Σwm, Σwm², Σws, Σwms, Σws²; the derivatives are those of the last
    three by ``lin`` (row-major) then ``off``.

    `fixed` (B, H, W) and `moving` (B, N) are every pair's level images, the moving one at
    its N pixels: the raster of ``xs`` (W',) × ``ys`` (H',) when `grid`, else the points
    ``(xs[p], ys[p])``. ``lin`` (n, 2, 2) and ``off`` (n, 2) map (x, y) to grid_sample's
    normalised (gx, gy); `ramp` is the edge weight's (x scale, y scale, dead band). The
    weight counts as a constant in the derivatives (it only fades pixels in at the frame
    edge), as in the moments' torch counterpart.
    """
    total = _on_cores(_sums_py, fixed, moving, rows, xs, ys, grid, lin, off, ramp)
    return total[:, :6].copy(), total[:, 6:].reshape(-1, 3, 6).copy()


def gradient_of(jacobian, coef):
    """Gradients (n, 2, 2) and (n, 2) of ``Σ coef[k] · (Σws, Σwms, Σws²)[k]`` in `lin`, `off`.

    `jacobian` (n, 3, 6) is :func:`moments_and_jacobian`'s, `coef` (n, 3).
    """
    total = np.einsum("nk,nkj->nj", np.asarray(coef, dtype=np.float64), jacobian)
    return total[:, :4].reshape(-1, 2, 2).copy(), total[:, 4:].copy()


# --------------------------------------------------------------------------- level images


def _normalise(images, tiny, out, stats):  # pragma: no cover - compiled
    """Per image: ``out = (image - mean) / std`` in float64, stored as float32.

    ``stats[b]`` gets (finite, constant): an image whose std is at most `tiny` times its
    largest magnitude counts as constant and is only centred. Two passes for the mean and
    the variance, as NumPy's ``std``; `out` is undefined for an image that is not finite.
    """
    n = images.shape[1] * images.shape[2]
    for b in numba.prange(images.shape[0]):
        flat = images[b].ravel()
        total, top, finite = 0.0, 0.0, True
        for i in range(n):
            v = float(flat[i])
            if not math.isfinite(v):
                finite = False
                break
            total += v
            top = max(top, abs(v))
        stats[b, 0] = finite
        if not finite:
            continue
        mean = total / n
        squares = 0.0
        for i in range(n):
            d = float(flat[i]) - mean
            squares += d * d
        std = math.sqrt(squares / n)
        constant = std <= tiny * max(top, 1e-30)
        stats[b, 1] = constant
        scale = 1.0 if constant else std
        dest = out[b].ravel()
        for i in range(n):
            dest[i] = (float(flat[i]) - mean) / scale


def normalise_images(images: np.ndarray, tiny: float) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W) images to zero mean and unit standard deviation, float32, on the cores.

    Parameters
    ----------
    images : ndarray, shape (B, H, W)
        Integers or floats.
    tiny : float
        An image whose standard deviation is at most `tiny` times its largest magnitude
        counts as constant: it is centred, not scaled.

    Returns
    -------
    out : ndarray of float32
        ``(image - mean) / std``, evaluated in float64.
    constant : ndarray of bool, shape (B,)
        Which images count as constant.

    Raises
    ------
    ValueError
        When an image holds NaN or infinite values (the first such is named).
    """
    values = np.ascontiguousarray(images)
    out = np.empty(values.shape, np.float32)
    stats = np.zeros((len(values), 2), dtype=np.bool_)
    _on_cores(_normalise, values, float(tiny), out, stats)
    if not stats[:, 0].all():
        raise ValueError(f"image {int(np.argmin(stats[:, 0]))} holds NaN or infinite values")
    return out, stats[:, 1].copy()


def _smooth_replicate(images, kernel, out):  # pragma: no cover - compiled
    """Separable smoothing of (B, H, W) float32 `images` into `out`, edges replicated.

    Per output pixel ``Σ_k kernel[k] · image[clamp(i + k − r)]`` along x, then along y, each
    summed in float32 from the first tap to the last. The rows smoothed along x wait in a
    ring of ``2r + 1`` rows per image until the output row that needs them last is made, so
    no scratch of the images' size is allocated (fresh pages are slow to fault in).
    """
    nb, h, w = images.shape
    taps = kernel.size
    r = (taps - 1) // 2
    for b in numba.prange(nb):
        src, dst = images[b], out[b]
        padded = np.empty(w + 2 * r, np.float32)
        ring = np.empty((taps, w), np.float32)
        made = 0  # source rows smoothed along x so far
        for y in range(h):
            # The x-smoothed rows y - r .. y + r (clamped) must be in the ring.
            while made <= min(y + r, h - 1):
                row, slot = src[made], ring[made % taps]
                padded[r : r + w] = row
                padded[:r] = row[0]
                padded[r + w :] = row[w - 1]
                tap = kernel[0]
                for x in range(w):
                    slot[x] = padded[x] * tap
                for k in range(1, taps):
                    shifted, tap = padded[k : k + w], kernel[k]
                    for x in range(w):
                        slot[x] += shifted[x] * tap
                made += 1
            line, tap = dst[y], kernel[0]
            first = ring[min(max(y - r, 0), h - 1) % taps]
            for x in range(w):
                line[x] = first[x] * tap
            for k in range(1, taps):
                other, tap = ring[min(max(y + k - r, 0), h - 1) % taps], kernel[k]
                for x in range(w):
                    line[x] += other[x] * tap


def smooth_replicate(images: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """(B, H, W) images smoothed by a separable `kernel` (odd length), edges replicated.

    Along x, then along y, in float32; a new array.
    """
    values = np.ascontiguousarray(images, dtype=np.float32)
    out = np.empty(values.shape, np.float32)
    _on_cores(_smooth_replicate, values, np.asarray(kernel, np.float32), out)
    return out

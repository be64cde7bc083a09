"""Compiled kernels for linear upsampling and for casting floats to integers, with numba.

The kernels release the GIL (``nogil=True``) so Dask threads run them in parallel, and are
cached on disk (``cache=True``). Callers pass C-contiguous arrays of the right dtypes; the
public wrappers in :mod:`voxflow.core.upsample` validate and prepare them.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["cast_float_to_int", "interpolate_3d"]


@numba.njit(nogil=True, cache=True)
def interpolate_3d(field, iz0, iz1, wz, iy0, iy1, wy, ix0, ix1, wx, out):
    """Trilinear interpolation of `field` into `out`, one output z-plane at a time.

    ``out[k, j, i]`` is the tensor product of the per-axis pairs ``(i0, i1, w)``. For each
    output plane, the field rows the block needs are interpolated along z, then along x onto
    the output columns; the output rows are then a contiguous (vectorised) blend of two such
    rows along y. Every output voxel goes through the same operations in the same order
    whatever the block it belongs to, so blocks of one array agree bitwise with the whole
    array. The index arrays must be non-decreasing (they are, for a positive scale).
    """
    nz, ny, nx = out.shape
    ya, yb = iy0[0], iy1[ny - 1]
    xa, xb = ix0[0], ix1[nx - 1]
    width = xb - xa + 1
    # Field rows interpolated along z (low-res x), then along x (output x), for the block's y.
    zrow = np.empty(width, np.float64)
    rows = np.empty((yb - ya + 1, nx), np.float64)
    lx0 = ix0 - xa
    lx1 = ix1 - xa
    vx = 1.0 - wx
    for k in range(nz):
        z0, z1, w = iz0[k], iz1[k], wz[k]
        v = 1.0 - w
        for y in range(ya, yb + 1):
            a = field[z0, y]
            b = field[z1, y]
            for c in range(width):
                zrow[c] = v * a[xa + c] + w * b[xa + c]
            r = rows[y - ya]
            for i in range(nx):
                r[i] = vx[i] * zrow[lx0[i]] + wx[i] * zrow[lx1[i]]
        for j in range(ny):
            r0 = rows[iy0[j] - ya]
            r1 = rows[iy1[j] - ya]
            s, t = 1.0 - wy[j], wy[j]
            o = out[k, j]
            for i in range(nx):
                o[i] = s * r0[i] + t * r1[i]


@numba.njit(nogil=True, cache=True)
def cast_float_to_int(values, out, low, high, minimum, maximum):
    """Round half to even, saturate, and map NaN to 0, from a flat float array to `out`.

    `low` is the smallest integer of the target as a float, `high` one above the largest (a
    power of two, exact in float64), so 64-bit targets saturate instead of overflowing.
    """
    for n in range(values.size):
        x = np.float64(values[n])
        if x != x:
            out[n] = 0
            continue
        r = np.rint(x)
        if r < low:
            out[n] = minimum
        elif r >= high:
            out[n] = maximum
        else:
            out[n] = r

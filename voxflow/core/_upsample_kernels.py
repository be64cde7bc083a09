"""Numba kernels: linear upsampling, float-to-integer casts, both fused with a division.

The kernels release the GIL (``nogil=True``) so Dask threads run them in parallel, and are
cached on disk (``cache=True``). Callers pass C-contiguous arrays of the right dtypes; the
public wrappers in :mod:`voxflow.core.upsample` validate and prepare them.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["cast_float_to_int", "divide_upsampled_3d", "interpolate_3d"]


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


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _quotient(x, f, offset, subtract):
    """``(x - offset) / f + offset`` when `subtract`, else ``x / f``, in the type of `x`."""
    if subtract:
        return (x - offset) / f + offset
    return x / f


@numba.njit(nogil=True, cache=True, inline="always")
def _store_int(out, n, x, low, high, minimum, maximum):
    """``out[n]`` = `x` rounded half to even and saturated into [`low`, `high`), NaN as 0.

    The bounds are floats (exact powers of two for 64-bit targets), the stored extremes the
    target's own integers, so no conversion overflows.
    """
    if x != x:
        out[n] = 0
        return
    r = np.rint(x)
    if r < low:
        out[n] = minimum
    elif r >= high:
        out[n] = maximum
    else:
        out[n] = r


@numba.njit(nogil=True, cache=True)
def _gather_columns(field, z0, z1, ya, nrow, ix0, ix1, g):
    """``g[p, q, y, i] = field[(z0, z1)[p], ya + y, (ix0, ix1)[q][i]]`` for ``y < nrow``."""
    for y in range(nrow):
        a = field[z0, ya + y]
        b = field[z1, ya + y]
        for i in range(g.shape[3]):
            g[0, 0, y, i] = a[ix0[i]]
            g[0, 1, y, i] = a[ix1[i]]
            g[1, 0, y, i] = b[ix0[i]]
            g[1, 1, y, i] = b[ix1[i]]


@numba.njit(nogil=True, cache=True, inline="always")
def _blend_rows(g, nrow, w, vx, wx, rows):
    """Rows of :func:`interpolate_3d` (along z at `w`, then x) from gathered columns `g`.

    ``v * a + w * b`` of the two planes at each gathered column, then ``vx * . + wx * .``
    of the two columns: the operations :func:`interpolate_3d` applies, in its order.
    """
    v = 1.0 - w
    for y in range(nrow):
        a0, a1, b0, b1 = g[0, 0, y], g[0, 1, y], g[1, 0, y], g[1, 1, y]
        r = rows[y]
        for i in range(r.size):
            r[i] = vx[i] * (v * a0[i] + w * b0[i]) + wx[i] * (v * a1[i] + w * b1[i])


@numba.njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _divide_row(a, r0, r1, s, t, up, work, offset, subtract, cast, o):
    """One output row of :func:`divide_upsampled_3d`: blend along y, divide, store or cast."""
    mode, low, high, top, minimum, maximum, itype = cast
    if mode == 0:
        for i in range(o.size):
            f = work(up(s * r0[i] + t * r1[i]))
            o[i] = _quotient(work(a[i]), f, offset, subtract)
    elif mode == 1:
        # Exact: the rounded quotient is an integer of `work`, and so are the bounds.
        zero = work(0)
        for i in range(o.size):
            f = work(up(s * r0[i] + t * r1[i]))
            r = np.rint(_quotient(work(a[i]), f, offset, subtract))
            r = low if r < low else r
            r = top if r > top else r
            o[i] = itype(zero if r != r else r)
    else:
        for i in range(o.size):
            f = work(up(s * r0[i] + t * r1[i]))
            _store_int(o, i, np.float64(_quotient(work(a[i]), f, offset, subtract)), low, high,
                       minimum, maximum)  # fmt: skip


@numba.njit(nogil=True, cache=True, error_model="numpy")
def divide_upsampled_3d(
    full, field, iz0, iz1, wz, iy0, iy1, wy, ix0, ix1, wx, up, work, offset, subtract, cast,
    max_rows, out,
):  # fmt: skip
    """`full` divided by the interpolated `field` and cast into `out`, in one pass.

    Per voxel: the field value as :func:`interpolate_3d` computes it (the same float64
    operations in the same order), rounded to the number type `up` as :func:`interpolate_3d`
    would store it, then converted to the number type `work`, as is the voxel of `full`; the
    two combine in :func:`_quotient` with `offset` (of type `work`). The quotient is then
    stored by ``cast = (mode, low, high, top, minimum, maximum, itype)``:

    - mode 0: as it is (rounded to nearest into a narrower float);
    - mode 1: rounded half to even, clipped to ``[low, top]`` (the smallest and largest
      integer of `out` as `work` numbers: both must be exact), NaN to 0, converted through
      the integer type `itype`; equal to mode 2 for such targets, in selects that vectorise;
    - mode 2: as :func:`cast_float_to_int` casts it (`low`, `high`, `minimum` and `maximum`
      as there).

    The block is walked in strips of output rows that read at most `max_rows` (>= 2) field
    rows; per strip, the field values each output column reads from a pair of planes are
    gathered once and serve every output plane between those two. Scratch: ``5 * max_rows``
    rows of ``out.shape[2]`` float64 at most.
    """
    nz, ny, nx = out.shape
    cap = min(max_rows, iy1[ny - 1] - iy0[0] + 1)
    g = np.empty((2, 2, cap, nx), np.float64)
    rows = np.empty((cap, nx), np.float64)
    vx = 1.0 - wx
    j0 = 0
    while j0 < ny:
        ya = iy0[j0]
        j1 = j0 + 1
        while j1 < ny and iy1[j1] - ya < cap:
            j1 += 1
        nrow = iy1[j1 - 1] - ya + 1
        held0, held1 = -1, -1
        for k in range(nz):
            if iz0[k] != held0 or iz1[k] != held1:
                held0, held1 = iz0[k], iz1[k]
                _gather_columns(field, held0, held1, ya, nrow, ix0, ix1, g)
            _blend_rows(g, nrow, wz[k], vx, wx, rows)
            for j in range(j0, j1):
                r0, r1 = rows[iy0[j] - ya], rows[iy1[j] - ya]
                s, t = 1.0 - wy[j], wy[j]
                _divide_row(full[k, j], r0, r1, s, t, up, work, offset, subtract, cast, out[k, j])
        j0 = j1


@numba.njit(nogil=True, cache=True)
def cast_float_to_int(values, out, low, high, minimum, maximum):
    """Round half to even, saturate, and map NaN to 0, from a flat float array to `out`.

    `low` is the smallest integer of the target as a float, `high` one above the largest (a
    power of two, exact in float64), so 64-bit targets saturate instead of overflowing.
    """
    for n in range(values.size):
        _store_int(out, n, np.float64(values[n]), low, high, minimum, maximum)

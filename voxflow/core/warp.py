"""Resampling of serial sections into the reference frame, batched on a torch device.

Output pixel ``(i, j)`` of a warped slice sits at reference-frame point
``q = (i + y0, j + x0)`` of the box ``((y0, y1), (x0, x1))`` and shows observed slice ``k``
at ``p = inv(T_k) q``, where ``T_k`` maps observed pixels to the reference frame (see
:mod:`voxflow.core.stack`). Points whose preimage leaves ``[0, Y − 1] × [0, X − 1]`` (by more
than 1e-9 pixel, the tolerance of :func:`voxflow.core.stack.valid_box`) get the fill value,
so every pixel of the valid box is interpolated.
"""

from __future__ import annotations

import enum
import math
import numbers
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
import torch.nn.functional as F

from voxflow.core._validate import validate_choice, validate_int
from voxflow.core.predict import resolve_device
from voxflow.core.stack import VALID_EPS, _row_intervals, _validate_matrices

__all__ = ["Interpolation", "source_rows", "warp_rows", "warp_slices"]

_Box = tuple[tuple[int, int], tuple[int, int]]


class Interpolation(enum.StrEnum):
    """How a slice is sampled between pixel centres."""

    LINEAR = "linear"
    """Bilinear (torch ``grid_sample``, ``align_corners=True``)."""
    CUBIC = "cubic"
    """Bicubic convolution with the Catmull-Rom kernel (Keys, a = −0.5): interpolates the
    pixels and reproduces linear ramps exactly, also at the frame edge (the slice is
    extended linearly by two pixels)."""


# --------------------------------------------------------------------------- validation


def _validate_slices(slices: object) -> np.ndarray:
    """A (B, C, Y, X) view of (B, Y, X) or (B, C, Y, X) real slices."""
    array = np.asarray(slices)
    if array.dtype == bool or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise TypeError(f"`slices` must have an integer or float dtype, got {array.dtype}")
    if array.ndim not in (3, 4) or 0 in array.shape[-2:]:
        raise ValueError(
            f"`slices` must have shape (B, Y, X) or (B, C, Y, X) with Y, X >= 1, got {array.shape}"
        )
    return array if array.ndim == 4 else array[:, None]


def _validate_box(box: object, shape: tuple[int, int]) -> _Box:
    """A half-open ((y0, y1), (x0, x1)) of integers, non-empty; None is the whole frame."""
    if box is None:
        return (0, shape[0]), (0, shape[1])
    try:
        (y0, y1), (x0, x1) = box
    except (TypeError, ValueError):
        raise TypeError(f"`box` must be ((y0, y1), (x0, x1)) or None, got {box!r}") from None
    values = (y0, y1, x0, x1)
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        raise TypeError(f"`box` must hold integers, got {box!r}")
    if y1 <= y0 or x1 <= x0:
        raise ValueError(f"`box` must be non-empty, y0 < y1 and x0 < x1, got {box!r}")
    return (int(y0), int(y1)), (int(x0), int(x1))


def _validate_fill(fill: object, dtype: np.dtype) -> float:
    """A real number the output dtype holds exactly (NaN is allowed for float outputs)."""
    if isinstance(fill, bool) or not isinstance(fill, numbers.Real):
        raise TypeError(f"`fill` must be a real number, got {fill!r} ({type(fill).__name__})")
    value = float(fill)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if not (math.isfinite(value) and value == round(value) and info.min <= value <= info.max):
            raise ValueError(
                f"`fill` must be an integer in [{info.min}, {info.max}] for {dtype} slices, "
                f"got {fill!r}"
            )
    return value


def _compute_dtypes(dtype: np.dtype, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """Dtypes of the values and of the coordinates: float32 unless float32 would lose data."""
    if device.type == "mps":  # MPS has no float64
        return torch.float32, torch.float32
    wide = dtype == np.float64 or (np.issubdtype(dtype, np.integer) and dtype.itemsize >= 4)
    return (torch.float64 if wide else torch.float32), torch.float64


# --------------------------------------------------------------------------- sampling


def _integer_shifts(composed: np.ndarray) -> np.ndarray:
    """Slices whose transform is a whole-pixel translation: sampled by copying, exactly."""
    linear = (composed[:, :2, :2] == np.eye(2)).all(axis=(1, 2))
    return linear & (composed[:, :2, 2] == np.round(composed[:, :2, 2])).all(axis=1)


def _shift_copy(
    source: np.ndarray, shift: np.ndarray, box: _Box, fill: float, out: np.ndarray
) -> None:
    """``out[..., i, j] = source[..., i + y0 − ty, j + x0 − tx]`` inside the frame, else fill."""
    out[...] = fill
    span = []
    for (start, stop), size, offset in zip(box, source.shape[-2:], shift, strict=True):
        lo = max(start - int(offset), 0)
        hi = min(stop - int(offset), size)
        span.append((lo, hi, lo + int(offset) - start))
    (ylo, yhi, yo), (xlo, xhi, xo) = span
    if yhi > ylo and xhi > xlo:
        out[..., yo : yo + yhi - ylo, xo : xo + xhi - xlo] = source[..., ylo:yhi, xlo:xhi]


def _preimages(inverse: torch.Tensor, box: _Box) -> tuple[torch.Tensor, torch.Tensor]:
    """Source coordinates (py, px), each (B, Yo, Xo), of the box's reference pixels."""
    ys = torch.arange(*box[0], dtype=inverse.dtype, device=inverse.device)[:, None]
    xs = torch.arange(*box[1], dtype=inverse.dtype, device=inverse.device)[None, :]
    a = inverse[:, :2, :, None, None]
    py = a[:, 0, 0] * ys + a[:, 0, 1] * xs + a[:, 0, 2]
    px = a[:, 1, 0] * ys + a[:, 1, 1] * xs + a[:, 1, 2]
    return py, px


def _extend(image: torch.Tensor, axis: int, width: int) -> torch.Tensor:
    """Pad `width` pixels on both sides of `axis`, continuing the edge slope linearly."""
    size = image.shape[axis]
    first, last = image.narrow(axis, 0, 1), image.narrow(axis, size - 1, 1)
    if size == 1:
        return torch.cat([first] * width + [image] + [last] * width, dim=axis)
    step_lo = first - image.narrow(axis, 1, 1)
    step_hi = last - image.narrow(axis, size - 2, 1)
    before = [first + k * step_lo for k in range(width, 0, -1)]
    after = [last + k * step_hi for k in range(1, width + 1)]
    return torch.cat([*before, image, *after], dim=axis)


def _keys(t: torch.Tensor) -> list[torch.Tensor]:
    """Catmull-Rom weights of the taps at offsets −1, 0, 1, 2 for a fraction t in [0, 1)."""
    t2, t3 = t * t, t * t * t
    return [
        (2 * t2 - t3 - t) / 2,
        (3 * t3 - 5 * t2 + 2) / 2,
        (4 * t2 - 3 * t3 + t) / 2,
        (t3 - t2) / 2,
    ]


def _cubic(image: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """Bicubic samples: 16 gathered taps of the linearly extended slice."""
    b, c, h, w = image.shape
    padded = _extend(_extend(image, 2, 2), 3, 2).reshape(b, c, -1)
    wide = w + 4
    # Preimages beyond the frame are filled later; clamping keeps their taps in the array.
    py, px = py.clamp(-1.0, h - 1).to(image.dtype), px.clamp(-1.0, w - 1).to(image.dtype)
    fy, fx = torch.floor(py), torch.floor(px)
    wy, wx = _keys(py - fy), _keys(px - fx)
    top = (fy.long() + 1).reshape(b, 1, -1)  # tap −1 of the extended slice
    left = (fx.long() + 1).reshape(b, 1, -1)
    out = torch.zeros(b, c, top.shape[-1], dtype=image.dtype, device=image.device)
    for a in range(4):
        row = torch.zeros_like(out)
        for d in range(4):
            index = ((top + a) * wide + left + d).expand(b, c, -1)
            row += wx[d].reshape(b, 1, -1) * torch.gather(padded, 2, index)
        out += wy[a].reshape(b, 1, -1) * row
    return out.reshape(b, c, *py.shape[-2:])


def _sample_cubic(
    source: np.ndarray, inverse: np.ndarray, box: _Box, fill: float, device
) -> np.ndarray:
    """Bicubic warp of (B, C, Y, X) slices by their inverse transforms; output dtype kept."""
    values_dtype, coords_dtype = _compute_dtypes(source.dtype, device)
    numpy_dtype = np.float64 if values_dtype == torch.float64 else np.float32
    image = torch.from_numpy(np.ascontiguousarray(source, dtype=numpy_dtype)).to(device)
    h, w = source.shape[-2:]
    py, px = _preimages(torch.from_numpy(inverse).to(device=device, dtype=coords_dtype), box)
    inside = (py >= -VALID_EPS) & (py <= h - 1 + VALID_EPS)
    inside &= (px >= -VALID_EPS) & (px <= w - 1 + VALID_EPS)
    out = _cubic(image, py, px)
    # Cubic kernels overshoot at steps; no output leaves its slice's range of values.
    out = torch.clamp(
        out, image.amin(dim=(2, 3), keepdim=True), image.amax(dim=(2, 3), keepdim=True)
    )
    return _finish(out, inside[:, None], fill, source.dtype)


def _finish(out: torch.Tensor, inside: torch.Tensor, fill: float, dtype: np.dtype) -> np.ndarray:
    """Fill outside the frame, round and clip integers, return in `dtype`."""
    out = torch.where(inside, out, torch.tensor(fill, dtype=out.dtype, device=out.device))
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = torch.round(out).clamp_(float(info.min), float(info.max))
        if dtype == np.uint8:
            return out.to(torch.uint8).cpu().numpy()
    return out.cpu().numpy().astype(dtype)


def _grid(inverse: np.ndarray, box: _Box, frame: tuple[int, int], device, dtype) -> torch.Tensor:
    """`grid_sample` grid (B, Yo, Xo, 2): each output pixel's preimage, normalised per axis.

    The map is affine, so the grid is a column term plus a row term: one pass over the
    output, and the sampling points are those of the pixel-space maps (rigid stays rigid).
    """
    (y0, y1), (x0, x1) = box
    h, w = frame
    # A frame of one pixel along an axis: any grid value there samples that pixel.
    norm = np.array([2 / max(w - 1, 1), 2 / max(h - 1, 1)])
    # Rows (x, y) of the source grid coordinate as functions of the reference (y, x, 1).
    rows = inverse[:, [1, 0], :] * norm[None, :, None]
    rows[:, :, 2] -= 1
    kw = {"device": device, "dtype": torch.float64}
    a = torch.from_numpy(rows).to(**kw)
    ys = torch.arange(y0, y1, **kw)
    xs = torch.arange(x0, x1, **kw)
    col = a[:, None, :, 1] * xs[None, :, None] + a[:, None, :, 2]  # (B, Xo, 2)
    row = a[:, None, :, 0] * ys[None, :, None]  # (B, Yo, 2)
    return row.to(dtype)[:, :, None, :] + col.to(dtype)[:, None, :, :]


@numba.njit(cache=True, nogil=True, inline="always")
def _row_span(lo, hi, b, i, x0, nx):  # pragma: no cover - compiled
    """Output columns ``left .. right − 1`` of row `i` of slice `b` whose preimage is valid."""
    left = min(max(lo[b, i] - x0, 0), nx)
    return left, min(max(hi[b, i] - x0 + 1, left), nx)


@numba.njit(cache=True, nogil=True)
def _fill_outside(out, lo, hi, x0, fill):  # pragma: no cover - compiled
    """Set output pixels outside each row's valid x range [lo, hi] (reference x) to fill."""
    nb, nc, ny, nx = out.shape
    for b in range(nb):
        for i in range(ny):
            left, right = _row_span(lo, hi, b, i, x0, nx)
            if left == 0 and right == nx:
                continue
            for c in range(nc):
                out[b, c, i, :left] = fill
                out[b, c, i, right:] = fill


def _row_bounds(inverse: np.ndarray, box: _Box, frame: tuple[int, int]):
    """Inclusive integer x range of valid preimages per slice and output row (exact)."""
    lo, hi = _row_intervals(inverse, frame, np.arange(*box[0]))
    # Clipped just outside the box's columns, so an empty interval stays empty.
    below, above = box[1][0] - 1, box[1][1]
    lo = np.ceil(np.clip(lo, below, above)).astype(np.int64)
    hi = np.floor(np.clip(hi, below, above)).astype(np.int64)
    return lo, hi


@numba.njit(cache=True, nogil=True, inline="always")
def _inside(r, d, x, n):  # pragma: no cover - compiled
    """Whether ``r + d x`` lies in [0, n − 1): no clamping, and a neighbour above it."""
    p = r + d * x
    return 0.0 <= p < n - 1.0


@numba.njit(cache=True, nogil=True, inline="always")
def _interior(ry, dy, rx, dx, x0, left, right, h, w):  # pragma: no cover - compiled
    """Columns ``a .. b − 1`` of ``left .. right − 1`` whose preimage needs no clamping.

    An estimate from the line's crossings of the frame, narrowed until both ends pass the
    exact test; the coordinates are monotone in the column, so every column between passes.
    """
    a, b = left, right
    for r, d, n in ((ry, dy, h), (rx, dx, w)):
        if d > 1e-12 or d < -1e-12:
            u, v = (0.0 - r) / d - x0, (n - 1.0 - r) / d - x0
            lo, hi = min(u, v), max(u, v)
            # Clipped to the row's span before the conversion: far crossings stay in range.
            a = max(a, int(min(max(math.ceil(lo), left - 1.0), right + 1.0)))
            b = min(b, int(min(max(math.floor(hi), left - 1.0), right + 1.0)) + 1)
    a = min(a, right)
    b = max(a, b)
    while a < b and not (_inside(ry, dy, float(a + x0), h) and _inside(rx, dx, float(a + x0), w)):
        a += 1
    while a < b and not (
        _inside(ry, dy, float(b - 1 + x0), h) and _inside(rx, dx, float(b - 1 + x0), w)
    ):
        b -= 1
    return a, b


@numba.njit(cache=True, nogil=True, inline="always")
def _blend(v00, v01, v10, v11, fy, fx):  # pragma: no cover - compiled
    """The bilinear blend of four neighbours at fractions (fy, fx)."""
    upper = v00 + (v01 - v00) * fx
    lower = v10 + (v11 - v10) * fx
    return upper + (lower - upper) * fy


@numba.njit(cache=True, nogil=True, inline="always")
def _bilinear_at(image, iy, ix, iy1, ix1, fy, fx):  # pragma: no cover - compiled
    """The bilinear sample between rows `iy`, `iy1` and columns `ix`, `ix1` at (fy, fx)."""
    v00, v01 = float(image[iy, ix]), float(image[iy, ix1])
    v10, v11 = float(image[iy1, ix]), float(image[iy1, ix1])
    return _blend(v00, v01, v10, v11, fy, fx)


@numba.njit(cache=True, nogil=True, inline="always")
def _bilinear_edge(image, ry, dy, rx, dx, x, h, w, top, last, row0):  # pragma: no cover
    """One bilinear sample with the preimage clamped into the frame (`image` from `row0`)."""
    py = min(max(ry + dy * x, 0.0), h - 1.0)
    px = min(max(rx + dx * x, 0.0), w - 1.0)
    iy, ix = min(int(py), top), min(int(px), last)
    iy1, ix1 = min(iy + 1, h - 1), min(ix + 1, w - 1)
    return _bilinear_at(image, iy - row0, ix, iy1 - row0, ix1, py - iy, px - ix)


@numba.njit(cache=True, nogil=True)
def _bilinear_rows(
    source, inverse, y0, x0, lo, hi, fill, integer, packed, out, start, stop, row0, h
):  # pragma: no cover - compiled
    """Bilinear samples of (B, C, Y, X) slices for output rows ``start .. stop − 1`` of B × Yo.

    `source` holds rows ``row0 .. row0 + Y − 1`` of frames `h` rows tall (all of them when
    ``row0 = 0`` and ``h = Y``); the samples are those of the whole frames, provided the rows
    they read are there (:func:`source_rows`).

    Output row ``i`` of slice ``b`` samples inside the frame between its exact bounds
    ``lo[b, i] .. hi[b, i]`` (reference x) and is `fill` elsewhere. Coordinates are float64;
    a preimage within the 1e-9 tolerance outside the frame reads the edge pixel. Integer
    outputs are rounded half to even, as ``torch.round``. Columns whose preimage lies well
    inside the frame skip the clamping and go in three loops: positions and weights (shared by
    the channels), the four neighbours gathered, then the blend. The first and last run as
    vector instructions, which one loop doing all three per sample would not. The gather is
    bound by its loads and stores: its indices are unsigned (no check for negative ones), and
    `packed` unsigned 8- and 16-bit neighbours go into one 64-bit word per sample, one store
    instead of four.
    """
    _, nc, _, w = source.shape
    ny, nx = out.shape[2], out.shape[3]
    top, last = max(h - 2, 0), max(w - 2, 0)
    one, below = np.uint64(1), np.uint64(w)
    bits = np.uint64(8 * source.itemsize)
    mask = (one << bits) - one if packed else one
    at = np.empty(nx, np.uint64)  # flat index of the upper-left neighbour
    fxs = np.empty(nx, np.float64)
    fys = np.empty(nx, np.float64)
    near = np.empty((4, nx), source.dtype)
    words = np.empty(nx, np.uint64)
    for r in range(start, stop):
        b, i = r // ny, r % ny
        left, right = _row_span(lo, hi, b, i, x0, nx)
        y = float(i + y0)
        ry, rx = inverse[b, 0, 0] * y + inverse[b, 0, 2], inverse[b, 1, 0] * y + inverse[b, 1, 2]
        dy, dx = inverse[b, 0, 1], inverse[b, 1, 1]
        a, z = _interior(ry, dy, rx, dx, x0, left, right, h, w)
        for j in range(z - a):
            x = float(j + a + x0)
            py, px = ry + dy * x, rx + dx * x
            iy, ix = int(py), int(px)
            fys[j] = py - iy
            fxs[j] = px - ix
            at[j] = np.uint64((iy - row0) * w + ix)
        for c in range(nc):
            image, row = source[b, c], out[b, c, i]
            flat = image.reshape(-1)
            row[:left] = fill
            row[right:] = fill
            for j in range(left, a):
                value = _bilinear_edge(image, ry, dy, rx, dx, float(j + x0), h, w, top, last,
                                       row0)  # fmt: skip
                row[j] = np.rint(value) if integer else value
            inner = row[a:z]
            if packed:  # unsigned integers: always rounded
                for j in range(z - a):
                    k = at[j]
                    words[j] = (
                        np.uint64(flat[k]) | np.uint64(flat[k + one]) << bits
                        | np.uint64(flat[k + below]) << (bits + bits)
                        | np.uint64(flat[k + below + one]) << (bits + bits + bits)
                    )  # fmt: skip
                for j in range(z - a):
                    word = words[j]
                    inner[j] = np.rint(_blend(
                        float(word & mask), float((word >> bits) & mask),
                        float((word >> (bits + bits)) & mask), float(word >> (bits + bits + bits)),
                        fys[j], fxs[j],
                    ))  # fmt: skip
            else:
                for j in range(z - a):
                    k = at[j]
                    near[0, j], near[1, j] = flat[k], flat[k + one]
                    near[2, j], near[3, j] = flat[k + below], flat[k + below + one]
                for j in range(z - a):
                    value = _blend(float(near[0, j]), float(near[1, j]), float(near[2, j]),
                                   float(near[3, j]), fys[j], fxs[j])  # fmt: skip
                    inner[j] = np.rint(value) if integer else value
            for j in range(max(a, z), right):
                value = _bilinear_edge(image, ry, dy, rx, dx, float(j + x0), h, w, top, last,
                                       row0)  # fmt: skip
                row[j] = np.rint(value) if integer else value


_CHUNK_PIXELS = 1 << 22
_MIN_THREAD_PIXELS = 1 << 16  # output pixels worth a thread of their own


def _sample_linear_numba(
    source: np.ndarray, inverse: np.ndarray, box: _Box, fill: float, threads: int | None = None,
    row0: int = 0, height: int | None = None,
) -> np.ndarray:  # fmt: skip
    """Bilinear warp on the CPU: one compiled pass per output pixel, rows split over cores.

    The same samples as `grid_sample` (``align_corners=True``, to float32 rounding of its
    normalised grid), without converting the slices to float or the output back, which
    costs several times the sampling on a CPU. `source` may hold only rows ``row0 ..`` of
    frames `height` tall (see :func:`warp_rows`).
    """
    size = (box[0][1] - box[0][0], box[1][1] - box[1][0])
    out = np.empty((*source.shape[:2], *size), dtype=source.dtype)
    height = source.shape[-2] if height is None else height
    lo, hi = _row_bounds(inverse, box, (height, source.shape[-1]))
    integer = bool(np.issubdtype(source.dtype, np.integer))
    packed = source.dtype in (np.uint8, np.uint16)
    args = (np.ascontiguousarray(source), np.ascontiguousarray(inverse, np.float64), box[0][0],
            box[1][0], lo, hi, out.dtype.type(fill), integer, packed, out)  # fmt: skip
    rest = (row0, height)
    rows = len(source) * size[0]
    parts = min(threads or os.cpu_count() or 1, max(1, out.size // _MIN_THREAD_PIXELS), rows)
    bounds = np.linspace(0, rows, parts + 1).astype(int)
    if parts == 1:
        _bilinear_rows(*args, 0, rows, *rest)
        return out
    with ThreadPoolExecutor(parts) as pool:
        list(pool.map(lambda k: _bilinear_rows(*args, bounds[k], bounds[k + 1], *rest),
                      range(parts)))  # fmt: skip
    return out


def _sample_linear(
    source: np.ndarray, inverse: np.ndarray, box: _Box, fill: float, device
) -> np.ndarray:
    """Bilinear warp through `grid_sample`, a chunk of slices at a time.

    Bilinear samples never leave the range of their four pixels, so no clamp is needed.
    Chunks of about 4 M output pixels bound the memory whatever the batch; the pixels whose
    preimage leaves the frame are filled row by row from exact bounds.
    """
    values_dtype, _ = _compute_dtypes(source.dtype, device)
    frame = source.shape[-2:]
    size = (box[0][1] - box[0][0], box[1][1] - box[1][0])
    out = np.empty((*source.shape[:2], *size), dtype=source.dtype)
    step = max(1, _CHUNK_PIXELS // (size[0] * size[1] * source.shape[1]))
    integer = np.issubdtype(source.dtype, np.integer)
    info = np.iinfo(source.dtype) if integer else None
    for start in range(0, len(source), step):
        part = slice(start, start + step)
        image = torch.from_numpy(np.ascontiguousarray(source[part])).to(device)
        grid = _grid(inverse[part], box, frame, device, values_dtype)
        sampled = F.grid_sample(image.to(values_dtype), grid, "bilinear", "border", True)
        if integer:
            sampled = sampled.round_().clamp_(float(info.min), float(info.max))
        if source.dtype == np.uint8:
            sampled = sampled.to(torch.uint8)
        out[part] = sampled.cpu().numpy()
    lo, hi = _row_bounds(inverse, box, frame)
    _fill_outside(out, lo, hi, box[1][0], out.dtype.type(fill))
    return out


def warp_slices(
    slices: np.ndarray,
    composed: np.ndarray,
    *,
    box: Sequence[Sequence[int]] | None = None,
    order: Interpolation | str = Interpolation.LINEAR,
    fill: float = 0,
    device: str | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Resample observed slices into the reference frame, cropped to a box.

    Parameters
    ----------
    slices : ndarray, shape (B, Y, X) or (B, C, Y, X)
        Observed slices of any integer or float dtype; the channels of a slice share its
        transform.
    composed : ndarray, shape (B, 3, 3)
        Affine observed → reference transforms ``T_k`` on ``(y, x, 1)`` pixel coordinates.
    box : ((int, int), (int, int)), optional
        Half-open reference-frame box ``((y0, y1), (x0, x1))`` to produce, e.g. from
        :func:`voxflow.core.stack.valid_box`. None is the whole frame ``((0, Y), (0, X))``.
    order : {'linear', 'cubic'} or Interpolation, optional
        Bilinear or bicubic (Catmull-Rom) sampling, see `Interpolation`.
    fill : float, optional
        Value of output pixels whose preimage lies outside the observed frame; for integer
        slices an integer the dtype holds.
    device : {None, 'auto', 'cpu', 'cuda', 'cuda:<index>', 'mps'}, optional
        Torch device, as in :func:`voxflow.core.predict.resolve_device`; None picks CUDA,
        then MPS, then the CPU. On the CPU, bilinear warps run a compiled kernel (the same
        samples as torch's ``grid_sample``, several times faster there); every other case
        runs on torch.
    threads : int, optional
        Threads of the CPU bilinear kernel; None uses every core. Callers that already warp
        blocks in parallel pass 1.

    Returns
    -------
    ndarray, shape (B, y1 − y0, x1 − x0) or (B, C, y1 − y0, x1 − x0)
        Warped slices in the input dtype: output pixel ``(i, j)`` samples slice ``k`` at
        ``inv(T_k) (i + y0, j + x0)``. Values are clamped to the range of their input slice
        (and channel), then rounded to nearest for integer dtypes. Computation is float32,
        float64 for float64 slices and for integers of 32 bits or more (float32 on MPS).
        Whole-pixel translations (the identity included) are copied, so they are exact.
        Bilinear warps run in chunks of slices (about 4 M output pixels each), so memory
        stays bounded; cubic warps sample the whole batch at once.

    Raises
    ------
    TypeError
        When `slices` is not integer or float, or an argument has the wrong type.
    ValueError
        When shapes disagree, a transform is not a finite invertible affine, `box` is empty,
        `order` is unknown, `fill` does not fit an integer dtype, or `device` is unavailable.
    """
    source, composed, box, fill, threads = _validate_warp(slices, composed, box, fill, threads)
    order = validate_choice(order, Interpolation, "order")
    device = resolve_device(device)
    if order is Interpolation.LINEAR and device.type == "cpu":
        inverse = np.linalg.inv(composed)
        out = _linear_cpu(source, composed, inverse, box, fill, threads, 0, source.shape[-2])
        return out if np.ndim(slices) == 4 else out[:, 0]
    copied = _integer_shifts(composed)
    size = (box[0][1] - box[0][0], box[1][1] - box[1][0])
    out = np.empty((*source.shape[:2], *size), dtype=source.dtype)
    if not copied.all():
        rest = ~copied
        sample = _sample_cubic if order is Interpolation.CUBIC else _sample_linear
        out[rest] = sample(source[rest], np.linalg.inv(composed[rest]), box, fill, device)
    for k in np.flatnonzero(copied):
        _shift_copy(source[k], composed[k, :2, 2], box, fill, out[k])
    return out if np.ndim(slices) == 4 else out[:, 0]


def _validate_warp(slices, composed, box, fill, threads, height: int | None = None):
    """The checked (B, C, Y, X) slices, transforms, box, fill and threads of a warp.

    `height` is that of the whole frames when `slices` hold only some of their rows.
    """
    source = _validate_slices(slices)
    composed = _validate_matrices(composed, "composed")
    if len(composed) != len(source):
        raise ValueError(
            f"`composed` needs one transform per slice ({len(source)}), got {len(composed)}"
        )
    box = _validate_box(box, (height or source.shape[-2], source.shape[-1]))
    fill = _validate_fill(fill, source.dtype)
    if threads is not None:
        threads = validate_int(threads, "threads", 1)
    return source, composed, box, fill, threads


def _linear_cpu(source, composed, inverse, box, fill, threads, row0, height) -> np.ndarray:
    """The compiled bilinear kernel, whole-pixel shifts copied (exact) over its samples.

    The kernel samples every slice in place: cheaper than gathering the others into a batch
    and back. `source` holds rows ``row0 ..`` of frames `height` tall; `inverse` is the
    inverse of `composed`.
    """
    copied = _integer_shifts(composed)
    if copied.all():
        size = (box[0][1] - box[0][0], box[1][1] - box[1][0])
        out = np.empty((*source.shape[:2], *size), dtype=source.dtype)
    else:
        out = _sample_linear_numba(source, inverse, box, fill, threads, row0, height)
    for k in np.flatnonzero(copied):
        shift = composed[k, :2, 2] + np.array([row0, 0])
        _shift_copy(source[k], shift, box, fill, out[k])
    return out


def source_rows(
    composed: np.ndarray, box: Sequence[Sequence[int]] | None, frame: tuple[int, int]
) -> np.ndarray:
    """The rows of each slice that its bilinear warp onto `box` reads.

    Parameters
    ----------
    composed : ndarray, shape (B, 3, 3)
        Observed → reference transforms, as in :func:`warp_slices`.
    box : ((int, int), (int, int)) or None
        Reference-frame box produced; None is the whole frame.
    frame : (int, int)
        Height and width of the observed slices.

    Returns
    -------
    ndarray of int64, shape (B, 2)
        Half-open rows ``[first, stop)`` per slice, exact: the neighbours of every sample
        whose preimage lies in the frame (``(0, 0)`` when none does).
    """
    composed = _validate_matrices(composed, "composed")
    frame = tuple(validate_int(n, "frame", 1) for n in frame)
    return _rows_read(np.linalg.inv(composed), _validate_box(box, frame), frame)


def _rows_read(inverse: np.ndarray, box: _Box, frame: tuple[int, int]) -> np.ndarray:
    """:func:`source_rows` from the inverse transforms, for a checked box."""
    h = frame[0]
    lo, hi = _row_bounds(inverse, box, frame)
    left, right = np.maximum(lo, box[1][0]), np.minimum(hi, box[1][1] - 1)
    valid = left <= right
    # The kernel's own arithmetic: the preimage's row along an output row is linear in x, so
    # the rows it reads are extreme at the ends of the row's valid columns.
    y = np.arange(*box[0], dtype=np.float64)[None, :]
    ry = inverse[:, 0, 0, None] * y + inverse[:, 0, 2, None]
    ends = [
        np.minimum(np.floor(np.clip(ry + inverse[:, 0, 1, None] * x, 0.0, h - 1.0)),
                   max(h - 2, 0))
        for x in (left.astype(np.float64), right.astype(np.float64))
    ]  # fmt: skip
    first = np.where(valid, np.minimum(*ends), np.inf).min(axis=1)
    last = np.where(valid, np.minimum(np.maximum(*ends) + 1, h - 1), -np.inf).max(axis=1)
    some = valid.any(axis=1)
    rows = np.zeros((len(inverse), 2), np.int64)
    rows[some, 0], rows[some, 1] = first[some], last[some] + 1
    return rows


def warp_rows(
    window: np.ndarray,
    composed: np.ndarray,
    *,
    first_row: int,
    height: int,
    box: Sequence[Sequence[int]] | None = None,
    fill: float = 0,
    threads: int | None = None,
) -> np.ndarray:
    """Bilinear warp on the CPU of slices of which only a band of rows is at hand.

    Parameters
    ----------
    window : ndarray, shape (B, Y, X) or (B, C, Y, X)
        Rows ``first_row .. first_row + Y − 1`` of observed slices `height` rows tall.
    composed : ndarray, shape (B, 3, 3)
        Observed → reference transforms of the whole slices.
    first_row, height : int
        Where the window starts and how tall the slices are.
    box, fill, threads
        As in :func:`warp_slices`; `box` defaults to the whole frame.

    Returns
    -------
    ndarray
        Exactly ``warp_slices(slices, composed, box=box, order="linear", fill=fill,
        device="cpu")`` of the whole slices.

    Raises
    ------
    ValueError
        When the window lacks a row the warp reads (:func:`source_rows`), or as
        :func:`warp_slices` does.
    """
    first_row = validate_int(first_row, "first_row", 0)
    height = validate_int(height, "height", first_row + 1)
    source, composed, box, fill, threads = _validate_warp(window, composed, box, fill, threads,
                                                          height)  # fmt: skip
    stop = first_row + source.shape[-2]
    if stop > height:
        raise ValueError(f"`height` {height} ends before the window's last row {stop - 1}")
    inverse = np.linalg.inv(composed)
    need = _rows_read(inverse, box, (height, source.shape[-1]))
    short = (need[:, 1] > need[:, 0]) & ((need[:, 0] < first_row) | (need[:, 1] > stop))
    if short.any():
        k = int(np.flatnonzero(short)[0])
        raise ValueError(
            f"slice {k} of the window reads rows {need[k, 0]} to {need[k, 1] - 1}; the window "
            f"holds rows {first_row} to {stop - 1}"
        )
    out = _linear_cpu(source, composed, inverse, box, fill, threads, first_row, height)
    return out if np.ndim(window) == 4 else out[:, 0]

"""Geometry of a serial-section stack: composed transforms, drift control, the common valid box.

Conventions. Transforms are 3×3 homogeneous affine matrices acting on ``(y, x, 1)`` pixel
coordinates. ``composed[k]`` (``T_k``) maps pixel ``p`` of observed slice ``k`` to the point
``q = T_k p`` of the reference frame; the aligned slice is
``scipy.ndimage.affine_transform(observed[k], inv(T_k))`` where the preimage lies in the frame.
``pairwise[k]`` maps pixels of slice ``k`` into slice ``k − 1``:
``pairwise[k] = inv(T_{k-1}) @ T_k``, hence ``T_k = pairwise[1] @ … @ pairwise[k]`` when
slice 0 is the reference. Physical coordinates follow OME-NGFF: ``x = S p + o`` with the
pixel spacing ``S = diag(sy, sx)`` and the origin ``o = (oy, ox)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numba
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph
from scipy.sparse import linalg as sparse_linalg

from voxflow.core._validate import validate_int as _validate_int

__all__ = ["compose", "pixel_rms", "solve_stack", "to_physical", "to_pixels", "valid_box"]

VALID_EPS = 1e-9
"""Tolerance, in pixels, of the test ``inv(T) q`` in ``[0, Y − 1] × [0, X − 1]``."""

_AFFINE_TOL = 1e-9  # largest deviation of a bottom row from [0, 0, 1]
_SINGULAR_TOL = 1e-12  # smallest ratio of singular values of an invertible linear part
_ROW_BLOCK = 1 << 22  # (slices × rows) evaluated at once by `valid_box`
_LISTED = 10  # slices named in an error message before "…"

# Drift-control points in the normalised frame [-1, 1]²: the four corners and the centre.
_CONTROL = np.array(
    [[-1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]
)


# --------------------------------------------------------------------------- validation


def _validate_matrices(
    value: object, name: str, *, affine: bool = True, invertible: bool = True
) -> np.ndarray:
    """A float64 (Z, 3, 3) stack of finite matrices; affine ones get an exact bottom row."""
    array = np.asarray(value)
    if array.dtype == bool or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise TypeError(f"`{name}` must hold real numbers, got dtype {array.dtype}")
    if array.ndim != 3 or array.shape[1:] != (3, 3):
        raise ValueError(f"`{name}` must have shape (Z, 3, 3), got {array.shape}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` must hold finite numbers")
    if affine:
        bad = np.abs(array[:, 2] - [0.0, 0.0, 1.0]).max(axis=1) > _AFFINE_TOL
        if bad.any():
            raise ValueError(
                f"`{name}` must be affine (bottom row [0, 0, 1]); "
                f"matrix {int(np.argmax(bad))} has {array[int(np.argmax(bad)), 2].tolist()}"
            )
        array[:, 2] = [0.0, 0.0, 1.0]
    if invertible and len(array):
        sv = np.linalg.svd(array[:, :2, :2], compute_uv=False)
        bad = sv[:, 1] <= _SINGULAR_TOL * sv[:, 0]
        if bad.any():
            raise ValueError(f"`{name}` must be invertible; matrix {int(np.argmax(bad))} is not")
    return array


def _validate_shape(shape: object) -> tuple[int, int]:
    """A (Y, X) frame shape of positive integers."""
    if isinstance(shape, str | bytes) or not isinstance(shape, Sequence | np.ndarray):
        raise TypeError(f"`shape` must be a (Y, X) sequence of integers, got {shape!r}")
    got = tuple(shape)
    if len(got) != 2:
        raise ValueError(f"`shape` needs one size per axis (Y, X), got {got}")
    return tuple(_validate_int(v, "shape", 1) for v in got)


def _validate_reference(reference: object, n: int) -> int:
    reference = _validate_int(reference, "reference", 0)
    if reference >= n:
        raise ValueError(f"`reference` must be a slice index in [0, {n - 1}], got {reference}")
    return reference


def _validate_pair(values: object, name: str) -> tuple[float, float]:
    """Two finite real numbers (y, x)."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise TypeError(f"`{name}` must be a (y, x) sequence of numbers, got {values!r}")
    got = tuple(values)
    if len(got) != 2:
        raise ValueError(f"`{name}` needs one number per axis (y, x), got {got}")
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in got):
        raise TypeError(f"`{name}` must hold real numbers, got {got}")
    if not all(math.isfinite(float(v)) for v in got):
        raise ValueError(f"`{name}` must hold finite numbers, got {got}")
    return float(got[0]), float(got[1])


def _validate_measurements(
    n: int, pairs: object, matrices: object, weights: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (M, 2) of slice indices ``i > j``, their (M, 3, 3) affines and (M,) weights."""
    pairs = np.asarray(pairs)
    if pairs.size == 0:
        pairs = pairs.reshape(0, 2).astype(np.int64)
    if pairs.dtype == bool or not np.issubdtype(pairs.dtype, np.integer):
        raise TypeError(f"`pairs` must hold integer slice indices, got dtype {pairs.dtype}")
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"`pairs` must have shape (M, 2), got {pairs.shape}")
    pairs = pairs.astype(np.int64)
    if len(pairs) and ((pairs < 0).any() or (pairs >= n).any()):
        raise ValueError(f"`pairs` must hold slice indices in [0, {n - 1}]")
    if (pairs[:, 1] >= pairs[:, 0]).any():
        raise ValueError(
            f"`pairs` must hold (i, j) with j < i, got {pairs[pairs[:, 1] >= pairs[:, 0]][0]}"
        )
    matrices = np.asarray(matrices)
    if matrices.size == 0 and not len(pairs):
        matrices = np.zeros((0, 3, 3))
    matrices = _validate_matrices(matrices, "matrices", invertible=False)
    if len(matrices) != len(pairs):
        raise ValueError(
            f"`matrices` needs one matrix per pair ({len(pairs)}), got {len(matrices)}"
        )
    if weights is None:
        return pairs, matrices, np.ones(len(pairs))
    weights = np.asarray(weights)
    if weights.dtype == bool or not np.issubdtype(weights.dtype, np.number):
        raise TypeError(f"`weights` must hold real numbers, got dtype {weights.dtype}")
    if weights.shape != (len(pairs),):
        raise ValueError(f"`weights` must have shape ({len(pairs)},), got {weights.shape}")
    weights = weights.astype(np.float64)
    if not (np.isfinite(weights).all() and (weights >= 0).all()):
        raise ValueError("`weights` must hold finite numbers >= 0")
    return pairs, matrices, weights


# --------------------------------------------------------------------------- composition


def compose(pairwise: np.ndarray, *, reference: int = 0) -> np.ndarray:
    """Composed observed → reference transforms from pairwise slice-to-previous-slice ones.

    Parameters
    ----------
    pairwise : ndarray, shape (Z, 3, 3)
        ``pairwise[k]`` maps pixel coordinates of slice ``k`` into slice ``k − 1``;
        ``pairwise[0]`` is ignored.
    reference : int, optional
        Slice whose frame is the reference: ``composed[reference]`` is the identity.

    Returns
    -------
    ndarray of float64, shape (Z, 3, 3)
        ``composed[k]`` maps pixels of slice ``k`` to the reference frame, with
        ``composed[k - 1] @ pairwise[k] == composed[k]`` for every ``k >= 1``: prefix products
        ``pairwise[r + 1] @ … @ pairwise[k]`` above the reference ``r`` and
        ``inv(pairwise[r]) @ … @ inv(pairwise[k + 1])`` below it.

    Raises
    ------
    TypeError
        When `pairwise` does not hold real numbers or `reference` is not an integer.
    ValueError
        When `pairwise` is not (Z, 3, 3), ``pairwise[1:]`` holds a non-finite, non-affine or
        singular matrix, or `reference` is not a slice index.
    """
    array = np.asarray(pairwise)
    if array.ndim != 3 or array.shape[1:] != (3, 3) or not len(array):
        raise ValueError(f"`pairwise` must have shape (Z, 3, 3) with Z >= 1, got {array.shape}")
    steps = _validate_matrices(array[1:], "pairwise")
    reference = _validate_reference(reference, len(array))
    composed = np.tile(np.eye(3), (len(array), 1, 1))
    for k in range(reference + 1, len(array)):
        composed[k] = composed[k - 1] @ steps[k - 1]
    for k in range(reference - 1, -1, -1):
        composed[k] = composed[k + 1] @ np.linalg.inv(steps[k])
    composed[:, 2] = [0.0, 0.0, 1.0]
    return composed


# --------------------------------------------------------------------------- drift control


def _check_connected(n: int, pairs: np.ndarray, reference: int) -> None:
    """Raise when some slice has no chain of measurements to the reference."""
    graph = sparse.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, component = csgraph.connected_components(graph, directed=False)
    lost = np.flatnonzero(component != component[reference])
    if len(lost):
        named = ", ".join(str(k) for k in lost[:_LISTED])
        more = f", … ({len(lost)} in all)" if len(lost) > _LISTED else ""
        raise ValueError(
            f"slices {named}{more} are not connected to the reference slice {reference} by "
            "measurements of positive weight; add pairs or weights that reach them"
        )


def _frame_normaliser(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Matrix C taking [-1, 1]² to the frame's corners, and its half sizes (hy, hx)."""
    half = np.maximum((np.asarray(shape, float) - 1) / 2, 0.5)
    centre = (np.asarray(shape, float) - 1) / 2
    normaliser = np.array([[half[0], 0.0, centre[0]], [0.0, half[1], centre[1]], [0.0, 0.0, 1.0]])
    return normaliser, half


def _drift_system(
    n: int, pairs: np.ndarray, matrices: np.ndarray, weights: np.ndarray, reference: int, half
) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Rows ``sqrt(w) h_c (A_i[c] · u − A_j[c] · M u)``, one per pair, control point, axis."""
    m, s = len(pairs), len(_CONTROL)
    unknown = np.arange(n) - (np.arange(n) > reference)
    unknown[reference] = -1
    targets = np.einsum("mab,sb->msa", matrices, _CONTROL)  # M u, shape (M, S, 3)
    scale = np.sqrt(weights)[:, None, None] * half[None, None, :]  # (M, 1, 2)
    rows = np.arange(m * s * 2).reshape(m, s, 2)
    entries, rhs, full = [], np.zeros(m * s * 2), (m, s, 2, 3)
    for side, sign, points in ((0, 1.0, np.broadcast_to(_CONTROL, (m, s, 3))), (1, -1.0, targets)):
        slices = pairs[:, side]
        known = slices == reference
        # A known reference row A_ref[c] = e_c moves its term to the right-hand side.
        rhs -= (sign * scale * points[:, :, :2] * known[:, None, None]).ravel()
        col = unknown[slices][:, None, None, None] * 6 + np.arange(2)[:, None] * 3 + np.arange(3)
        col = np.broadcast_to(col, full)
        value = sign * scale[..., None] * points[:, :, None, :]  # (M, S, 2, 3)
        take = np.broadcast_to(~known[:, None, None, None], full)
        row = np.broadcast_to(rows[..., None], full)
        entries.append((value[take], row[take], col[take]))
    value, row, col = (np.concatenate(parts) for parts in zip(*entries, strict=True))
    system = sparse.csr_matrix((value, (row, col)), shape=(m * s * 2, 6 * (n - 1)))
    return system, rhs


def solve_stack(
    n: int,
    pairs: np.ndarray,
    matrices: np.ndarray,
    shape: Sequence[int],
    *,
    weights: np.ndarray | None = None,
    reference: int = 0,
) -> np.ndarray:
    """Composed transforms that best agree with redundant pairwise measurements (drift control).

    Every measurement ``(i, j, M_ij)`` states ``T_j @ M_ij = T_i``, linear in the unknown
    affines ``T_k`` (six numbers each; ``T_reference`` is the identity). The residual of a
    measurement is evaluated in reference-frame pixels at five control points ``p`` of the
    frame, its four corner pixels and its centre: ``r = T_i p − T_j M_ij p``. The weighted
    sum of squared residuals is minimised by a sparse linear least-squares solve (normal
    equations in a frame normalised to [-1, 1]², factorised by SuperLU), so thousands of
    slices are cheap. Measurements between consecutive slices only reproduce `compose`.

    Parameters
    ----------
    n : int
        Number of slices.
    pairs : ndarray of int, shape (M, 2)
        Measured pairs ``(i, j)`` with ``j < i``.
    matrices : ndarray, shape (M, 3, 3)
        ``matrices[m]`` maps pixel coordinates of slice ``i`` into slice ``j``, as
        ``pairwise`` in `compose`.
    shape : sequence of int
        The (Y, X) frame the control points are taken from; a size of 1 uses control
        points half a pixel either side of the centre.
    weights : ndarray, shape (M,), optional
        Non-negative weight of each measurement (0 drops it). None weighs all by 1.
    reference : int, optional
        Slice whose frame is the reference.

    Returns
    -------
    ndarray of float64, shape (n, 3, 3)
        Composed transforms, observed slice ``k`` → reference frame; bottom row ``[0, 0, 1]``.

    Raises
    ------
    TypeError
        When an argument has the wrong type.
    ValueError
        When shapes disagree, a matrix is not finite and affine, a pair is not ``(i, j)`` with
        ``0 <= j < i < n``, a weight is negative, or the measurements with positive weight
        leave some slices unconnected to the reference (the message names them).
    """
    n = _validate_int(n, "n", 1)
    pairs, matrices, weights = _validate_measurements(n, pairs, matrices, weights)
    shape = _validate_shape(shape)
    reference = _validate_reference(reference, n)
    keep = weights > 0
    pairs, matrices, weights = pairs[keep], matrices[keep], weights[keep]
    _check_connected(n, pairs, reference)
    composed = np.tile(np.eye(3), (n, 1, 1))
    if n == 1:
        return composed
    normaliser, half = _frame_normaliser(shape)
    inverse = np.linalg.inv(normaliser)
    system, rhs = _drift_system(n, pairs, inverse @ matrices @ normaliser, weights, reference, half)
    normal = (system.T @ system).tocsc()
    solution = sparse_linalg.splu(normal).solve(system.T @ rhs)
    others = np.delete(np.arange(n), reference)
    composed[others, :2, :] = solution.reshape(n - 1, 2, 3)
    composed = normaliser @ composed @ inverse
    composed[:, 2] = [0.0, 0.0, 1.0]
    return composed


# --------------------------------------------------------------------------- valid box


def _row_intervals(
    inverse: np.ndarray, shape: tuple[int, int], rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Real bounds [lo, hi] on x, per slice and row y, from the four frame half-planes.

    `rows` are the reference rows (default: those of the frame, 0 … Y − 1).
    """
    rows = np.arange(shape[0], dtype=np.float64) if rows is None else np.asarray(rows, float)
    lo = np.full((len(inverse), len(rows)), -np.inf)
    hi = np.full((len(inverse), len(rows)), np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        for c, upper in enumerate((shape[0] - 1, shape[1] - 1)):
            slope = inverse[:, c, 1][:, None]
            offset = inverse[:, c, 0][:, None] * rows + inverse[:, c, 2][:, None]
            first = (-VALID_EPS - offset) / slope
            last = (upper + VALID_EPS - offset) / slope
            flat = slope == 0
            feasible = (offset >= -VALID_EPS) & (offset <= upper + VALID_EPS)
            low = np.where(flat, np.where(feasible, -np.inf, np.inf), np.minimum(first, last))
            high = np.where(flat, np.where(feasible, np.inf, -np.inf), np.maximum(first, last))
            lo, hi = np.maximum(lo, low), np.minimum(hi, high)
    return lo, hi


def _common_rows(composed: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive integer x range valid for every slice, per reference row; empty when lo > hi."""
    inverse = np.linalg.inv(composed)
    lo = np.full(shape[0], -np.inf)
    hi = np.full(shape[0], np.inf)
    step = max(1, _ROW_BLOCK // shape[0])
    for start in range(0, len(inverse), step):
        block_lo, block_hi = _row_intervals(inverse[start : start + step], shape)
        lo = np.maximum(lo, block_lo.max(axis=0))
        hi = np.minimum(hi, block_hi.min(axis=0))
    lo = np.clip(np.ceil(lo), 0, shape[1]).astype(np.int64)
    hi = np.clip(np.floor(hi), -1, shape[1] - 1).astype(np.int64)
    return lo, hi


@numba.njit(cache=True, nogil=True)
def _largest_box(lo, hi):
    """Largest box over row intervals: first by (y0, y1) among equal areas; x0 leftmost."""
    n = lo.size
    best, y0b, y1b, x0b, x1b = 0, 0, 0, 0, 0
    for y0 in range(n):
        left, right = lo[y0], hi[y0]
        for y1 in range(y0, n):
            left, right = max(left, lo[y1]), min(right, hi[y1])
            width = right - left + 1
            # Widths only shrink as rows are added: stop once no taller box can win.
            if width <= 0 or (n - y0) * width <= best:
                break
            if (y1 - y0 + 1) * width > best:
                best, y0b, y1b, x0b, x1b = (y1 - y0 + 1) * width, y0, y1 + 1, left, right + 1
    return best, y0b, y1b, x0b, x1b


def valid_box(
    composed: np.ndarray, shape: Sequence[int], *, margin: int = 0
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Largest axis-aligned box of the reference frame that every slice covers.

    Reference pixel ``q = (y, x)`` is valid for slice ``k`` when ``inv(T_k) q`` lies in
    ``[0, Y − 1] × [0, X − 1]`` (with a tolerance of 1e-9 pixel). The valid set of each
    slice is convex, so on every reference row the pixels valid for all slices form one
    interval, computed from four half-plane constraints per slice without a pixel mask.
    The box is the largest-area one made of whole rows of those intervals; the search
    is exact over all row pairs (O(Y²) at worst, pruned).

    Parameters
    ----------
    composed : ndarray, shape (Z, 3, 3)
        Observed → reference transforms, e.g. from `compose` or `solve_stack`.
    shape : sequence of int
        (Y, X) of the observed slices; the reference frame has the same shape.
    margin : int, optional
        Pixels removed from every side of the box.

    Returns
    -------
    tuple of tuple of int
        Half-open ``((y0, y1), (x0, x1))`` in reference-frame pixels. Among boxes of equal
        area the one with the smallest ``y0``, then the smallest ``y1``, is returned.

    Raises
    ------
    TypeError
        When an argument has the wrong type.
    ValueError
        When `composed` is not (Z, 3, 3) invertible affines, `shape` is not two positive
        sizes, `margin` is negative, or no pixel (after the margin) is valid for all slices.
    """
    composed = _validate_matrices(composed, "composed")
    shape = _validate_shape(shape)
    margin = _validate_int(margin, "margin", 0)
    if not len(composed):
        raise ValueError("`composed` must hold at least one transform, got shape (0, 3, 3)")
    lo, hi = _common_rows(composed, shape)
    area, y0, y1, x0, x1 = _largest_box(lo, hi)
    y0, y1, x0, x1 = y0 + margin, y1 - margin, x0 + margin, x1 - margin
    if area == 0 or y1 <= y0 or x1 <= x0:
        extra = f" after a margin of {margin} pixels" if margin and area else ""
        raise ValueError(
            f"the transforms leave no common region of the {shape} frame valid in every "
            f"slice{extra}; check the transforms or do not crop (--no-crop)"
        )
    return (int(y0), int(y1)), (int(x0), int(x1))


# --------------------------------------------------------------------------- units


def _physical_frame(spacing: object, origin: object) -> np.ndarray:
    """H = [[sy, 0, oy], [0, sx, ox], [0, 0, 1]]: pixel → physical coordinates."""
    sy, sx = _validate_pair(spacing, "spacing")
    if sy <= 0 or sx <= 0:
        raise ValueError(f"`spacing` must hold positive numbers, got {(sy, sx)}")
    oy, ox = _validate_pair(origin, "origin")
    return np.array([[sy, 0.0, oy], [0.0, sx, ox], [0.0, 0.0, 1.0]])


def _validate_any_matrices(value: object, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim < 2 or array.shape[-2:] != (3, 3):
        raise ValueError(f"`{name}` must have shape (..., 3, 3), got {array.shape}")
    flat = _validate_matrices(array.reshape(-1, 3, 3), name, affine=False, invertible=False)
    return flat.reshape(array.shape)


def to_physical(
    matrices: np.ndarray, spacing: Sequence[float], origin: Sequence[float] = (0.0, 0.0)
) -> np.ndarray:
    """Pixel-coordinate transforms expressed on physical coordinates.

    Parameters
    ----------
    matrices : ndarray, shape (..., 3, 3)
        Homogeneous transforms on ``(y, x, 1)`` pixel coordinates.
    spacing : sequence of float
        Pixel size (sy, sx), e.g. in micrometres: the NGFF scale.
    origin : sequence of float, optional
        Physical position (oy, ox) of pixel (0, 0): the NGFF translation.

    Returns
    -------
    ndarray of float64, shape (..., 3, 3)
        ``H @ T @ inv(H)`` with ``H = [[sy, 0, oy], [0, sx, ox], [0, 0, 1]]``: maps the
        physical position of ``p`` to the physical position of ``T p``.

    Raises
    ------
    TypeError
        When an argument has the wrong type.
    ValueError
        When `matrices` is not (..., 3, 3) finite, or `spacing` is not positive.
    """
    frame = _physical_frame(spacing, origin)
    return frame @ _validate_any_matrices(matrices, "matrices") @ np.linalg.inv(frame)


def to_pixels(
    matrices_um: np.ndarray, spacing: Sequence[float], origin: Sequence[float] = (0.0, 0.0)
) -> np.ndarray:
    """Physical-coordinate transforms expressed on pixel coordinates; inverse of `to_physical`.

    Parameters
    ----------
    matrices_um : ndarray, shape (..., 3, 3)
        Homogeneous transforms on ``(y, x, 1)`` physical coordinates.
    spacing : sequence of float
        Pixel size (sy, sx), in the physical unit.
    origin : sequence of float, optional
        Physical position (oy, ox) of pixel (0, 0).

    Returns
    -------
    ndarray of float64, shape (..., 3, 3)
        ``inv(H) @ T_um @ H``, see `to_physical`.

    Raises
    ------
    TypeError
        When an argument has the wrong type.
    ValueError
        When `matrices_um` is not (..., 3, 3) finite, or `spacing` is not positive.
    """
    frame = _physical_frame(spacing, origin)
    return np.linalg.inv(frame) @ _validate_any_matrices(matrices_um, "matrices_um") @ frame


# --------------------------------------------------------------------------- residuals


def pixel_rms(estimate: np.ndarray, truth: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Root-mean-square distance between two transforms' images of every pixel of a frame.

    Parameters
    ----------
    estimate, truth : ndarray, shape (Z, 3, 3)
        Affine transforms on ``(y, x, 1)`` pixel coordinates.
    shape : sequence of int
        (Y, X) of the frame whose pixels ``p`` are compared.

    Returns
    -------
    ndarray of float64, shape (Z,)
        ``sqrt(mean_p ||estimate[k] p − truth[k] p||²)`` over all ``Y × X`` pixels, in
        closed form: the difference is affine, ``d(p) = L p + t``, and the pixel grid has
        independent coordinates of mean ``(n − 1) / 2`` and variance ``(n² − 1) / 12``.

    Raises
    ------
    TypeError
        When an argument has the wrong type.
    ValueError
        When the transforms are not affine (Z, 3, 3) of equal shapes, or `shape` is invalid.
    """
    estimate = _validate_matrices(estimate, "estimate", invertible=False)
    truth = _validate_matrices(truth, "truth", invertible=False)
    if estimate.shape != truth.shape:
        raise ValueError(
            f"`estimate` and `truth` must have equal shapes, got {estimate.shape} and {truth.shape}"
        )
    sizes = np.asarray(_validate_shape(shape), dtype=np.float64)
    mean, variance = (sizes - 1) / 2, (sizes**2 - 1) / 12
    diff = estimate[:, :2] - truth[:, :2]  # (Z, 2, 3): rows of L and t
    at_mean = diff[:, :, :2] @ mean + diff[:, :, 2]
    spread = (diff[:, :, :2] ** 2) @ variance
    return np.sqrt(np.sum(at_mean**2 + spread, axis=1))

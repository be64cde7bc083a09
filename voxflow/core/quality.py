"""Figures that say how well a correction recovered a known truth (synthetic data)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "block_cv",
    "cell_cv",
    "detection_scores",
    "field_correlation",
    "match_points",
    "sample_at",
]


def field_correlation(
    field: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None
) -> float:
    """Pearson correlation of a recovered field with the true one, over `mask`.

    Parameters
    ----------
    field, truth : numpy.ndarray
        Same shape; the scale of either does not matter.
    mask : numpy.ndarray of bool, optional
        Where to compare (the tissue, say); None: everywhere.

    Returns
    -------
    float
        r in [-1, 1].
    """
    field, truth = np.asarray(field, np.float64), np.asarray(truth, np.float64)
    if field.shape != truth.shape:
        raise ValueError(f"`field` {field.shape} and `truth` {truth.shape} differ in shape")
    keep = np.ones(field.shape, bool) if mask is None else np.asarray(mask, bool)
    return float(np.corrcoef(field[keep], truth[keep])[0, 1])


def sample_at(image: np.ndarray, coords: Sequence[np.ndarray]) -> np.ndarray:
    """Values of `image` at the nearest voxel to each point of an index grid (clamped).

    Parameters
    ----------
    image : numpy.ndarray
        Array to sample.
    coords : sequence of numpy.ndarray
        Continuous voxel index along each axis (1-D per axis; the grid is their outer product).

    Returns
    -------
    numpy.ndarray
        Shape ``(len(coords[0]), len(coords[1]), ...)``.
    """
    index = [
        np.clip(np.rint(c).astype(np.intp), 0, n - 1)
        for c, n in zip(coords, image.shape, strict=True)
    ]
    return image[np.ix_(*index)]


def cell_cv(image: np.ndarray, clean: np.ndarray, labels: np.ndarray, offset: float = 0.0) -> float:
    """Spread of cell brightness relative to the truth, across the volume.

    For every labelled cell, the mean of ``image - offset`` over its voxels divided by the mean
    of `clean` over them; the result is the coefficient of variation (std / mean) of these
    ratios. A multiplicative bias makes the ratios follow the bias; a perfect correction makes
    them all equal (0).

    Parameters
    ----------
    image : numpy.ndarray
        Observed or corrected voxels.
    clean : numpy.ndarray
        The true signal before bias, background and noise.
    labels : numpy.ndarray of int
        Cell labels, 0 outside cells.
    offset : float, optional
        Additive background of `image`.

    Returns
    -------
    float
        Coefficient of variation.
    """
    ids = np.unique(labels[labels > 0])
    measured = ndimage.mean(image.astype(np.float64) - offset, labels, ids)
    expected = ndimage.mean(clean.astype(np.float64), labels, ids)
    ratios = np.asarray(measured) / np.asarray(expected)
    return float(ratios.std() / ratios.mean())


def block_cv(
    image: np.ndarray,
    clean: np.ndarray,
    mask: np.ndarray,
    block: Sequence[int],
    offset: float = 0.0,
    min_fraction: float = 0.5,
) -> float:
    """Spread, across blocks, of the mean of ``image - offset`` relative to `clean` in `mask`.

    The volume is cut into blocks of `block` voxels; in each block at least `min_fraction`
    inside `mask` (the tissue between cells, say), the ratio of the mean of ``image - offset``
    to the mean of `clean` is taken; the result is the coefficient of variation of the ratios.

    Returns
    -------
    float
        Coefficient of variation.
    """
    ratios = []
    for index in np.ndindex(*(-(-n // b) for n, b in zip(image.shape, block, strict=True))):
        sl = tuple(slice(i * b, (i + 1) * b) for i, b in zip(index, block, strict=True))
        m = mask[sl]
        if m.mean() < min_fraction:
            continue
        ratios.append((image[sl][m].astype(np.float64) - offset).mean() / clean[sl][m].mean())
    values = np.asarray(ratios)
    return float(values.std() / values.mean())


def match_points(
    detected: np.ndarray, truth: np.ndarray, radius: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matches of detected points to true points within each true point's radius.

    Candidate pairs closer than the true point's radius are taken closest first (a greedy
    assignment: each detection and each true point is used at most once).

    Parameters
    ----------
    detected : numpy.ndarray, shape (M, D)
        Detected positions (physical units).
    truth : numpy.ndarray, shape (N, D)
        True positions, same units.
    radius : float or numpy.ndarray of shape (N,)
        Matching radius of each true point.

    Returns
    -------
    det_index, truth_index : numpy.ndarray of intp
        Matched pairs, closest first.
    """
    from scipy.spatial import cKDTree

    truth = np.asarray(truth, np.float64)
    detected = np.asarray(detected, np.float64).reshape(-1, truth.shape[1])
    radius = np.broadcast_to(np.asarray(radius, np.float64), (truth.shape[0],))
    empty = np.empty(0, np.intp)
    if detected.size == 0 or truth.size == 0:
        return empty, empty
    pairs = cKDTree(truth).query_ball_point(detected, float(radius.max()))
    det = np.repeat(np.arange(len(pairs)), [len(p) for p in pairs])
    tru = np.fromiter((j for p in pairs for j in p), np.intp, det.size)
    dist = np.linalg.norm(detected[det] - truth[tru], axis=1)
    keep = dist <= radius[tru]
    det, tru, dist = det[keep], tru[keep], dist[keep]
    order = np.argsort(dist, kind="stable")
    used_d, used_t = np.zeros(len(detected), bool), np.zeros(len(truth), bool)
    out_d, out_t = [], []
    for d, t in zip(det[order], tru[order], strict=True):
        if not used_d[d] and not used_t[t]:
            used_d[d] = used_t[t] = True
            out_d.append(d)
            out_t.append(t)
    return np.asarray(out_d, np.intp), np.asarray(out_t, np.intp)


def detection_scores(
    detected: np.ndarray,
    truth: np.ndarray,
    radius: np.ndarray | float,
    subset: np.ndarray | None = None,
) -> dict[str, float]:
    """Precision, recall and F1 of detections against true points (see `match_points`).

    Parameters
    ----------
    detected, truth, radius
        As for :func:`match_points`.
    subset : numpy.ndarray of bool, shape (N,), optional
        Score only these true points (the touching cells, say): recall over them, and
        precision over the detections whose nearest true point is one of them.

    Returns
    -------
    dict
        ``precision``, ``recall``, ``f1``, ``tp``, ``fp``, ``fn``.
    """
    from scipy.spatial import cKDTree

    truth = np.asarray(truth, np.float64)
    detected = np.asarray(detected, np.float64).reshape(-1, truth.shape[1])
    d_idx, t_idx = match_points(detected, truth, radius)
    if subset is None:
        subset = np.ones(len(truth), bool)
    subset = np.asarray(subset, bool)
    matched_t = np.zeros(len(truth), bool)
    matched_t[t_idx] = True
    matched_d = np.zeros(len(detected), bool)
    matched_d[d_idx] = True
    if len(truth) and len(detected):
        nearest = cKDTree(truth).query(detected)[1]
        near_subset = subset[nearest]
    else:
        near_subset = np.zeros(len(detected), bool)
    tp = int((matched_t & subset).sum())
    fn = int((~matched_t & subset).sum())
    fp = int((~matched_d & near_subset).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}

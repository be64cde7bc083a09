"""Figures that say how well a correction recovered a known truth (synthetic data)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["block_cv", "cell_cv", "field_correlation", "sample_at"]


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

"""The ``omero`` block of an image: channel display windows that fit its voxels.

A window tells a viewer how to map a channel's values to brightness: ``min`` and ``max`` bound
the values the channel can take, ``start`` and ``end`` are the values shown black and white.
An image whose intensities were rescaled or changed type needs windows of its own; those of
its source would show it black or saturated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["WINDOW_PERCENTILES", "fit_windows", "sample_steps"]

WINDOW_PERCENTILES = (0.5, 99.8)
"""Percentiles of a channel's voxels shown black and white (``start`` and ``end``)."""

_SAMPLE_VOXELS = 2**22


def sample_steps(
    shape: Sequence[int], dims: Sequence[str], *, voxels: int = _SAMPLE_VOXELS
) -> tuple[int, ...]:
    """Steps per axis that sample at most about `voxels` voxels per channel.

    Parameters
    ----------
    shape : sequence of int
        Array shape.
    dims : sequence of str
        Axis names; the channel axis ``c`` is never stepped over.
    voxels : int, optional
        Voxels per channel to sample at most (about 4 million by default).

    Returns
    -------
    tuple of int
        The same step on every other axis (1 when the array is small enough).
    """
    per_channel = math.prod(n for n, d in zip(shape, dims, strict=True) if d != "c")
    sampled = sum(1 for n, d in zip(shape, dims, strict=True) if d != "c" and n > 1)
    step = 1
    while sampled and per_channel / step**sampled > voxels:
        step += 1
    return tuple(1 if d == "c" else step for d in dims)


def _window(values: np.ndarray, dtype: np.dtype) -> dict[str, float] | None:
    if dtype.kind == "b":
        values = values.astype(np.uint8)
    finite = values[np.isfinite(values)] if dtype.kind == "f" else values
    if finite.size == 0:
        return None
    start, end = (float(v) for v in np.percentile(finite, WINDOW_PERCENTILES))
    if dtype.kind in "iu":
        low, high = float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
    elif dtype.kind == "b":
        low, high = 0.0, 1.0
    else:
        low, high = float(finite.min()), float(finite.max())
    return {"min": low, "max": high, "start": start, "end": end}


def fit_windows(
    omero: dict[str, Any] | None, sample: np.ndarray, dims: Sequence[str]
) -> dict[str, Any] | None:
    """`omero` with the window of every listed channel taken from `sample`.

    Parameters
    ----------
    omero : dict or None
        The omero block; its channels are matched to the channel axis in order.
    sample : numpy.ndarray
        Voxels of the image, shape matching `dims`: a low-resolution level, or a strided
        sample (:func:`sample_steps`).
    dims : sequence of str
        Axis names of `sample`.

    Returns
    -------
    dict or None
        A new block: per channel, ``min`` and ``max`` are the range of the data type for
        integers (0 and 1 for bool) and the smallest and largest finite value of the channel
        for floats; ``start`` and ``end`` are the channel's :data:`WINDOW_PERCENTILES`.
        Channels without finite values, and every other key, are kept as they are. None
        when `omero` is None.
    """
    if omero is None or not omero.get("channels"):
        return omero
    dtype = sample.dtype
    data = np.moveaxis(sample, list(dims).index("c"), 0) if "c" in dims else sample[None]
    channels = []
    for i, channel in enumerate(omero["channels"]):
        window = _window(np.asarray(data[i]).ravel(), dtype) if i < len(data) else None
        channels.append({**channel, "window": window} if window else dict(channel))
    return {**omero, "channels": channels}

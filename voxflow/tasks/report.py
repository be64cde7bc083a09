"""Numbers that say whether a result agrees with what it was made from."""

from __future__ import annotations

import numpy as np

from voxflow.io import ImageRef, Location, read_level

__all__ = ["label_volumes", "level_means", "physical_extents", "read_json"]


def read_json(url: str) -> dict:
    """A JSON document (ground truth, say) at `url`.

    Raises
    ------
    FileNotFoundError
        When there is none.
    """
    loc = Location.parse(url)
    parent, _, key = loc.path.rpartition("/")
    doc = Location(loc.scheme, parent).read_json(key)
    if doc is None:
        raise FileNotFoundError(f"no such document: {loc.url}")
    return doc


def physical_extents(ref: ImageRef) -> list[tuple[float, ...]]:
    """Physical size (shape × scale) of every level, spatial and other axes alike."""
    return [tuple(n * s for n, s in zip(lv.shape, lv.scale, strict=True)) for lv in ref.levels]


def level_means(ref: ImageRef) -> list[float]:
    """Mean voxel value of every level (a mean pyramid keeps it up to edge weighting)."""
    return [
        float(read_level(ref, i).mean(dtype=np.float64).compute()) for i in range(len(ref.levels))
    ]


def label_volumes(ref: ImageRef, level: int) -> dict[int, float]:
    """Physical volume of every label at `level`: voxel count × voxel volume."""
    lv = ref.levels[level]
    labels = read_level(ref, level).compute()
    counts = np.bincount(labels.ravel().astype(np.int64))
    voxel = float(
        np.prod([s for s, t in zip(lv.scale, ref.axis_types, strict=True) if t == "space"])
    )
    return {int(i): float(c) * voxel for i, c in enumerate(counts) if c and i}

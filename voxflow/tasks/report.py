"""Numbers that say whether a result agrees with what it was made from."""

from __future__ import annotations

import numpy as np

from voxflow.core import quality, synth
from voxflow.io import ImageRef, Location, read_level
from voxflow.tasks._run import RunFolder

__all__ = [
    "correction_figures",
    "label_volumes",
    "level_means",
    "physical_extents",
    "read_json",
    "registration_figures",
    "segmentation_figures",
]


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


def correction_figures(
    original: ImageRef, corrected: ImageRef, field: ImageRef, truth: dict
) -> dict[str, float]:
    """How well a bias correction of a synthetic lightsheet volume recovered the truth.

    The volume is generated again from the ground truth's shape and seed (it is
    deterministic) for its clean signal, cell labels and tissue mask.

    Parameters
    ----------
    original, corrected : ImageRef
        The synthetic image and its correction (channel 0 is compared).
    field : ImageRef
        The low-resolution field the correction divided by.
    truth : dict
        ``ground_truth.json`` of the synthetic dataset.

    Returns
    -------
    dict
        ``field_r``: Pearson r of the field with the true bias at the field's voxel centres,
        over the tissue; ``cell_cv_before``/``after``: coefficient of variation of cell
        brightness relative to the clean signal (see :func:`voxflow.core.quality.cell_cv`);
        ``background_cv_before``/``after``: the same for the tissue between cells, over blocks
        of 8 × 16 × 16 voxels (:func:`voxflow.core.quality.block_cv`).
    """
    vol = synth.lightsheet(tuple(truth["shape"]), seed=truth["seed"])
    bias = truth["bias"]
    low = read_level(field, 0).compute()[0].astype(np.float64)
    lv, lv0 = field.levels[0], original.levels[0]
    # Field voxel centres as level-0 voxel indices, then the bias model in micrometres.
    coords = [
        (t + np.arange(n) * s - t0) / s0
        for n, s, t, s0, t0 in zip(lv.shape[1:], lv.scale[1:], lv.translation[1:],
                                   lv0.scale[1:], lv0.translation[1:], strict=True)
    ]  # fmt: skip
    z_um, x_um = coords[0] * vol.spacing[0], coords[2] * vol.spacing[2]
    true = (np.exp(-z_um / bias["length_z_um"])[:, None, None]
            * np.exp(-x_um / bias["length_x_um"])[None, None, :]) * np.ones(low.shape)  # fmt: skip
    tissue = quality.sample_at(vol.tissue, coords)
    before = read_level(original, 0)[0].compute()
    after = read_level(corrected, 0)[0].compute()
    between = vol.tissue & (vol.cell_labels == 0)
    offset = float(truth["background"])
    return {
        "field_r": quality.field_correlation(low, true, tissue),
        "cell_cv_before": quality.cell_cv(before, vol.clean, vol.cell_labels, offset),
        "cell_cv_after": quality.cell_cv(after, vol.clean, vol.cell_labels, offset),
        "background_cv_before": quality.block_cv(before, vol.clean, between, (8, 16, 16), offset),
        "background_cv_after": quality.block_cv(after, vol.clean, between, (8, 16, 16), offset),
    }


def segmentation_figures(run: str, truth: dict, *, min_cells: int = 50) -> dict[str, float]:
    """Detection and per-region counting accuracy of a run against the synthetic truth.

    A detection matches a true cell when its centroid lies within the cell's radius (one to
    one, closest first). Region counts are compared for regions holding at least
    `min_cells` true cells (parents included), when the run has a region table.

    Returns
    -------
    dict
        ``f1``, ``precision``, ``recall``, ``detected``, ``cells``; ``f1_touching`` (cells
        placed in contact); ``regions_compared``, ``max_region_error`` (relative) and
        ``region_errors`` (id → relative error) when regions were counted.
    """
    folder = RunFolder(run)
    objects = folder.read_table("objects.parquet")
    points = objects[["z_um", "y_um", "x_um"]].to_numpy(np.float64).reshape(-1, 3)
    cells = np.asarray(truth["centroids_um"], np.float64).reshape(-1, 3)
    radii = np.asarray(truth["radii_um"], np.float64)
    overall = quality.detection_scores(points, cells, radii)
    touching = np.zeros(len(cells), bool)
    for a, b in truth["touching"]:
        touching[[a - 1, b - 1]] = True
    near = quality.detection_scores(points, cells, radii, subset=touching)
    figures = {
        "f1": overall["f1"], "precision": overall["precision"], "recall": overall["recall"],
        "detected": float(len(points)), "cells": float(len(cells)),
        "f1_touching": near["f1"], "touching_cells": float(touching.sum()),
    }  # fmt: skip
    if folder.loc.exists("regions.csv"):
        ours = folder.read_table("regions.csv").set_index("id")["count"]
        errors = {
            int(r["id"]): abs(int(ours.get(r["id"], 0)) - r["cell_count"]) / r["cell_count"]
            for r in truth["regions"]
            if r["cell_count"] >= min_cells
        }
        figures.update(regions_compared=float(len(errors)),
                       max_region_error=max(errors.values(), default=0.0),
                       region_errors=errors)  # fmt: skip
    return figures


def registration_figures(aligned: ImageRef, truth: dict) -> dict[str, float]:
    """Residual misalignment and crop box of an aligned synthetic EM stack against its truth.

    Parameters
    ----------
    aligned : ImageRef
        Output of the registration (its ``transforms`` provenance is read).
    truth : dict
        The stack's ``ground_truth.json``.

    Returns
    -------
    dict
        ``rms_max`` and ``rms_mean`` (per-slice RMS over the frame of the distance between
        the recovered and the true composed transforms, pixels), ``rms_last`` (the last
        slice), ``box_error`` (largest difference of a crop-box edge, pixels), ``pairs`` and
        ``converged`` (counts).
    """
    from voxflow.core.stack import pixel_rms

    doc = (aligned.provenance or {})["transforms"]
    frame = tuple(doc["frame"])
    rms = pixel_rms(np.asarray(doc["composed"]), np.asarray(truth["transforms"]), frame)
    box = np.asarray(doc["crop"]["box"]) - np.asarray(truth["valid_box"])
    return {
        "rms_max": float(rms.max()),
        "rms_mean": float(rms.mean()),
        "rms_last": float(rms[-1]),
        "box_error": float(np.abs(box).max()),
        "pairs": float(len(doc["pairs"])),
        "converged": float(sum(p["converged"] for p in doc["pairs"])),
    }

"""Write the synthetic datasets of :mod:`voxflow.core.synth` as OME-Zarr with ground truth."""

from __future__ import annotations

import csv
import io as _io
import json
from collections.abc import Sequence

import numpy as np

from voxflow.core import synth
from voxflow.io import (
    check_output,
    clear_output,
    provenance,
    write_group,
    write_image,
)
from voxflow.io.ngff import NGFF_VERSIONS
from voxflow.io.omero import fit_windows

__all__ = ["write_em_stack", "write_lightsheet"]


_TRUTH = "ground_truth.json"  # at the root of every dataset: the folder is one of ours


def _omero(image: np.ndarray, names: Sequence[str]) -> dict:
    colours = ("00FF00", "FF00FF", "00FFFF", "FFFF00")
    channels = [{"label": name, "color": colours[i % len(colours)], "active": True}
                for i, name in enumerate(names)]  # fmt: skip
    return fit_windows({"channels": channels, "rdefs": {"model": "color"}}, image, "czyx")


def _regions_csv(rows: list[dict]) -> bytes:
    buf = _io.StringIO()
    fields = ["id", "acronym", "name", "parent_id", "is_leaf", "cell_count", "volume_voxels",
              "volume_um3", "density_per_mm3"]  # fmt: skip
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _start(
    kind: str, output: str, overwrite: bool, ngff_version: str, generate, shape, seed, **options
):
    """Check the output (before any work), generate the data, clear the output.

    `options` go to `generate`; the provenance record takes their values as the dataset
    holds them (validated, plain types). Returns the output location, the generated dataset
    and its provenance record.
    """
    if ngff_version not in NGFF_VERSIONS:
        raise ValueError(f"`ngff_version` must be one of {NGFF_VERSIONS}, got {ngff_version!r}")
    out = check_output(output, [], overwrite=overwrite, markers=(_TRUTH,))
    data = generate(shape, seed=seed, **options) if shape else generate(seed=seed, **options)
    clear_output(out)
    parameters = {"shape": list(data.image.shape), "seed": seed}
    parameters.update({name: getattr(data, name) for name in options})
    record = provenance("synth", kind, parameters, None)
    return out, data, record


def write_lightsheet(
    output: str,
    *,
    shape: Sequence[int] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    ngff_version: str = "0.5",
) -> dict[str, str]:
    """Write a synthetic lightsheet dataset.

    Layout below `output`: ``image.ome.zarr`` (czyx uint16, with NGFF label images
    ``labels/cells`` and ``labels/atlas``), ``ground_truth.json`` and ``regions.csv``.

    Parameters
    ----------
    output : str
        Dataset directory (path or URL).
    shape : sequence of int, optional
        (C, Z, Y, X); the generator's default when None.
    seed : int, optional
        Random seed.
    overwrite : bool, optional
        Replace an existing `output`.
    ngff_version : {"0.5", "0.4"}, optional
        Format of the images.

    Returns
    -------
    dict
        Name → location of everything written.
    """
    out, vol, record = _start(
        "lightsheet", output, overwrite, ngff_version, synth.lightsheet, shape, seed
    )
    image = out.child("image.ome.zarr")
    zscale = tuple(vol.spacing)
    for name, data in (("cells", vol.cell_labels), ("atlas", vol.atlas)):
        write_image(
            image.child(f"labels/{name}"), data, "zyx", zscale, name=name, provenance=record,
            image_label={"source": {"image": "../../"}}, ngff_version=ngff_version,
        )  # fmt: skip
    write_group(image.child("labels"), ngff_version, {"labels": ["cells", "atlas"]})
    write_image(
        image, vol.image, "czyx", (1.0, *zscale), name="synthetic lightsheet",
        omero=_omero(vol.image, vol.channel_names), provenance=record, ngff_version=ngff_version,
    )  # fmt: skip
    out.write_json(_TRUTH, json.loads(json.dumps(vol.ground_truth())))
    out.write_bytes("regions.csv", _regions_csv(vol.region_table()))
    return {
        "image": image.url,
        "cells": image.child("labels/cells").url,
        "atlas": image.child("labels/atlas").url,
        "ground truth": out.child(_TRUTH).url,
        "regions": out.child("regions.csv").url,
    }


def write_em_stack(
    output: str,
    *,
    shape: Sequence[int] | None = None,
    seed: int = 0,
    transform: str = "affine",
    noise: float = 0.0,
    contrast: float = 0.0,
    overwrite: bool = False,
    ngff_version: str = "0.5",
) -> dict[str, str]:
    """Write a synthetic serial-section EM stack.

    Layout below `output`: ``image.ome.zarr`` (zyx uint8, the misaligned slices),
    ``aligned.ome.zarr`` (the reference slices) and ``ground_truth.json`` (per-slice
    transforms, pairwise transforms, valid box, transform family, noise, contrast and gains).

    Parameters
    ----------
    output : str
        Dataset directory (path or URL).
    shape : sequence of int, optional
        (Z, Y, X); the generator's default when None.
    seed : int, optional
        Random seed.
    transform : {"affine", "similarity", "rigid", "translation"}, optional
        Family of the per-slice transforms.
    noise : float, optional
        Standard deviation of the additive Gaussian noise as a fraction of 255, in [0, 1].
    contrast : float, optional
        Half-width of the per-slice gain range around 1, in [0, 0.5].
    overwrite : bool, optional
        Replace an existing `output`.
    ngff_version : {"0.5", "0.4"}, optional
        Format of the images.

    Returns
    -------
    dict
        Name → location of everything written.

    See Also
    --------
    voxflow.core.synth.em_stack : the generator and the meaning of its options.
    """
    out, stack, record = _start(
        "em-stack", output, overwrite, ngff_version, synth.em_stack, shape, seed,
        transform=transform, noise=noise, contrast=contrast,
    )  # fmt: skip
    for name, data in (("aligned.ome.zarr", stack.aligned), ("image.ome.zarr", stack.image)):
        write_image(
            out.child(name), data, "zyx", stack.spacing, name=name.split(".")[0],
            provenance=record, ngff_version=ngff_version,
        )  # fmt: skip
    out.write_json(_TRUTH, json.loads(json.dumps(stack.ground_truth())))
    return {
        "image": out.child("image.ome.zarr").url,
        "aligned": out.child("aligned.ome.zarr").url,
        "ground truth": out.child(_TRUTH).url,
    }

"""Counting tasks: objects → per-block counts and densities → per-atlas-region table → QC."""

from __future__ import annotations

import hashlib
import io as _io
import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from voxflow.core.objects import count_map, density_map
from voxflow.core.pyramid import Method, downsample, level_transform
from voxflow.core.qc import qc_png
from voxflow.core.regions import (
    assign_regions,
    atlas_midline,
    atlas_volumes,
    check_atlas_overlap,
    quantify_regions,
    side_of,
    validate_region_table,
)
from voxflow.io import Location, open_image, provenance, write_image
from voxflow.tasks._compute import ProgressFn, compute_array, on_cluster, publish_progress
from voxflow.tasks._run import RunFolder
from voxflow.tasks.segment import Volume, open_volume

__all__ = ["CountParams", "CountResult", "count", "count_run", "read_regions"]

_AXES = ("z", "y", "x")


class CountParams(BaseModel):
    """What `voxflow count` measures from a run's objects."""

    model_config = ConfigDict(frozen=True)

    block_um: float = Field(
        100.0, gt=0, description="Edge of a cell of the count and density maps (µm)."
    )
    atlas: str | None = Field(None, description="Atlas label image in the same physical space.")
    regions: str | None = Field(None, description="Region table (CSV: id, acronym, name, "
                                "parent_id).")  # fmt: skip
    split_axis: str | None = Field(
        None, description="Split counts into left/right along this axis (z, y or x)."
    )
    midline_um: float | None = Field(
        None, description="Position of the split (µm); None: the centre of the atlas."
    )
    top: int = Field(15, ge=1, le=200, description="Regions in the QC bar chart.")


class CountResult(BaseModel):
    """What counting produced."""

    model_config = ConfigDict(frozen=True)

    run: str = Field(description="The run folder.")
    objects: int = Field(description="Number of objects.")
    regions: str | None = Field(description="The region table, None without an atlas.")
    unlisted: tuple[int, ...] = Field(description="Atlas ids missing from the region table.")
    computed: tuple[str, ...] = Field(description="Steps computed now.")
    rows: tuple[dict[str, Any], ...] = Field(
        default=(), description="Region rows (for the table artifact)."
    )


def read_regions(url: str) -> pd.DataFrame:
    """The region table at `url` (CSV with at least id, acronym, name, parent_id).

    Raises
    ------
    FileNotFoundError
        When there is none.
    ValueError
        When it lacks a column or its ids are not unique.
    """
    loc = Location.parse(url)
    parent, _, key = loc.path.rpartition("/")
    raw = Location(loc.scheme, parent).read_bytes(key)
    if raw is None:
        raise FileNotFoundError(f"no region table at {loc.url}")
    try:
        table = pd.read_csv(_io.BytesIO(raw))
    except (ValueError, pd.errors.ParserError) as err:
        raise ValueError(f"{loc.url} is not a CSV table: {err}") from None
    return validate_region_table(table)


def _block_voxels(vol: Volume, block_um: float) -> tuple[int, int, int]:
    return tuple(max(1, round(block_um / s)) for s in vol.scale)


def _write_maps(vol: Volume, run: RunFolder, objects: pd.DataFrame, block, record) -> None:
    centroids = objects[list(_AXES)].to_numpy(np.float64).reshape(-1, 3)
    counts = count_map(centroids, vol.shape, block)
    density = density_map(counts, vol.shape, block, vol.scale)
    scale, trans = level_transform(vol.scale, vol.translation, block, Method.MEAN)
    for name, data in (("counts.ome.zarr", counts.astype(np.uint32)),
                       ("density.ome.zarr", density.astype(np.float32))):  # fmt: skip
        write_image(run.child(name), data, _AXES, scale, translation=trans, units=vol.units,
                    name=name.split(".")[0], provenance=record)  # fmt: skip


def _atlas_regions(vol: Volume, objects: pd.DataFrame, params: CountParams):
    atlas_ref = open_image(params.atlas)
    atlas_vol = open_volume(atlas_ref.url, None) if "c" not in atlas_ref.dims else None
    if atlas_vol is None:
        raise ValueError(f"the atlas {atlas_ref.url} must be a (z, y, x) label image")
    if np.dtype(atlas_ref.dtype).kind not in "iu":
        raise ValueError(f"the atlas {atlas_ref.url} must hold integer labels, got "
                         f"{atlas_ref.dtype}")  # fmt: skip
    check_atlas_overlap(vol.shape, vol.scale, vol.translation, atlas_vol.shape, atlas_vol.scale,
                        atlas_vol.translation)  # fmt: skip
    table = read_regions(params.regions) if params.regions else _bare_table()
    atlas = atlas_vol.read()
    points = objects[[f"{a}_um" for a in _AXES]].to_numpy(np.float64).reshape(-1, 3)
    axis = None if params.split_axis is None else _AXES.index(params.split_axis)
    with on_cluster():
        ids = assign_regions(points, atlas, scale=atlas_vol.scale,
                             translation=atlas_vol.translation)  # fmt: skip
        volumes = atlas_volumes(
            atlas,
            scale=atlas_vol.scale,
            translation=atlas_vol.translation,
            split_axis=axis,
            midline_um=_midline(atlas_vol, axis, params),
        )
    sides = None
    if axis is not None:
        sides = side_of(points, axis, _midline(atlas_vol, axis, params))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows, unlisted = quantify_regions(ids, volumes, table, sides=sides)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return rows, unlisted


def _regions_inputs(params: CountParams) -> dict[str, Any]:
    """What the region table depends on besides the objects: atlas and table contents."""
    atlas = open_image(params.atlas)
    table = None
    if params.regions is not None:
        loc = Location.parse(params.regions)
        parent, _, key = loc.path.rpartition("/")
        raw = Location(loc.scheme, parent).read_bytes(key) or b""
        table = hashlib.blake2b(raw, digest_size=16).hexdigest()
    return {"atlas": atlas.fingerprint, "table": table, "split_axis": params.split_axis,
            "midline_um": params.midline_um}  # fmt: skip


def _bare_table() -> pd.DataFrame:
    return pd.DataFrame({"id": pd.Series([], dtype="int64"), "acronym": [], "name": [],
                         "parent_id": pd.Series([], dtype="Int64")})  # fmt: skip


def _midline(atlas: Volume, axis: int | None, params: CountParams) -> float | None:
    if axis is None:
        return None
    if params.midline_um is not None:
        return params.midline_um
    return atlas_midline(atlas.shape, atlas.scale, atlas.translation, axis)


def _qc_image(vol: Volume) -> tuple[np.ndarray, tuple[float, ...], tuple[float, ...]]:
    """A small copy of the volume for the QC picture: a pyramid level, else a reduction."""
    for level in range(len(vol.ref.levels)):
        if max(vol.level_shape(level)) <= 512:
            scale, trans = vol.level_geometry(level)
            return compute_array(vol.read(level)), scale, trans
    factors = tuple(max(1, math.ceil(n / 512)) for n in vol.shape)
    small = downsample(vol.read().astype(np.float32), factors, Method.MEAN)
    scale, trans = level_transform(vol.scale, vol.translation, factors, Method.MEAN)
    return compute_array(small), scale, trans


def _write_qc(vol: Volume, run: RunFolder, objects: pd.DataFrame, rows, title: str) -> None:
    image, scale, trans = _qc_image(vol)
    points = objects[[f"{a}_um" for a in _AXES]].to_numpy(np.float64).reshape(-1, 3)
    centroids = (points - np.asarray(trans)) / np.asarray(scale)
    png = qc_png(image, centroids, scale=scale, regions=rows, title=title)
    run.loc.write_bytes("qc/overview.png", png)


def count(
    run: str, params: CountParams | None = None, *, progress: ProgressFn | None = None
) -> CountResult:
    """Count a run's objects per block and per atlas region, and draw the QC picture.

    Parameters
    ----------
    run : str
        A run folder made by :func:`voxflow.tasks.segment.segment`.
    params : CountParams, optional
        Map resolution, atlas, region table and hemisphere split.
    progress : callable, optional
        Unused (the counting steps are small); kept for the task signature.

    Returns
    -------
    CountResult
        Objects, the region table's location and its unlisted ids, the steps computed now.

    Raises
    ------
    FileNotFoundError
        When `run` holds no finished segmentation.
    ValueError
        For an atlas outside the image's physical space, a bad region table or axis.
    """
    params = params or CountParams()
    folder = RunFolder(run)
    manifest = folder.manifest()
    record_objects = folder.loc.read_json("steps/objects.json")
    if record_objects is None:
        raise FileNotFoundError(f"{folder.url} has no finished segmentation (objects); "
                                "rerun voxflow segment")  # fmt: skip
    if params.split_axis is not None and params.split_axis not in _AXES:
        raise ValueError(f"`split_axis` must be one of {_AXES}, got {params.split_axis!r}")
    if params.regions is not None and params.atlas is None:
        raise ValueError("a region table (--regions) needs an atlas (--atlas)")
    vol = open_volume(manifest["input"]["url"], manifest["input"]["channel"])
    objects = folder.read_table("objects.parquet")
    upstream = record_objects["key"]
    computed = []
    block = _block_voxels(vol, params.block_um)
    key = folder.key("counts", upstream, {"block": block})
    record = provenance("count", "blocks", {"block_voxels": list(block)}, vol.ref)
    _, now = folder.run_step(
        "counts", key, lambda: _write_maps(vol, folder, objects, block, record) or {},
        ["counts.ome.zarr", "density.ome.zarr"],
    )  # fmt: skip
    computed += ["counts"] if now else []
    rows, unlisted, regions_url = None, [], None
    if params.atlas is not None:
        key = folder.key("regions", upstream, _regions_inputs(params))

        def make_regions() -> dict:
            table, missing = _atlas_regions(vol, objects, params)
            folder.write_table("regions.csv", table)
            return {"unlisted": [int(i) for i in missing]}

        rec, now = folder.run_step("regions", key, make_regions, ["regions.csv"])
        computed += ["regions"] if now else []
        rows, unlisted = folder.read_table("regions.csv"), rec["unlisted"]
        regions_url = folder.child("regions.csv").url
    _write_qc(vol, folder, objects, rows, f"{len(objects)} objects: {vol.ref.url}")
    return CountResult(
        run=folder.url, objects=len(objects), regions=regions_url,
        unlisted=tuple(int(i) for i in unlisted), computed=tuple(computed),
        rows=tuple(rows.astype(object).where(rows.notna(), None).to_dict("records"))
        if rows is not None else (),
    )  # fmt: skip


@task(task_run_name="count {run}", persist_result=True, result_serializer="json")
def count_run(run: str, params: CountParams, progress_key: str | None = None) -> CountResult:
    """Count the objects of a run per block and per region (see :func:`count`)."""
    return count(run, params, progress=publish_progress(progress_key))

"""Counting tasks: objects → per-block counts and densities → per-atlas-region table → QC."""

from __future__ import annotations

import hashlib
import io as _io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from prefect import task
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
from voxflow.io import Location, clear_output, open_image, provenance, write_image
from voxflow.tasks._compute import ProgressFn, compute_array, on_cluster
from voxflow.tasks._run import RunFolder
from voxflow.tasks.segment import Volume, open_volume

__all__ = [
    "CountParams",
    "CountResult",
    "check_count",
    "count",
    "count_run",
    "read_regions",
]

_AXES = ("z", "y", "x")

# What each counting step writes into the run folder.
_MAPS = ("counts.ome.zarr", "density.ome.zarr")
_REGIONS = "regions.csv"
_QC = "qc/overview.png"
_OUTPUTS: dict[str, tuple[str, ...]] = {"counts": _MAPS, "regions": (_REGIONS,), "qc": (_QC,)}

_NO_TABLE = (
    "no region table (--regions): regions.csv has one row per atlas id, labelled by the id, "
    "without region names or parents"
)


class CountParams(BaseModel):
    """What `voxflow count` measures from a run's objects."""

    model_config = ConfigDict(frozen=True)

    block_um: float = Field(
        100.0, gt=0, description="Edge of a cell of the count and density maps (µm)."
    )
    atlas: str | None = Field(None, description="Atlas label image in the same physical space.")
    regions: str | None = Field(None, description="Region table (CSV: id, acronym, name, "
                                "parent_id).")  # fmt: skip
    split_axis: Literal["z", "y", "x"] | None = Field(
        None, description="Split counts into left/right along this axis."
    )
    midline_um: float | None = Field(
        None, description="Position of the split (µm); None: the centre of the atlas."
    )
    top: int = Field(15, ge=1, le=200, description="Regions in the QC bar chart.")

    @model_validator(mode="after")
    def _regions_need_an_atlas(self) -> CountParams:
        if self.regions is not None and self.atlas is None:
            raise ValueError("a region table (--regions) needs an atlas (--atlas)")
        return self


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
    notes: tuple[str, ...] = Field(
        default=(), description="What the user should know about this count (warnings)."
    )


def _read_bytes(url: str) -> bytes:
    loc = Location.parse(url)
    parent, _, key = loc.path.rpartition("/")
    raw = Location(loc.scheme, parent).read_bytes(key)
    if raw is None:
        raise FileNotFoundError(f"no region table at {loc.url}")
    return raw


def read_regions(url: str, raw: bytes | None = None) -> pd.DataFrame:
    """The region table at `url` (CSV with at least id, acronym, name, parent_id).

    `raw` is its content when already read.

    Raises
    ------
    FileNotFoundError
        When there is none.
    ValueError
        When it is not a valid region table (see
        :func:`voxflow.core.regions.validate_region_table`) or has no rows: a table given
        names the regions, and one without rows names none.
    """
    raw = _read_bytes(url) if raw is None else raw
    where = Location.parse(url).url
    try:
        table = pd.read_csv(_io.BytesIO(raw))
    except (ValueError, pd.errors.ParserError) as err:
        raise ValueError(f"{where} is not a CSV table: {err}") from None
    table = validate_region_table(table)
    if table.empty:
        raise ValueError(
            f"the region table (--regions) needs one row per region, got none in {where}; "
            "leave it out to count per atlas id"
        )
    return table


@dataclass(frozen=True)
class _Atlas:
    """The atlas and region table of a count, opened and checked before anything is written."""

    volume: Volume
    table: pd.DataFrame | None
    table_digest: str | None

    @classmethod
    def open(cls, vol: Volume, params: CountParams) -> _Atlas:
        atlas = open_volume(params.atlas)
        if "c" in atlas.ref.dims:
            raise ValueError(f"the atlas {atlas.ref.url} must be a (z, y, x) label image")
        if np.dtype(atlas.ref.dtype).kind not in "iu":
            raise ValueError(f"the atlas {atlas.ref.url} must hold integer labels, got "
                             f"{atlas.ref.dtype}")  # fmt: skip
        # Both in micrometres: the atlas may state its geometry in another unit.
        check_atlas_overlap(vol.shape, vol.scale_um, vol.translation_um, atlas.shape,
                            atlas.scale_um, atlas.translation_um)  # fmt: skip
        if params.regions is None:
            return cls(atlas, None, None)
        raw = _read_bytes(params.regions)
        digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
        return cls(atlas, read_regions(params.regions, raw), digest)

    def key_inputs(self, params: CountParams) -> dict[str, Any]:
        """What the region table depends on besides the objects."""
        return {"atlas": self.volume.ref.fingerprint, "table": self.table_digest,
                "split_axis": params.split_axis, "midline_um": params.midline_um}  # fmt: skip

    def midline(self, axis: int, params: CountParams) -> float:
        """Where left ends along `axis`: the given midline, else the atlas's centre."""
        if params.midline_um is not None:
            return params.midline_um
        v = self.volume
        return atlas_midline(v.shape, v.scale_um, v.translation_um, axis)


def check_count(vol: Volume, params: CountParams) -> None:
    """Check the atlas and region table of `params` against the image `vol`; write nothing.

    :func:`count` makes the same checks; this makes them before a segmentation that counts.

    Parameters
    ----------
    vol : Volume
        The image the run segments, from :func:`voxflow.tasks.segment.open_volume`.
    params : CountParams
        The atlas and region table, if any.

    Raises
    ------
    FileNotFoundError
        When the atlas or the region table is missing.
    ValueError
        For an atlas that is not a 3-D label image or lies outside the image's physical
        space, or a bad or empty region table (see :func:`read_regions`).
    """
    if params.atlas is not None:
        _Atlas.open(vol, params)


def _block_voxels(vol: Volume, block_um: float) -> tuple[int, int, int]:
    return tuple(max(1, round(block_um / s)) for s in vol.scale_um)


def _run_ngff_version(run: RunFolder) -> str:
    """The OME-NGFF version of the run's images: that of its labels."""
    return open_image(run.child("labels.ome.zarr")).ngff_version or "0.5"


def _write_maps(vol: Volume, run: RunFolder, objects: pd.DataFrame, block, record,
                ngff_version: str) -> None:  # fmt: skip
    centroids = objects[list(_AXES)].to_numpy(np.float64).reshape(-1, 3)
    counts = count_map(centroids, vol.shape, block)
    density = density_map(counts, vol.shape, block, vol.scale_um)
    # The maps keep the image's units: their geometry reads like that of the mask and labels.
    scale, trans = level_transform(vol.scale, vol.translation, block, Method.MEAN)
    for name, data in zip(_MAPS, (counts.astype(np.uint32), density.astype(np.float32)),
                          strict=True):  # fmt: skip
        clear_output(run.child(name))  # a map of another NGFF version would leave its metadata
        write_image(run.child(name), data, _AXES, scale, translation=trans, units=vol.units,
                    name=name.split(".")[0], provenance=record,
                    ngff_version=ngff_version)  # fmt: skip


def _atlas_regions(atlas: _Atlas, objects: pd.DataFrame, params: CountParams):
    v = atlas.volume
    points = objects[[f"{a}_um" for a in _AXES]].to_numpy(np.float64).reshape(-1, 3)
    axis = None if params.split_axis is None else _AXES.index(params.split_axis)
    midline = None if axis is None else atlas.midline(axis, params)
    with on_cluster():
        ids = assign_regions(points, v.read(), scale=v.scale_um, translation=v.translation_um)
        volumes = atlas_volumes(v.read(), scale=v.scale_um, translation=v.translation_um,
                                split_axis=axis, midline_um=midline)  # fmt: skip
    sides = None if axis is None else side_of(points, axis, midline)
    return quantify_regions(ids, volumes, atlas.table, sides=sides)


def _qc_image(vol: Volume) -> tuple[np.ndarray, tuple[float, ...], tuple[float, ...]]:
    """A small copy of the volume for the QC picture: a pyramid level, else a reduction.

    Its scale and translation are in micrometres, as the objects' ``*_um`` columns are.
    """
    for level in range(len(vol.ref.levels)):
        if max(vol.level_shape(level)) <= 512:
            scale, trans = vol.level_geometry_um(level)
            return compute_array(vol.read(level)), scale, trans
    factors = tuple(max(1, math.ceil(n / 512)) for n in vol.shape)
    small = downsample(vol.read().astype(np.float32), factors, Method.MEAN)
    scale, trans = level_transform(vol.scale_um, vol.translation_um, factors, Method.MEAN)
    return compute_array(small), scale, trans


def _write_qc(vol: Volume, run: RunFolder, objects: pd.DataFrame, rows, top: int) -> dict:
    image, scale, trans = _qc_image(vol)
    points = objects[[f"{a}_um" for a in _AXES]].to_numpy(np.float64).reshape(-1, 3)
    centroids = (points - np.asarray(trans)) / np.asarray(scale)
    title = f"{len(objects)} objects: {vol.ref.url}"
    run.loc.write_bytes(_QC, qc_png(image, centroids, scale=scale, regions=rows,
                                     top=top, title=title))  # fmt: skip
    return {}


def count(
    run: str, params: CountParams | None = None, *, progress: ProgressFn | None = None
) -> CountResult:
    """Count a run's objects per block and per atlas region, and draw the QC picture.

    Writes ``counts.ome.zarr`` and ``density.ome.zarr``, with an atlas ``regions.csv``, and
    ``qc/overview.png`` into the run folder, each step recorded under ``steps/``. What an
    earlier count made and this one does not (``regions.csv`` when there is no atlas now) is
    removed with its record (:meth:`RunFolder.discard`), so the folder never holds a
    region table of another count.

    Parameters
    ----------
    run : str
        A run folder made by :func:`voxflow.tasks.segment.segment`.
    params : CountParams, optional
        Map resolution, atlas, region table and hemisphere split. An atlas without a region
        table counts per atlas id: each id is a region of its own, without name or parent.
    progress : callable, optional
        Unused (the counting steps are small); kept for the task signature.

    Returns
    -------
    CountResult
        Objects, the region table's location and its unlisted ids, the steps computed now,
        and the notes that were warned.

    Raises
    ------
    FileNotFoundError
        When `run` holds no finished segmentation, or the atlas or region table is missing.
    ValueError
        For an atlas outside the image's physical space, a bad or empty region table or a
        bad axis; nothing is written then.

    Warns
    -----
    UserWarning
        With an atlas but no region table (the result's note), and when the region table
        does not list every atlas id (see :func:`voxflow.core.regions.quantify_regions`).
    """
    counted = _count(run, params or CountParams())
    for note in counted.notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return counted


def _count(run: str, params: CountParams) -> CountResult:
    """:func:`count`, its notes returned and not warned."""
    folder = RunFolder(run)
    manifest = folder.manifest()
    record_objects = folder.loc.read_json("steps/objects.json")
    if record_objects is None:
        raise FileNotFoundError(f"{folder.url} has no finished segmentation (objects); "
                                "rerun voxflow segment")  # fmt: skip
    vol = open_volume(manifest["input"]["url"], manifest["input"]["channel"])
    atlas = None if params.atlas is None else _Atlas.open(vol, params)
    objects = folder.read_table("objects.parquet")
    upstream = record_objects["key"]
    computed = []
    block = _block_voxels(vol, params.block_um)
    version = _run_ngff_version(folder)
    key = folder.key("counts", upstream, {"block": block, "ngff": version})
    record = provenance("count", "blocks", {"block_voxels": list(block)}, vol.ref)
    _, now = _run_step(
        folder, "counts", key, lambda: _write_maps(vol, folder, objects, block, record, version)
    )
    computed += ["counts"] if now else []
    rows, unlisted, regions_url, qc_upstream, notes = None, [], None, upstream, ()
    if atlas is None:
        folder.discard("regions")
    else:
        key = qc_upstream = folder.key("regions", upstream, atlas.key_inputs(params))

        def make_regions() -> dict:
            table, missing = _atlas_regions(atlas, objects, params)
            folder.write_table(_REGIONS, table)
            return {"unlisted": [int(i) for i in missing]}

        rec, now = _run_step(folder, "regions", key, make_regions)
        computed += ["regions"] if now else []
        rows, unlisted = folder.read_table(_REGIONS), rec["unlisted"]
        regions_url = folder.child(_REGIONS).url
        notes = (_NO_TABLE,) if atlas.table is None else ()
    key = folder.key("qc", qc_upstream, {"top": params.top})
    _, now = _run_step(folder, "qc", key, lambda: _write_qc(vol, folder, objects, rows, params.top))
    computed += ["qc"] if now else []
    return CountResult(
        run=folder.url, objects=len(objects), regions=regions_url,
        unlisted=tuple(int(i) for i in unlisted), computed=tuple(computed),
        rows=() if rows is None else _json_rows(rows), notes=notes,
    )  # fmt: skip


def _run_step(
    folder: RunFolder, step: str, key: str, write: Callable[[], dict[str, Any] | None]
) -> tuple[dict[str, Any], bool]:
    """:meth:`RunFolder.run_step` of counting `step`, with the outputs it writes."""
    return folder.run_step(step, key, lambda: write() or {}, _OUTPUTS[step])


def _json_rows(table: pd.DataFrame) -> tuple[dict[str, Any], ...]:
    """The rows as JSON-ready dicts, missing values as None."""
    return tuple(table.astype(object).where(table.notna(), None).to_dict("records"))


@task(task_run_name="count {run}", persist_result=True, result_serializer="json")
def count_run(run: str, params: CountParams, progress_key: str | None = None) -> CountResult:
    """Count the objects of a run per block and per region (see :func:`count`).

    The notes of the count come back in the result, not as warnings: the task may run in a
    worker process, whose warnings do not reach the user, so the flow that submits it warns
    them. `progress_key` is unused (the counting steps are small).
    """
    return _count(run, params)

"""Segmentation tasks: intensity → foreground mask → instance labels → object table.

Each step writes into the run folder (see :mod:`voxflow.tasks._run`) and is skipped when its
content key (upstream key + its parameters + code version) says its outputs are current.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
from prefect import task
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from voxflow.core.axes import micrometres_per_unit, spatial_mask
from voxflow.core.label import label
from voxflow.core.objects import object_table
from voxflow.core.predict import load_model, predict
from voxflow.core.pyramid import Method
from voxflow.core.threshold import (
    ThresholdMethod,
    apply_threshold,
    histogram,
    threshold_from_histogram,
    threshold_local,
)
from voxflow.core.watershed import watershed_split
from voxflow.io import (
    ImageRef,
    LevelRef,
    Location,
    open_image,
    provenance,
    read_level,
    write_image_metadata,
)
from voxflow.tasks._compute import (
    ProgressFn,
    compute_blocks,
    gpu_request,
    on_cluster,
    publish_progress,
)
from voxflow.tasks._run import RunFolder
from voxflow.tasks.pyramid import (
    PyramidParams,
    level0_chunks,
    level_writes,
    multiscale_of,
    plan_pyramid,
)

__all__ = [
    "InstanceParams",
    "MaskParams",
    "SegmentParams",
    "SegmentResult",
    "Volume",
    "check_segment",
    "open_volume",
    "segment",
    "segment_image",
]

Edge = tuple[PositiveInt, PositiveInt, PositiveInt]
_GLOBAL = tuple(m.value for m in ThresholdMethod)


class MaskParams(BaseModel):
    """How the foreground mask (BS) is made from the intensity image (IN)."""

    model_config = ConfigDict(frozen=True)

    threshold: str = Field(
        "otsu",
        description="otsu, li or triangle (global, from the histogram of the whole volume), "
        "local (adaptive, see block_size), or a number (absolute); foreground is image > t.",
    )
    threshold_level: int = Field(
        0, ge=0, le=32, description="Pyramid level whose histogram sets a global threshold."
    )
    block_size: int = Field(31, ge=3, le=1001, description="Local threshold: window (odd).")
    offset: float = Field(0.0, description="Local threshold: subtracted from the local mean.")
    model: str | None = Field(
        None, description="TorchScript file or 'package.module:factory'; replaces thresholds."
    )
    probability: float = Field(0.5, gt=0, lt=1, description="Model output above this is fg.")
    halo: int = Field(16, ge=0, le=256, description="Model: context voxels around each tile.")
    tile: int | None = Field(None, ge=8, le=1024, description="Model: tile edge in voxels.")
    batch_size: int = Field(4, ge=1, le=1024, description="Model: tiles per forward pass.")
    device: str | None = Field(None, description="Model: cpu, cuda, cuda:N, mps; None: auto.")
    is_mask: bool = Field(False, description="The input is a binary mask: use it as it is.")

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: str) -> str:
        text = str(value).strip().lower()
        if text in (*_GLOBAL, "local"):
            return text
        try:
            number = float(text)
        except ValueError:
            raise ValueError(
                f"`threshold` must be one of {(*_GLOBAL, 'local')} or a number, got {value!r}"
            ) from None
        if not math.isfinite(number):
            raise ValueError(f"`threshold` must be finite, got {value!r}")
        return repr(number)

    @field_validator("block_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"`block_size` must be odd, got {value}")
        return value


class InstanceParams(BaseModel):
    """How instance labels (OS) are made from the mask (BS)."""

    model_config = ConfigDict(frozen=True)

    split: Literal["none", "watershed"] = Field(
        "none", description="none: connected components; watershed: split touching objects."
    )
    connectivity: Literal[6, 18, 26] = Field(26, description="Voxel neighbourhood of objects.")
    min_distance_um: float = Field(
        4.0, gt=0, description="Watershed: least distance between two objects' centres (µm)."
    )
    halo: int | None = Field(
        None, ge=1, le=512, description="Watershed: context voxels; None: from min_distance."
    )
    markers: Literal["distance", "intensity"] = Field(
        "distance", description="Watershed seeds: distance-transform maxima or image maxima."
    )
    sigma_um: float | None = Field(
        None, gt=0, description="Watershed on intensity: Gaussian smoothing (µm) before maxima."
    )
    min_size: int | None = Field(None, ge=1, description="Drop objects of fewer voxels.")
    max_size: int | None = Field(None, ge=1, description="Drop objects of more voxels.")
    min_volume_um3: float | None = Field(None, gt=0, description="Drop objects smaller (µm³).")
    max_volume_um3: float | None = Field(None, gt=0, description="Drop objects larger (µm³).")


class SegmentParams(BaseModel):
    """Everything `voxflow segment` does, step by step."""

    model_config = ConfigDict(frozen=True)

    channel: int | None = Field(None, ge=0, description="Channel to segment; None: the first.")
    mask: MaskParams = Field(default_factory=MaskParams)
    instances: InstanceParams = Field(default_factory=InstanceParams)
    objects_csv: bool = Field(False, description="Also write objects.csv.")
    chunks: Edge | None = Field(
        None, description="Processing block (z, y, x) in voxels; None: the input's blocks."
    )
    ngff_version: Literal["0.4", "0.5"] = Field("0.5", description="Format of the images.")


class SegmentResult(BaseModel):
    """What a segmentation produced (small: it crosses task boundaries)."""

    model_config = ConfigDict(frozen=True)

    run: str = Field(description="The run folder.")
    objects: int = Field(description="Number of objects.")
    threshold: float | None = Field(description="Threshold used, None for a model or a mask.")
    computed: tuple[str, ...] = Field(description="Steps computed now (the others were current).")
    step_keys: dict[str, str] = Field(description="Content key of every step.")


def _validate_units(ref: ImageRef) -> tuple[float, ...]:
    """Micrometres per unit of each spatial axis of `ref` (no unit: micrometres).

    Raises
    ------
    ValueError
        When an axis unit is not a length that voxflow converts (a time unit, say).
    """
    factors = []
    for name, unit, spatial in zip(ref.dims, ref.units, spatial_mask(ref.dims), strict=True):
        factor = micrometres_per_unit(unit) if spatial else 1.0
        if factor is None:
            raise ValueError(
                f"axis {name} of {ref.url} has the unit {unit!r}, which is not a length "
                "voxflow can convert to micrometres (an OME-NGFF space unit such as nanometer, "
                "micrometer or millimeter); fix the axis unit in the image's metadata"
            )
        if spatial:
            factors.append(factor)
    return tuple(factors)


@dataclass(frozen=True)
class Volume:
    """The channel of an image being segmented, as a (z, y, x) volume with its geometry.

    `scale`, `translation` and `units` are those of the image's metadata; the ``*_um``
    properties convert them to micrometres (an axis without a unit is taken as micrometres),
    the unit of every physical quantity of segmentation and counting.
    """

    ref: ImageRef
    channel: int | None

    def _spatial(self, values: Sequence) -> tuple:
        return tuple(v for v, s in zip(values, spatial_mask(self.ref.dims), strict=True) if s)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Level-0 shape (z, y, x)."""
        return self.level_shape(0)

    @property
    def scale(self) -> tuple[float, float, float]:
        """Level-0 voxel size (z, y, x), in the axis units."""
        return self.level_geometry(0)[0]

    @property
    def translation(self) -> tuple[float, float, float]:
        """Level-0 position of the first voxel's centre (z, y, x), in the axis units."""
        return self.level_geometry(0)[1]

    @property
    def units(self) -> tuple[str, ...]:
        """Units of the spatial axes; ``"micrometer"`` for an axis without one."""
        return tuple(u or "micrometer" for u in self._spatial(self.ref.units))

    @functools.cached_property
    def um_per_unit(self) -> tuple[float, float, float]:
        """Micrometres per unit of each spatial axis (z, y, x), see `_validate_units`.

        Raises
        ------
        ValueError
            When an axis unit is not a length voxflow converts.
        """
        return _validate_units(self.ref)

    @property
    def scale_um(self) -> tuple[float, float, float]:
        """Level-0 voxel size (z, y, x) in micrometres."""
        return self.level_geometry_um(0)[0]

    @property
    def translation_um(self) -> tuple[float, float, float]:
        """Level-0 position of the first voxel's centre (z, y, x) in micrometres."""
        return self.level_geometry_um(0)[1]

    def level_shape(self, level: int) -> tuple[int, int, int]:
        """Shape (z, y, x) of a level."""
        return self._spatial(self.ref.levels[level].shape)

    def level_geometry(self, level: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Scale and translation (z, y, x) of a level, in the axis units."""
        lv = self.ref.levels[level]
        return (tuple(map(float, self._spatial(lv.scale))),
                tuple(map(float, self._spatial(lv.translation))))  # fmt: skip

    def level_geometry_um(self, level: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Scale and translation (z, y, x) of a level in micrometres."""
        scale, translation = self.level_geometry(level)
        factor = self.um_per_unit
        return (tuple(s * f for s, f in zip(scale, factor, strict=True)),
                tuple(t * f for t, f in zip(translation, factor, strict=True)))  # fmt: skip

    def read(self, level: int = 0, chunks: Sequence[int] | None = None) -> da.Array:
        """The channel at `level` as a lazy (z, y, x) array, in `chunks` when given."""
        arr = read_level(self.ref, level)
        if self.channel is not None:
            arr = arr[(slice(None),) * self.ref.dims.index("c") + (self.channel,)]
        while arr.ndim > 3:
            arr = arr[0]  # a singleton time axis
        return arr.rechunk(tuple(chunks)) if chunks else arr

    @property
    def voxel_um3(self) -> float:
        """Volume of a level-0 voxel in cubic micrometres."""
        return float(np.prod(self.scale_um))


def open_volume(url: str, channel: int | None = None) -> Volume:
    """Open the image at `url` and select the channel to segment.

    Parameters
    ----------
    url : str
        OME-Zarr image or plain zarr array with three spatial axes.
    channel : int or None, optional
        Channel to segment; None: the first (an image without a channel axis needs None or 0).

    Returns
    -------
    Volume
        The image and the channel.

    Raises
    ------
    ValueError
        When the image does not have three spatial axes, has a time axis longer than one,
        `channel` is out of range, or a spatial axis has a unit that is not a length voxflow
        converts to micrometres (a time unit, say; see :attr:`Volume.um_per_unit`). An axis
        without a unit is taken as micrometres.
    """
    ref = open_image(url)
    if sum(spatial_mask(ref.dims)) != 3:
        raise ValueError(f"segmentation needs a 3-D image (z, y, x); {ref.url} has {ref.dims}")
    if "t" in ref.dims and ref.shape[ref.dims.index("t")] != 1:
        raise ValueError(f"{ref.url} has {ref.shape[ref.dims.index('t')]} time points; "
                         "segment one at a time")  # fmt: skip
    if "c" in ref.dims:
        n = ref.shape[ref.dims.index("c")]
        channel = 0 if channel is None else channel
        if not 0 <= channel < n:
            raise ValueError(f"`channel` must be in 0..{n - 1} for {ref.url}, got {channel}")
    elif channel not in (None, 0):
        raise ValueError(f"{ref.url} has no channel axis; `channel` must be omitted, got {channel}")
    else:
        channel = None
    _validate_units(ref)
    return Volume(ref, channel)


# -- checks before anything is written --------------------------------------------------------


def _value_range(vol: Volume) -> tuple[float, float]:
    arr = vol.read()
    with on_cluster():
        lo, hi = dask.compute(arr.min(), arr.max())
    return float(lo), float(hi)


def _is_binary(vol: Volume, value_range: tuple[float, float] | None) -> bool:
    if np.dtype(vol.ref.dtype) == np.bool_:
        return True
    if value_range is None or np.dtype(vol.ref.dtype).kind not in "iu":
        return False
    return value_range[0] >= 0 and value_range[1] <= 1


def check_segment(vol: Volume, params: SegmentParams) -> dict[str, Any]:
    """Validate `params` against the volume before anything is written.

    Reads the value range of integer inputs (one pass) to recognise a binary mask, and
    loads and probes a model.

    Returns
    -------
    dict
        ``binary`` (the input is used as the mask) and ``range`` (min, max or None).

    Raises
    ------
    ValueError
        For a mask input that is not binary, a threshold level the image lacks, a model that
        does not load or returns the wrong shape, or size limits that exclude everything.
    """
    m, inst = params.mask, params.instances
    kind = np.dtype(vol.ref.dtype).kind
    rng = _value_range(vol) if kind in "iu" else None
    binary = _is_binary(vol, rng)
    if m.is_mask and not binary:
        shown = f"values {rng[0]:g}..{rng[1]:g}" if rng else f"dtype {vol.ref.dtype}"
        raise ValueError(f"--mask: {vol.ref.url} is not a binary (0/1) mask ({shown}); drop "
                         "--mask to threshold it")  # fmt: skip
    if m.threshold in _GLOBAL and m.threshold_level >= len(vol.ref.levels):
        raise ValueError(f"`threshold_level` {m.threshold_level} does not exist: {vol.ref.url} "
                         f"has {len(vol.ref.levels)} levels")  # fmt: skip
    if m.model is not None and not binary:
        _probe_model(m)
    lo, hi = _size_limits(inst, vol.voxel_um3)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"the size limits exclude every object: min {lo} > max {hi} voxels")
    return {"binary": binary, "range": rng}


def _probe_model(m: MaskParams) -> None:
    model = load_model(m.model)
    edge = m.tile or 16
    # In this process: a loaded TorchScript module cannot travel to a worker (the blocks load
    # the model from its spec there instead).
    predict(np.zeros((edge,) * 3, np.float32), model, halo=0, tile=edge, batch_size=1,
            device=m.device).compute(scheduler="sync")  # fmt: skip


def _size_limits(inst: InstanceParams, voxel_um3: float) -> tuple[int | None, int | None]:
    lo = [v for v in (inst.min_size,) if v is not None]
    hi = [v for v in (inst.max_size,) if v is not None]
    if inst.min_volume_um3 is not None:
        lo.append(math.ceil(inst.min_volume_um3 / voxel_um3 - 1e-9))
    if inst.max_volume_um3 is not None:
        hi.append(math.floor(inst.max_volume_um3 / voxel_um3 + 1e-9))
    return (max(lo) if lo else None), (min(hi) if hi else None)


# -- writing a (z, y, x) volume as an OME-Zarr with levels ------------------------------------


def _volume_ref(vol: Volume, url: str, shape, dtype: str, chunks) -> ImageRef:
    level = LevelRef(path="0", shape=tuple(shape), scale=vol.scale, translation=vol.translation,
                     chunks=tuple(chunks))  # fmt: skip
    return ImageRef(
        url=url, ngff_version="0.5", zarr_format=3, dims=("z", "y", "x"),
        axis_types=("space",) * 3, units=vol.units, dtype=dtype, levels=(level,),
        fingerprint="", name=url.rstrip("/").rsplit("/", 1)[-1],
    )  # fmt: skip


def write_volume(
    vol: Volume, out: Location, arr: da.Array, *, record: dict[str, Any], ngff_version: str,
    label_image: bool = True, progress: ProgressFn | None = None,
) -> None:  # fmt: skip
    """Write a (z, y, x) array in `vol`'s space as an OME-Zarr image with a mode pyramid.

    Arrays first, group metadata last, so an interrupted write never looks complete.
    """
    out.delete()
    like = _volume_ref(vol, out.url, arr.shape, arr.dtype.name, arr.chunksize)
    pyr = PyramidParams(method=Method.MODE, ngff_version=ngff_version, min_size=32)
    version_, plan = plan_pyramid(like, pyr)
    arr = arr.rechunk(level0_chunks(plan, arr.dtype.itemsize))
    writes = level_writes(arr, out, plan, Method.MODE, dims=like.dims, ngff_version=version_)
    compute_blocks(writes, progress)
    # The source image lies outside the run folder, so no relative "source" link: the
    # provenance record names it.
    image_label = {} if label_image else None
    write_image_metadata(out, multiscale_of(like, plan, Method.MODE), ngff_version=version_,
                         provenance=record, image_label=image_label)  # fmt: skip


# -- the steps --------------------------------------------------------------------------------


def _mask_array(vol: Volume, params: SegmentParams, checked: dict) -> tuple[da.Array, dict]:
    m = params.mask
    image = vol.read(chunks=params.chunks)
    if checked["binary"]:
        return (image != 0).astype(np.uint8), {"method": "input is binary", "threshold": None}
    if m.model is not None:
        with dask.annotate(resources=gpu_request(m.device)):
            prob = predict(image, m.model, halo=m.halo, tile=m.tile, batch_size=m.batch_size,
                           device=m.device)  # fmt: skip
        mask = (prob > m.probability).astype(np.uint8)
        return mask, {"method": "model", "model": m.model, "threshold": None}
    if m.threshold == "local":
        mask = threshold_local(image, m.block_size, offset=m.offset)
        return mask.astype(np.uint8), {"method": "local", "threshold": None}
    if m.threshold in _GLOBAL:
        # The checks already found level 0's range: the histogram needs one pass, not two.
        known = checked.get("range") if m.threshold_level == 0 else None
        with on_cluster():
            counts, centers = histogram(vol.read(m.threshold_level), value_range=known)
        value = float(threshold_from_histogram(counts, centers, m.threshold))
        info = {"method": m.threshold, "threshold": value, "histogram_level": m.threshold_level}
    else:
        value = float(m.threshold)
        info = {"method": "absolute", "threshold": value}
    return apply_threshold(image, value).astype(np.uint8), info


def _labels_array(vol: Volume, run: RunFolder, params: SegmentParams) -> tuple[da.Array, int]:
    inst = params.instances
    mask_ref = open_image(run.child("mask.ome.zarr"))
    mask = read_level(mask_ref, 0, chunks=params.chunks or vol.read().chunksize)
    lo, hi = _size_limits(inst, vol.voxel_um3)
    with on_cluster():
        if inst.split == "none":
            return label(mask, inst.connectivity, min_size=lo, max_size=hi)
        image = vol.read(chunks=mask.chunksize) if inst.markers == "intensity" else None
        sigma = inst.sigma_um
        return watershed_split(
            mask, spacing=vol.scale_um, min_distance=inst.min_distance_um, halo=inst.halo,
            image=image, sigma=sigma, connectivity=inst.connectivity, min_size=lo, max_size=hi,
        )  # fmt: skip


def segment(
    url: str,
    run: str,
    params: SegmentParams | None = None,
    *,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> SegmentResult:
    """Segment the image at `url` into the run folder `run`: mask, labels and object table.

    Parameters
    ----------
    url : str
        Intensity image (OME-Zarr or zarr array), or a binary mask (used as it is).
    run : str
        Run folder. A run of the same input is reused: steps whose key is unchanged are
        skipped, the others (and everything after them) are recomputed.
    params : SegmentParams, optional
        Steps' parameters.
    overwrite : bool, optional
        Replace a folder that holds something else.
    progress : callable, optional
        ``progress(done, total)`` per written block.

    Returns
    -------
    SegmentResult
        Object count, threshold, the steps computed now and every step's key.

    Raises
    ------
    ValueError, FileExistsError
        For bad parameters or a folder that holds something else; nothing is written.
    """
    params = params or SegmentParams()
    vol = open_volume(url, params.channel)
    folder = RunFolder(run)
    keys = _step_keys(vol, folder, params)
    # The checks read the whole input once; a current mask step already passed them.
    mask_done = (
        folder.input_fingerprint() == vol.ref.fingerprint
        and folder.done("mask", keys["mask"]) is not None
    )
    checked = {"binary": False} if mask_done else check_segment(vol, params)
    folder.start(vol.ref, vol.channel, overwrite=overwrite)
    steps = (
        ("mask", ["mask.ome.zarr"], lambda: _make_mask(vol, folder, params, checked, progress)),
        ("labels", ["labels.ome.zarr"], lambda: _make_labels(vol, folder, params, progress)),
        ("objects", _object_outputs(params), lambda: _make_objects(vol, folder, params)),
    )
    records, computed = {}, []
    for i, (name, outputs, make) in enumerate(steps):
        if folder.done(name, keys[name]) is None:
            # Every later step (counting too) was made from this one's old outputs: they go
            # before it is redone, so an interrupted rerun never leaves a mix behind.
            folder.discard_all_but(n for n, _, _ in steps[:i])
        records[name], now = folder.run_step(name, keys[name], make, outputs)
        computed += [name] if now else []
    return SegmentResult(run=folder.url, objects=records["objects"]["objects"],
                         threshold=records["mask"].get("threshold"), computed=tuple(computed),
                         step_keys=keys)  # fmt: skip


def _step_keys(vol: Volume, folder: RunFolder, params: SegmentParams) -> dict[str, str]:
    """Each step's key: its parameters chained to the key of the step before it."""
    keys = {}
    fp = f"{vol.ref.fingerprint}|channel={vol.channel}"
    keys["mask"] = folder.key("mask", fp, {"mask": params.mask, "chunks": params.chunks,
                                           "ngff": params.ngff_version})  # fmt: skip
    inst = params.instances
    upstream = keys["mask"]
    if inst.split == "watershed" and inst.markers == "intensity":
        upstream += f"|image={fp}"
    keys["labels"] = folder.key("labels", upstream, inst)
    keys["objects"] = folder.key("objects", f"{keys['labels']}|image={fp}",
                                 {"csv": params.objects_csv})  # fmt: skip
    return keys


def _object_outputs(params: SegmentParams) -> list[str]:
    return ["objects.parquet"] + (["objects.csv"] if params.objects_csv else [])


def _make_mask(vol: Volume, folder: RunFolder, params: SegmentParams, checked: dict,
               progress: ProgressFn | None) -> dict:  # fmt: skip
    mask, info = _mask_array(vol, params, checked)
    record = provenance("segment", "mask", {**params.mask.model_dump(mode="json"), **info},
                        vol.ref)  # fmt: skip
    write_volume(vol, folder.child("mask.ome.zarr"), mask, record=record,
                 ngff_version=params.ngff_version, progress=progress)  # fmt: skip
    return info


def _make_labels(vol: Volume, folder: RunFolder, params: SegmentParams,
                 progress: ProgressFn | None) -> dict:  # fmt: skip
    labels, n = _labels_array(vol, folder, params)
    record = provenance(
        "segment",
        params.instances.split,
        {**params.instances.model_dump(mode="json"), "objects": n},
        vol.ref,
    )
    write_volume(vol, folder.child("labels.ome.zarr"), labels, record=record,
                 ngff_version=params.ngff_version, progress=progress)  # fmt: skip
    return {"objects": int(n)}


def _make_objects(vol: Volume, folder: RunFolder, params: SegmentParams) -> dict:
    labels = read_level(open_image(folder.child("labels.ome.zarr")), 0)
    image = vol.read(chunks=labels.chunksize)
    with on_cluster():
        table = object_table(labels, image=image, scale=vol.scale_um,
                             translation=vol.translation_um)  # fmt: skip
    for key in ("objects.parquet", "objects.csv"):
        folder.loc.delete(key)
    for key in _object_outputs(params):
        folder.write_table(key, table)
    return {"objects": len(table)}


@task(task_run_name="segment {url}", persist_result=True, result_serializer="json")
def segment_image(
    url: str,
    run: str,
    params: SegmentParams,
    overwrite: bool = False,
    progress_key: str | None = None,
) -> SegmentResult:
    """Segment `url` into the run folder (steps current on content are skipped)."""
    return segment(url, run, params, overwrite=overwrite, progress=publish_progress(progress_key))

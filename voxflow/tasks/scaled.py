"""Scaled-processing tasks: estimate a field at low resolution, apply it, write the result."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import dask
import dask.array as da
import numpy as np
from prefect import task
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from voxflow.core.axes import spatial_mask
from voxflow.core.pyramid import Method
from voxflow.core.scaled import (
    ScaledResult,
    apply_scaled_processing,
    check_lowres_budget,
    last_block_centre,
    lowres_block_mean,
    lowres_geometry,
    validate_channels,
    validate_downsample_factor,
)
from voxflow.io import (
    ImageRef,
    LevelRef,
    Location,
    check_output,
    open_image,
    provenance,
    read_level,
    write_group,
    write_image,
    write_image_metadata,
)
from voxflow.plugins import check_plugin, plugin_provenance, resolve_plugin
from voxflow.tasks._cache import content_key
from voxflow.tasks._compute import ProgressFn, compute_array, compute_blocks, publish_progress
from voxflow.tasks._output import INCOMPLETE_MARKER, begin_output, resumable
from voxflow.tasks.pyramid import (
    LevelPlan,
    PyramidParams,
    level0_chunks,
    level_writes,
    multiscale_of,
    plan_pyramid,
)

__all__ = [
    "INCOMPLETE_MARKER",
    "ScaledParams",
    "check_scaled",
    "correct_image",
    "field_path",
    "find_lowres_level",
    "scaled_processing",
]


# Pyramid methods whose levels are block means (or close enough to stand for one).
_MEAN_LIKE = {"mean", "average", "local_mean"}


class ScaledParams(BaseModel):
    """How an image is processed at two resolutions, and how the result is stored."""

    model_config = ConfigDict(frozen=True)

    plugin: str = Field("gaussian", min_length=1, description="Registered plugin name.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Keyword parameters of the plugin."
    )
    factor: PositiveInt | Annotated[tuple[PositiveInt, ...], Field(min_length=1, max_length=3)] = (
        Field(4, description="Downsampling factor, for every spatial axis or one per axis.")
    )
    channels: Annotated[tuple[int, ...], Field(min_length=1)] | None = Field(
        None, description="Channels to process and write; None: all."
    )
    dtype: Literal["keep", "float32"] = Field(
        "keep", description="keep: the input's dtype (rounded, clipped); float32: floats."
    )
    keep_field: bool = Field(
        True, description="Write the low-resolution field to OUTPUT/fields/<plugin>."
    )
    chunk_size: Annotated[tuple[PositiveInt, ...], Field(min_length=1, max_length=5)] | None = (
        Field(None, description="Full-resolution work block per axis; None: derived.")
    )
    max_lowres_mib: PositiveInt = Field(
        4096, description="Refuse a low-resolution image larger than this (MiB, float32)."
    )
    pyramid: PyramidParams = Field(
        default_factory=PyramidParams, description="Levels and storage of the output."
    )

    @field_validator("pyramid")
    @classmethod
    def _mean_levels(cls, value: PyramidParams) -> PyramidParams:
        if value.method in (Method.MODE, Method.STRIDE):
            raise ValueError(f"the output is an intensity image; `method` {value.method} is not")
        return value


def field_path(plugin_name: str) -> str:
    """Where the low-resolution field of `plugin_name` lies inside the output image."""
    return f"fields/{plugin_name}"


def find_lowres_level(source: ImageRef, factors: Sequence[int]) -> int | None:
    """The index of an existing block-mean level reduced by exactly `factors`, or None.

    Parameters
    ----------
    source : ImageRef
        The image.
    factors : sequence of int
        Factor per axis relative to level 0.

    Returns
    -------
    int or None
        The level index (>= 1), or None when no level matches in shape and scale.
    """
    if (source.method or "").lower() not in _MEAN_LIKE:
        return None
    for i, lv in enumerate(source.levels[1:], start=1):
        if _reduced_by(source.levels[0], lv, factors):
            return i
    return None


def _reduced_by(coarse_of: LevelRef, level: LevelRef, factors: Sequence[int]) -> bool:
    """Whether `level` reads as `coarse_of` reduced by `factors` (in shape and in scale)."""
    return all(
        f >= 1 and n == -(-p // f) and math.isclose(a / b, f, rel_tol=1e-6)
        for f, n, p, a, b in zip(factors, level.shape, coarse_of.shape, level.scale,
                                 coarse_of.scale, strict=True)
    )  # fmt: skip


def _output_plan(source: ImageRef, params: ScaledParams, channels: tuple[int, ...] | None,
                 dtype: str) -> tuple[str, list[LevelPlan]]:  # fmt: skip
    shape = list(source.shape)
    if channels is not None and "c" in source.dims:
        shape[source.dims.index("c")] = len(channels)
    first = source.levels[0].model_copy(update={"shape": tuple(shape)})
    like = source.model_copy(update={"levels": (first,), "dtype": dtype})
    return plan_pyramid(like, params.pyramid)


def _channels(source: ImageRef, params: ScaledParams) -> tuple[int, ...] | None:
    if params.channels is None:
        return None
    n = source.shape[source.dims.index("c")] if "c" in source.dims else None
    return validate_channels(params.channels, n)


def _output_dtype(source: ImageRef, params: ScaledParams) -> str:
    return "float32" if params.dtype == "float32" else source.dtype


def check_scaled(
    source: ImageRef, output: str, params: ScaledParams, *, overwrite: bool = False
) -> tuple[Any, tuple[int, ...], list[LevelPlan]]:
    """Validate everything before anything is written.

    Returns
    -------
    plugin : object
        The resolved plugin instance.
    factors : tuple of int
        Factor per axis.
    plan : list of LevelPlan
        Levels of the output.

    Raises
    ------
    ValueError, TypeError, FileExistsError
        For an unknown plugin or bad parameters, a bad factor or channel selection, a
        low-resolution image over the budget, or an output that is or holds the input, or
        exists (unless `overwrite`, or it is an incomplete output of this stage).
    """
    plugin = resolve_plugin(params.plugin, params.params)
    check_plugin(plugin)
    factors = validate_downsample_factor(params.factor, source.shape, source.dims)
    channels = _channels(source, params)
    out = Location.parse(output)
    check_output(out, [source.url], overwrite=overwrite or resumable(out))
    shape = list(source.shape)
    if channels is not None:
        shape[source.dims.index("c")] = len(channels)
    check_lowres_budget(shape, factors, source.dims, params.max_lowres_mib * 2**20,
                        limit_name="processing.max_lowres_mib")  # fmt: skip
    _, plan = _output_plan(source, params, channels, _output_dtype(source, params))
    return plugin, factors, plan


def _level_steps(source: ImageRef, level: int, factors: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The block-mean steps that lead from level 0 to `level`, one tuple of factors each.

    A pyramid is made level by level, each the block mean of the one before; levels whose
    shapes and scales do not read as such a cascade are taken for one block mean by `factors`.
    """
    steps = []
    for prev, lv in zip(source.levels[:level], source.levels[1 : level + 1], strict=True):
        step = tuple(round(a / b) for a, b in zip(lv.scale, prev.scale, strict=True))
        if not _reduced_by(prev, lv, step):
            return [factors]
        steps.append(step)
    return steps


def _lowres(
    source: ImageRef, level0: da.Array, factors: tuple[int, ...],
    channels: tuple[int, ...] | None,
) -> tuple[np.ndarray, tuple, tuple, tuple, str]:  # fmt: skip
    """The selected channels at low resolution: an existing level, else a block mean.

    `level0` is level 0 as the full-resolution pass reads it; the block mean reads it too,
    and is exact (floating point, :func:`voxflow.core.scaled.lowres_block_mean`). An existing
    block-mean level is reused even for an integer image, whose levels hold means rounded to
    its dtype (by less than half a grey level per pyramid step): that saves reading level 0 a
    second time, for a result that can differ slightly from the one the same data gives
    without a pyramid (a few grey levels where a plugin stretches the intensities). Either
    way the last voxel along an axis sits at the centre of the voxels it summarises, on the
    level's own cascade of block means (:func:`voxflow.core.scaled.last_block_centre`).

    Returns
    -------
    low, scale, translation, last_centre, origin
        The array, its geometry, and where it came from (a level path or a description).
    """
    level = find_lowres_level(source, factors)
    index = (slice(None),) * source.dims.index("c") + (list(channels),) if channels else ()
    shape = level0[index].shape
    if level is not None:
        lv = source.levels[level]
        low = compute_array(read_level(source, level)[index])
        steps = _level_steps(source, level, factors)
        last = last_block_centre(shape, source.scale, source.translation, steps)
        return low, lv.scale, lv.translation, last, lv.path
    low = compute_array(lowres_block_mean(level0[index], factors))
    scale, translation = lowres_geometry(source.scale, source.translation, factors)
    last = last_block_centre(shape, source.scale, source.translation, factors)
    return low, scale, translation, last, "block mean of level 0"


def _write_field(out: Location, result: ScaledResult, source: ImageRef, name: str,
                 version_: str, record: dict) -> str:  # fmt: skip
    fields = out.child("fields")
    # OME-NGFF places voxels on a regular grid; where the last voxel of a partial block was
    # applied from (the centre of the voxels it summarises) goes with the provenance.
    record = {**record, "field_last_centre": list(result.field_last_centre)}
    write_image(
        fields.child(name), result.field, source.dims, result.field_scale,
        translation=result.field_translation, units=source.units, name=f"{name} field",
        provenance=record, ngff_version=version_,
    )  # fmt: skip
    write_group(fields, version_)
    return fields.child(name).url


def _omero(source: ImageRef, channels: tuple[int, ...] | None) -> dict | None:
    if source.omero is None or channels is None or "channels" not in source.omero:
        return source.omero
    listed = source.omero["channels"]
    return {**source.omero, "channels": [listed[c] for c in channels if c < len(listed)]}


def scaled_processing(
    source: ImageRef,
    output: str,
    params: ScaledParams,
    *,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> ImageRef:
    """Process `source` at two resolutions with a plugin and write the result; the array work.

    The output is an OME-Zarr image with a pyramid (``params.pyramid``) and, unless
    ``params.keep_field`` is false, the low-resolution field at ``OUTPUT/fields/<plugin>``.
    While it is being written the output carries :data:`INCOMPLETE_MARKER` and no image
    metadata, so an interrupted run never looks complete and a rerun starts it over.

    Parameters
    ----------
    source : ImageRef
        Input image. A matching block-mean level is reused as the low-resolution image, so
        level 0 is read once (the level of an integer image holds rounded means); without
        one, level 0 is also read for its exact block mean.
    output : str
        The new OME-Zarr.
    params : ScaledParams
        Plugin, factor, channels, dtype and storage.
    overwrite : bool, optional
        Replace an existing `output`.
    progress : callable, optional
        Called with ``(blocks_done, blocks_total)`` during the full-resolution write.

    Returns
    -------
    ImageRef
        The written image.
    """
    plugin, factors, plan = check_scaled(source, output, params, overwrite=overwrite)
    channels = _channels(source, params)
    out = Location.parse(output)
    version_ = params.pyramid.ngff_version or "0.5"
    name = plugin.scaled_processing_plugin_name()
    # The plugin sees the low-resolution image before anything is written, so a plugin that
    # fails, or NaN in the input, leaves no output behind.
    blocks = params.chunk_size or level0_chunks(plan, np.dtype(source.dtype).itemsize)
    # Blocks of about 4 MiB read faster than whole shards (fresh 32 MiB buffers page-fault).
    full = read_level(source, 0, chunks=blocks)
    low, low_scale, low_trans, low_last, low_from = _lowres(source, full, factors, channels)
    spatial = tuple(f for f, s in zip(factors, spatial_mask(source.dims), strict=True) if s)
    result = apply_scaled_processing(
        full, plugin, spatial, dims=source.dims, scale=source.scale,
        translation=source.translation, units=source.units, channels=channels,
        dtype=params.dtype, lowres=low, lowres_scale=low_scale, lowres_translation=low_trans,
        lowres_last_centre=low_last,
    )  # fmt: skip
    del low  # the fields are made; the full-resolution pass needs only them
    begin_output(out, {"stage": "scaled", "plugin": name})
    record = provenance("scaled", name, {
        **params.model_dump(mode="json"), "plugin": plugin_provenance(plugin),
        "factors": list(factors), "lowres": low_from,
        "field": field_path(name) if params.keep_field else None,
    }, source)  # fmt: skip
    if params.keep_field:
        _write_field(out, result, source, name, version_, record)
    image = _level0(result.image, plan)
    writes = level_writes(
        image, out, plan, params.pyramid.method_for(), dims=source.dims, ngff_version=version_,
        compressor=params.pyramid.compressor, clevel=params.pyramid.clevel,
    )  # fmt: skip
    compute_blocks(writes, progress)
    multiscale = multiscale_of(source, plan, params.pyramid.method_for())
    # The plugin changed the intensities (and maybe the dtype): windows of the output's own.
    write_image_metadata(out, multiscale, ngff_version=version_, omero=_omero(source, channels),
                         provenance=record, fit_windows=True)  # fmt: skip
    out.delete(INCOMPLETE_MARKER)
    return open_image(out)


def _level0(image: da.Array, plan: list[LevelPlan]) -> da.Array:
    # Fuse the per-block chain (read, upsample, the plugin's arithmetic, cast) into one task
    # per block, so its temporaries live in one task and are freed at once; the levels are
    # then built on the fused blocks (the writes are computed unoptimised, to share them).
    # The rechunk is a no-op when the image was read in these blocks (the usual case).
    (fused,) = dask.optimize(image.rechunk(level0_chunks(plan, image.dtype.itemsize)))
    return fused


# -- Prefect task ------------------------------------------------------------------------------


def _scaled_cache_key(context, parameters) -> str:
    src: ImageRef = parameters["source"]
    params = ScaledParams.model_validate(parameters["params"])
    return content_key("scaled", src.fingerprint, {
        "params": params.model_dump(mode="json"),
        "output": Location.parse(parameters["output"]).url,
    })  # fmt: skip


@task(
    cache_key_fn=_scaled_cache_key,
    persist_result=True,
    result_serializer="json",
    task_run_name="correct {source.url} ({params.plugin})",
)
def correct_image(
    source: ImageRef,
    output: str,
    params: ScaledParams,
    overwrite: bool = False,
    progress_key: str | None = None,
) -> ImageRef:
    """Process and write `source` (cached on content, not retried)."""
    return scaled_processing(
        source, output, params, overwrite=overwrite, progress=publish_progress(progress_key)
    )

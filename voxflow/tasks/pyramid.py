"""Pyramid tasks: plan the levels of an image, build them blockwise, write them via io."""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Literal

import dask.array as da
import numpy as np
from dask.delayed import Delayed
from prefect import task
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from voxflow.core.axes import spatial_mask
from voxflow.core.levels import plan_levels
from voxflow.core.pyramid import Method, downsample, level_transform
from voxflow.io import (
    DEFAULT_CLEVEL,
    ArrayLayout,
    Dataset,
    ImageRef,
    Location,
    Multiscale,
    check_output,
    copy_stored_chunks,
    create_array,
    derive_layout,
    open_image,
    package_version,
    provenance,
    read_level,
    relocate_image_label,
    writable,
    write_blocks,
    write_image_metadata,
)
from voxflow.tasks._cache import content_key
from voxflow.tasks._compute import ProgressFn, compute_blocks, publish_progress
from voxflow.tasks._output import INCOMPLETE_MARKER, begin_output, resumable

__all__ = [
    "ImageRef",
    "LevelPlan",
    "PyramidParams",
    "build_pyramid",
    "check_pyramid",
    "default_output",
    "is_complete",
    "level0_chunks",
    "level_writes",
    "make_pyramid",
    "multiscale_of",
    "open_input",
    "plan_pyramid",
    "resolve_target",
]

Shape = tuple[PositiveInt, ...]


class PyramidParams(BaseModel):
    """How the levels of a pyramid are made and stored."""

    model_config = ConfigDict(frozen=True, use_enum_values=False)

    method: Method | None = Field(
        None,
        description="mean, mode, min, max, stride or gaussian; None: mode for a label image "
        "(one with image-label metadata), mean for any other.",
    )
    levels: int | None = Field(
        None, ge=1, le=32, description="Number of levels including level 0; None: down to min_size."
    )
    min_size: int = Field(64, ge=1, le=65536, description="Stop reducing an axis at this size.")
    factors: Annotated[Shape, Field(min_length=2, max_length=3)] | None = Field(
        None,
        description="Fixed factor per spatial axis at every level; None: anisotropy-aware plan.",
    )
    ngff_version: Literal["0.4", "0.5"] | None = Field(
        None, description="NGFF version of a new output (None: 0.5; in place: the input's)."
    )
    chunks: Annotated[Shape, Field(min_length=1, max_length=5)] | None = Field(
        None, description="Chunk edge per spatial axis (inner chunk when sharded)."
    )
    shards: Annotated[Shape, Field(min_length=1, max_length=5)] | None = Field(
        None, description="Shard edge per spatial axis (NGFF 0.5 only)."
    )
    compressor: Literal["zstd", "lz4", "gzip", "none"] = Field("zstd", description="Codec.")
    clevel: int = Field(DEFAULT_CLEVEL, ge=0, le=9, description="Compression level.")

    def method_for(self, source: ImageRef | None = None) -> Method:
        """The method that reduces `source`: the one asked for, else mode or mean.

        Averaging a label image would invent labels between neighbouring objects, so an
        image with image-label metadata takes the most frequent label by default.
        """
        if self.method is not None:
            return self.method
        if source is not None and source.image_label is not None:
            return Method.MODE
        return Method.MEAN


@dataclass(frozen=True)
class LevelPlan:
    """One level to be written: where, how large, where in space, how stored."""

    path: str
    shape: tuple[int, ...]
    scale: tuple[float, ...]
    translation: tuple[float, ...]
    factors: tuple[int, ...]
    layout: ArrayLayout


def _validate_method(method: Method, dtype: str) -> Method:
    if dtype == "bool" and method in (Method.MEAN, Method.GAUSSIAN):
        raise ValueError(f"`method` {method.value} needs numeric voxels; for bool use mode")
    return method


def _level_paths(source: ImageRef, n: int, in_place: bool) -> list[str]:
    if not in_place:
        return [str(i) for i in range(n)]
    first = source.levels[0].path
    names = (str(i) for i in range(1, n + 64) if str(i) != first)
    return [first] + [next(names) for _ in range(n - 1)]


def plan_pyramid(
    source: ImageRef, params: PyramidParams, *, in_place: bool = False
) -> tuple[str, list[LevelPlan]]:
    """Validate the parameters against the image and lay out every level.

    Parameters
    ----------
    source : ImageRef
        Level 0 comes from here.
    params : PyramidParams
        Method, level plan and storage options.
    in_place : bool, optional
        Add levels to `source` itself (level 0 is kept as it is).

    Returns
    -------
    ngff_version : str
        Version of the output.
    levels : list of LevelPlan
        Level 0 first.

    Raises
    ------
    ValueError
        For factors of the wrong length, a method the dtype cannot take, in-place on a plain
        array, or a version that differs from the in-place image's.
    """
    method = _validate_method(params.method_for(source), source.dtype)
    if in_place and source.is_plain:
        raise ValueError(
            "--in-place needs an OME-Zarr image; a plain zarr array cannot hold levels"
        )
    if in_place and params.ngff_version not in (None, source.ngff_version):
        raise ValueError(
            f"in place, the output keeps the input's NGFF version {source.ngff_version}; "
            f"got `ngff_version` {params.ngff_version}"
        )
    version_ = (source.ngff_version if in_place else params.ngff_version) or "0.5"
    space = spatial_mask(source.dims)
    if params.factors is not None and len(params.factors) != sum(space):
        raise ValueError(
            f"`factors` needs one integer per spatial axis ({sum(space)}), got {params.factors}"
        )
    factors = plan_levels(
        source.shape, source.scale, space, levels=params.levels, min_size=params.min_size,
        factors=params.factors,
    )  # fmt: skip
    paths = _level_paths(source, len(factors) + 1, in_place)
    shape, scale, trans = source.shape, source.scale, source.translation
    first = source.levels[0]
    layout0 = (
        ArrayLayout(first.chunks, first.shards) if in_place else
        derive_layout(shape, source.dims, ngff_version=version_, chunks=params.chunks,
                      shards=params.shards)
    )  # fmt: skip
    plan = [LevelPlan(paths[0], shape, scale, trans, (1,) * len(shape), layout0)]
    for path, f in zip(paths[1:], factors, strict=True):
        shape = tuple(-(-n // k) for n, k in zip(shape, f, strict=True))
        scale, trans = level_transform(scale, trans, f, method)
        layout = derive_layout(shape, source.dims, ngff_version=version_, chunks=params.chunks,
                               shards=params.shards)  # fmt: skip
        plan.append(LevelPlan(path, shape, tuple(scale), tuple(trans), tuple(f), layout))
    return version_, plan


_BLOCK_BYTES = 4 * 2**20
_MIN_EDGE = 16


def _compute_chunks(layout: ArrayLayout, factors: Sequence[int], itemsize: int) -> tuple[int, ...]:
    """Compute blocks inside one write unit, so the previous level's block is about 4 MiB.

    Blocks of that size keep every core busy even when a level fits in one shard, and reuse
    the allocator's memory: 32 MiB blocks cost a fresh, page-faulted allocation each and read
    about 1.5× slower.
    """
    block = list(layout.write_chunks)

    def source_bytes() -> int:
        return math.prod(b * f for b, f in zip(block, factors, strict=True)) * itemsize

    while source_bytes() > _BLOCK_BYTES:
        halvable = [i for i, b in enumerate(block) if b % 2 == 0 and b // 2 >= _MIN_EDGE]
        if not halvable:
            break
        largest = max(halvable, key=lambda i: block[i])
        block[largest] //= 2
    return tuple(block)


def level0_chunks(plan: list[LevelPlan], itemsize: int) -> tuple[int, ...]:
    """Level-0 read blocks that feed level 1's compute blocks without re-slicing."""
    if len(plan) == 1:
        return plan[0].layout.write_chunks
    nxt = plan[1]
    return tuple(
        min(c * f, n)
        for c, f, n in zip(
            _compute_chunks(nxt.layout, nxt.factors, itemsize),
            nxt.factors,
            plan[0].shape,
            strict=True,
        )
    )


def pyramid_writes(
    source: ImageRef, output: Location, plan: list[LevelPlan], method: Method, *,
    ngff_version: str, write_level0: bool, compressor: str = "zstd", clevel: int = DEFAULT_CLEVEL,
) -> tuple[list[da.Array], list[Delayed]]:  # fmt: skip
    """Create the level arrays and return the lazy work that fills them.

    Level 0 is read once; each level is reduced from the previous one in the same graph, so a
    region of level 0 feeds every level without being read again. A new level 0 encoded
    exactly like the input's is filled by copying the stored shards byte for byte.

    Returns
    -------
    writes : list of dask.array.Array
        Block writes, one array per level written.
    copies : list of dask.delayed.Delayed
        Byte copies of level 0's stored objects (empty when level 0 is re-encoded or kept).
    """
    level0 = read_level(source, 0, chunks=level0_chunks(plan, np.dtype(source.dtype).itemsize))
    copies: list[Delayed] = []
    if write_level0:
        spec0 = create_array(
            output, plan[0].path, shape=plan[0].shape, dtype=source.dtype, dims=source.dims,
            layout=plan[0].layout, zarr_format=3 if ngff_version == "0.5" else 2,
            compressor=compressor, clevel=clevel,
        )  # fmt: skip
        src0 = Location.parse(source.url).child(source.levels[0].path)
        copies = copy_stored_chunks(src0, output.child(plan[0].path)) or []
        if not copies:
            unit = plan[0].layout.write_chunks
            first = write_blocks(writable(level0, unit), spec0, unit)
    writes = level_writes(
        level0, output, plan, method, dims=source.dims, ngff_version=ngff_version,
        write_level0=False, compressor=compressor, clevel=clevel,
    )  # fmt: skip
    if write_level0 and not copies:
        writes.insert(0, first)
    return writes, copies


def level_writes(
    level0: da.Array, output: Location, plan: list[LevelPlan], method: Method, *,
    dims: Sequence[str], ngff_version: str, write_level0: bool = True, compressor: str = "zstd",
    clevel: int = DEFAULT_CLEVEL,
) -> list[da.Array]:  # fmt: skip
    """Create the level arrays of `plan` and return the lazy block writes that fill them.

    Each level is reduced from the previous one in one graph, so a block of `level0` (read
    or computed) feeds every level once. Levels are computed in blocks of about 4 MiB of the
    previous level and gathered into whole shards only to be written; chunk `level0` with
    :func:`level0_chunks` so its blocks feed level 1 without re-slicing.

    Returns
    -------
    list of dask.array.Array
        Block writes, one array per level written (level 0 first when `write_level0`).
    """
    fmt = 3 if ngff_version == "0.5" else 2
    itemsize = level0.dtype.itemsize
    written = plan if write_level0 else plan[1:]

    def create(lv: LevelPlan) -> dict:
        return create_array(
            output, lv.path, shape=lv.shape, dtype=level0.dtype, dims=dims, layout=lv.layout,
            zarr_format=fmt, compressor=compressor, clevel=clevel,
        )  # fmt: skip

    # The arrays are created on threads of their own (a few milliseconds of file work each,
    # which TensorStore does without the interpreter lock) while the graphs are built.
    with ThreadPoolExecutor(max(1, len(written))) as pool:
        specs = [pool.submit(create, lv) for lv in written]
        level, levels = level0, []
        for i, lv in enumerate(plan):
            if i:
                blocks = _compute_chunks(lv.layout, lv.factors, itemsize)
                level = downsample(level, lv.factors, method, chunks=blocks)
            if i or write_level0:
                levels.append(writable(level, lv.layout.write_chunks))
        return [
            write_blocks(arr, spec.result(), lv.layout.write_chunks)
            for arr, spec, lv in zip(levels, specs, written, strict=True)
        ]


def multiscale_of(source: ImageRef, plan: Sequence[LevelPlan], method: Method) -> Multiscale:
    """The multiscale metadata of the levels of `plan`, made from `source` with `method`."""
    return Multiscale(
        axes=source.axes,
        datasets=tuple(Dataset(lv.path, lv.scale, lv.translation) for lv in plan),
        name=source.name,
        type=method.value,
        metadata={
            "method": "voxflow.core.pyramid.downsample",
            "version": package_version(),
            "kwargs": {"method": method.value, "factors": [list(lv.factors) for lv in plan[1:]]},
        },
    )


def make_pyramid(
    source: ImageRef,
    output: str | None,
    params: PyramidParams,
    *,
    in_place: bool = False,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> ImageRef:
    """Build a multiscale pyramid of `source` and write it; the array work of the task.

    Parameters
    ----------
    source : ImageRef
        Input image; only its level 0 is read.
    output : str or None
        Where the new OME-Zarr goes (ignored in place).
    params : PyramidParams
        Method, level plan and storage options.
    in_place : bool, optional
        Add levels ≥ 1 to `source` itself, never touching level 0.
    overwrite : bool, optional
        Replace an existing `output`.
    progress : callable, optional
        Called with ``(blocks_done, blocks_total)``.

    Returns
    -------
    ImageRef
        The written image.

    Raises
    ------
    ValueError, FileExistsError
        From validation, before anything is written.
    """
    version_, plan = plan_pyramid(source, params, in_place=in_place)
    src_loc = Location.parse(source.url)
    if in_place:
        out = src_loc
    else:
        if output is None:
            raise ValueError("`output` is required unless in place")
        out = Location.parse(output)
        check_output(out, [src_loc], overwrite=overwrite or resumable(out))
    method = params.method_for(source)
    multiscale = multiscale_of(source, plan, method)
    record = provenance("pyramid", method.value, {**params.model_dump(mode="json"),
                        "in_place": in_place}, source)  # fmt: skip
    if in_place:
        _drop_old_levels(source, version_)
    else:
        # Marked unfinished until its metadata is written: an interrupted run is visibly
        # incomplete, and the same command finishes it.
        begin_output(out, {"stage": "pyramid"})
    writes, copies = pyramid_writes(
        source, out, plan, method, ngff_version=version_, write_level0=not in_place,
        compressor=params.compressor, clevel=params.clevel,
    )  # fmt: skip
    compute_blocks(writes, progress, extra=copies)
    # A label image stays one, naming the image it labels from where it now is.
    label = relocate_image_label(source.image_label, src_loc, out)
    write_image_metadata(out, multiscale, ngff_version=version_, omero=source.omero,
                         image_label=label, provenance=record)  # fmt: skip
    if not in_place:
        out.delete(INCOMPLETE_MARKER)
    return open_image(out)


def _drop_old_levels(source: ImageRef, ngff_version: str) -> None:
    """List only level 0 in the metadata, then delete the old levels ≥ 1."""
    loc = Location.parse(source.url)
    first = source.levels[0]
    only0 = Multiscale(source.axes, (Dataset(first.path, first.scale, first.translation),),
                       source.name, source.method)  # fmt: skip
    write_image_metadata(loc, only0, ngff_version=ngff_version, omero=source.omero,
                         image_label=source.image_label, provenance=source.provenance)  # fmt: skip
    keep = loc.child(first.path)
    for lv in source.levels[1:]:
        node = loc.child(lv.path)
        if not (node.contains(keep) or keep.contains(node)):
            node.delete()


def _outside_hierarchy(base: str) -> str:
    """An image inside a zarr hierarchy renamed to lie beside it.

    ``a.ome.zarr/labels/c`` → ``a.labels.c.ome.zarr``; anything else is returned as it is.
    """
    scheme, sep, path = base.rpartition("://")
    parts = path.split("/")
    # The outermost `*.zarr` above the image, or the image that a `labels` group belongs to;
    # a bucket (or memory store) name is never one.
    inner = range(1 if sep else 0, len(parts) - 1)
    root = next((i for i in inner if parts[i].endswith(".zarr")), None)
    if root is None and len(parts) > 2 and parts[-2] == "labels":
        root = len(parts) - 3
    if root is None:
        return base
    head = parts[root]
    suffix = next((x for x in (".ome.zarr", ".zarr") if head.endswith(x)), "")
    name = ".".join([head[: len(head) - len(suffix)], *parts[root + 1 :]]) + suffix
    return scheme + sep + "/".join([*parts[:root], name])


def default_output(url: str) -> str:
    """Where a pyramid goes without an output: beside the input, never inside another image.

    ``brain.ome.zarr`` → ``brain.pyramid.ome.zarr``; ``x.zarr`` → ``x.pyramid.zarr``. An image
    inside a zarr hierarchy, such as the label image ``brain.ome.zarr/labels/cells``, goes
    beside the hierarchy, named after its path in it: ``brain.labels.cells.pyramid.ome.zarr``.
    """
    base = _outside_hierarchy(url.rstrip("/"))
    for suffix in (".ome.zarr", ".zarr"):
        if base.endswith(suffix):
            return base[: -len(suffix)] + ".pyramid" + suffix
    return base + ".pyramid.ome.zarr"


def resolve_target(input: str, output: str | None, *, in_place: bool) -> str:
    """Where a pyramid goes: the input in place, else `output` or the default beside it."""
    if in_place:
        return Location.parse(input).url
    return Location.parse(output or default_output(input)).url


def check_pyramid(
    input: str, output: str, params: PyramidParams, *, in_place: bool, overwrite: bool
) -> tuple[ImageRef, list[LevelPlan]]:
    """Check a run before it starts: the input opens, the plan is valid, the output is free.

    Returns
    -------
    source : ImageRef
        The input image.
    plan : list of LevelPlan
        The levels that will be written.

    Raises
    ------
    FileNotFoundError, ValueError, FileExistsError
        For a missing input, something that is not an image, bad parameters, or an output that
        exists (without `overwrite`) or overlaps the input. Nothing is written.
    """
    source = open_image(input)
    _, plan = plan_pyramid(source, params, in_place=in_place)
    if not in_place:
        out = Location.parse(output)
        check_output(out, [source.url], overwrite=overwrite or resumable(out))
    return source, plan


def is_complete(ref: ImageRef) -> bool:
    """Whether the image `ref` describes is still there, with its levels and level-0 content."""
    try:
        now = open_image(ref.url)
    except (FileNotFoundError, ValueError):
        return False
    return len(now.levels) == len(ref.levels) and now.fingerprint == ref.fingerprint


# -- Prefect tasks -----------------------------------------------------------------------------


@task(retries=2, retry_delay_seconds=1, task_run_name="open {url}")
def open_input(url: str) -> ImageRef:
    """Open an image and describe it (I/O only, so it retries)."""
    return open_image(url)


def _pyramid_cache_key(context, parameters) -> str:
    src: ImageRef = parameters["source"]
    params = PyramidParams.model_validate(parameters["params"])
    where = src.url if parameters.get("in_place") else Location.parse(parameters["output"]).url
    return content_key("pyramid", src.fingerprint, {
        "params": params.model_dump(mode="json"), "in_place": bool(parameters.get("in_place")),
        "output": where,
    })  # fmt: skip


@task(
    cache_key_fn=_pyramid_cache_key,
    persist_result=True,
    result_serializer="json",
    task_run_name="pyramid {source.url}",
)
def build_pyramid(
    source: ImageRef,
    output: str | None,
    params: PyramidParams,
    in_place: bool = False,
    overwrite: bool = False,
    progress_key: str | None = None,
) -> ImageRef:
    """Build and write the pyramid of `source` (cached on content, not retried)."""
    return make_pyramid(
        source, output, params, in_place=in_place, overwrite=overwrite,
        progress=publish_progress(progress_key),
    )  # fmt: skip

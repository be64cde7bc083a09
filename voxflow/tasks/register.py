"""Registration tasks: register batches of slice pairs, compose, crop, warp and write the stack."""

from __future__ import annotations

import functools
import json
import math
import os
import threading
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import dask
import dask.array as da
import numpy as np
from prefect import task
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from voxflow.core.axes import spatial_mask
from voxflow.core.pyramid import Method
from voxflow.io import (
    ImageRef,
    Location,
    check_output,
    open_image,
    provenance,
    read_level,
    write_image_metadata,
)
from voxflow.io.writer import DEFAULT_CHUNK, SHARD_PER_CHUNK, blocks_cover_units
from voxflow.tasks._cache import content_key
from voxflow.tasks._compute import (
    ProgressFn,
    compute_blocks,
    flow_client,
    gpu_request,
    publish_progress,
)
from voxflow.tasks._output import INCOMPLETE_MARKER, begin_output, resumable
from voxflow.tasks.pyramid import PyramidParams, level0_chunks, level_writes, multiscale_of
from voxflow.tasks.pyramid import plan_pyramid as _plan_pyramid

__all__ = [
    "INCOMPLETE_MARKER",
    "TRANSFORMS_FILE",
    "PairResult",
    "RegistrationParams",
    "StackGeometry",
    "align_image",
    "align_stack",
    "apply_transforms",
    "check_registration",
    "check_transforms",
    "compose_stack",
    "gpu_request",
    "pair_batches",
    "read_transforms",
    "register_batch",
    "register_pairs_of",
    "stack_geometry",
    "transforms_document",
    "warp_image",
    "warp_stack",
]


TRANSFORMS_FILE = "transforms.json"
"""Name of the transforms document inside the aligned OME-Zarr."""

_SCHEMA = 1
_CONVENTION = (
    "3 x 3 homogeneous matrices acting on (y, x, 1); `pairs[].matrix` maps coordinates of slice "
    "`moving` into slice `fixed`; `composed[k]` maps coordinates of input slice k into the "
    "reference frame, and output(q) = input_k(inv(composed[k]) q). Pixel matrices act on "
    "level-0 pixel indices of the registered frame; physical ones on NGFF physical coordinates "
    "(index * scale + translation)."
)

_Levels = Annotated[tuple[PositiveInt, ...], Field(min_length=1, max_length=12)]


MIN_SAMPLES = 64
"""The fewest pixels per pair a sampled level may read (the core's bound; a test keeps them
equal without importing torch here)."""


class RegistrationParams(BaseModel):
    """How slices are registered, composed, warped and stored; the registration form."""

    model_config = ConfigDict(frozen=True)

    transform: Literal["translation", "rigid", "similarity", "affine"] = Field(
        "rigid", description="Transform family of every pair."
    )
    loss: Literal["ncc", "mse", "lncc"] = Field(
        "ncc", description="ncc (overlap-only), mse, or lncc (local NCC, tolerates contrast)."
    )
    levels: _Levels = Field(
        (8, 4, 2, 1), description="Downsampling factor per resolution level, coarse to fine."
    )
    epochs: PositiveInt | _Levels | None = Field(
        None, description="Most steps per level (one value, or one per level); None: default."
    )
    lr: PositiveFloat | Annotated[tuple[PositiveFloat, ...], Field(min_length=1)] | None = Field(
        None, description="Learning rate per level (one value, or one per level); None: default."
    )
    patience: PositiveInt = Field(10, le=1000, description="Early stop: epochs without gain.")
    min_delta: float = Field(1e-4, ge=0, le=1, description="Early stop: smallest gain counted.")
    penalty: float = Field(0.0, ge=0, description="L2 penalty on scale and shear deviation.")
    window: PositiveInt = Field(9, le=255, description="Window of the lncc loss, in pixels.")
    smoothing: float = Field(
        1.0, ge=0, le=10, description="Gaussian sigma (pixels) at the finest level; 0: none."
    )
    samples: int | None = Field(
        32768,
        ge=MIN_SAMPLES,
        description="Pixels per pair the loss reads at a finer level; None: all.",
    )
    seed: int = Field(0, ge=0, description="Seed; equal seeds give identical results.")
    batch_size: PositiveInt = Field(16, le=4096, description="Pairs optimised as one batch.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Torch device.")
    neighbours: PositiveInt = Field(
        1, le=16, description="Register slice i to i-1 … i-k; k > 1 solves the stack for drift."
    )
    channel: int = Field(0, ge=0, description="Channel the registration runs on.")
    reference: int = Field(0, ge=0, description="Slice that stays fixed.")
    interpolation: Literal["linear", "cubic"] = Field("linear", description="Warp interpolation.")
    crop: bool = Field(True, description="Crop to the box every warped slice covers.")
    margin: int = Field(0, ge=0, description="Extra pixels cropped on every side of the box.")
    pyramid: PyramidParams = Field(
        default_factory=PyramidParams, description="Levels and storage of the output."
    )

    @model_validator(mode="after")
    def _per_level(self) -> RegistrationParams:
        n = len(self.levels)
        for name in ("epochs", "lr"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) not in (1, n):
                raise ValueError(
                    f"`{name}` needs one value or one per level ({n}), got {len(value)}"
                )
        if self.pyramid.method in (Method.MODE, Method.STRIDE):
            raise ValueError(f"the output is an intensity image; `method` {self.pyramid.method}")
        return self

    def registration_json(self) -> dict[str, Any]:
        """The fields that decide the pairwise results (the batch cache key)."""
        keys = ("transform", "loss", "levels", "epochs", "lr", "patience", "min_delta",
                "penalty", "window", "smoothing", "samples", "seed", "channel")  # fmt: skip
        return {k: v for k, v in self.model_dump(mode="json").items() if k in keys}


class PairResult(BaseModel):
    """One registered pair: `matrix` maps pixel coordinates of `moving` into `fixed`."""

    model_config = ConfigDict(frozen=True)

    moving: int
    fixed: int
    matrix: tuple[tuple[float, float, float], ...]
    loss: float | None
    steps: int
    converged: bool


class StackGeometry(BaseModel):
    """Where the slice, channel and in-plane axes of a stack are."""

    model_config = ConfigDict(frozen=True)

    z: int
    c: int | None
    n_slices: int
    n_channels: int
    frame: tuple[int, int]
    spacing: tuple[float, float]
    origin: tuple[float, float]
    units: tuple[str | None, str | None]


# -- validation --------------------------------------------------------------------------------


def stack_geometry(source: ImageRef) -> StackGeometry:
    """Check that `source` is a stack of 2D slices and locate its axes.

    Parameters
    ----------
    source : ImageRef
        The image; dims ``zyx`` or ``czyx`` (a leading time axis of size 1 is allowed).

    Returns
    -------
    StackGeometry
        Axis positions, slice count, frame shape (Y, X), in-plane spacing and origin.

    Raises
    ------
    ValueError
        For a 2D image, a stack of one slice, a time series, or axes other than (c)zyx.
    """
    dims = "".join(source.dims)
    if "z" not in dims or len([d for d in dims if d in "zyx"]) != 3:
        raise ValueError(
            f"registration needs a stack of slices with axes (c)zyx; {source.url} has axes "
            f"{dims!r} ({'a 2D image' if len(source.shape) == 2 else 'no z axis'})"
        )
    if "t" in dims and source.shape[dims.index("t")] != 1:
        raise ValueError(f"registration takes one time point; {source.url} has axes {dims!r}")
    if not dims.endswith("zyx"):
        raise ValueError(f"the slice axes must be the last three (zyx), got {dims!r}")
    z, y, x = (dims.index(a) for a in "zyx")
    if source.shape[z] < 2:
        raise ValueError(f"a stack of one slice has nothing to align: {source.url} has z = 1")
    c = dims.index("c") if "c" in dims else None
    return StackGeometry(
        z=z, c=c, n_slices=source.shape[z], n_channels=source.shape[c] if c is not None else 1,
        frame=(source.shape[y], source.shape[x]), spacing=(source.scale[y], source.scale[x]),
        origin=(source.translation[y], source.translation[x]),
        units=(source.units[y], source.units[x]),
    )  # fmt: skip


def check_registration(
    source: ImageRef, output: str, params: RegistrationParams, *, overwrite: bool = False
) -> StackGeometry:
    """Validate a registration before anything is registered or written.

    Raises
    ------
    ValueError, FileExistsError
        For an input that is not a stack, a channel or reference out of range, a frame
        smaller than the coarsest level allows, or an output that exists or is the input.
    """
    geo = stack_geometry(source)
    if params.channel >= geo.n_channels:
        raise ValueError(
            f"`channel` {params.channel} is out of range: the stack has {geo.n_channels}"
        )
    if params.reference >= geo.n_slices:
        raise ValueError(
            f"`reference` {params.reference} is out of range: the stack has {geo.n_slices} slices"
        )
    if min(geo.frame) < 8:
        raise ValueError(f"slices of {geo.frame} pixels are too small to register (>= 8 needed)")
    out = Location.parse(output)
    rerun = _rerun(out, source, params)
    check_output(out, [source.url], overwrite=overwrite or resumable(out) or rerun)
    return geo


def _rerun(
    out: Location, source: ImageRef, params: RegistrationParams, document: dict | None = None
) -> bool:
    """Whether `out` is an earlier run of this very request: the same input and parameters.

    Such an output passes the check before a run, where the stage's cache serves it; any
    other output is refused before any pair is registered. With `document`, the stored
    transforms must be the same too: only then may the write replace `out` with the very
    image it holds (when the cache has lost the stage's result).
    """
    try:
        done = open_image(out)
    except (FileNotFoundError, ValueError):
        return False
    record = done.provenance or {}
    asked = {**params.model_dump(mode="json"), "transforms": TRANSFORMS_FILE}
    return (
        record.get("stage") == "register"
        and record.get("input") == {"url": source.url, "fingerprint": source.fingerprint}
        and record.get("parameters") == _as_json(asked)
        and (document is None or record.get("transforms") == _as_json(document))
    )


def _as_json(value: Any) -> Any:
    """`value` as it reads back from a JSON document (tuples as lists, arrays as lists)."""
    return json.loads(json.dumps(value, default=lambda v: getattr(v, "tolist", lambda: str(v))()))


# -- pairs -------------------------------------------------------------------------------------


def pair_batches(n_slices: int, neighbours: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """Pairs ``(moving, fixed)`` with ``moving - neighbours <= fixed < moving``, in batches.

    Consecutive pairs come first, so the chain needed for a plain composition is done
    before the drift-control pairs.
    """
    pairs = [(i, i - d) for d in range(1, neighbours + 1) for i in range(d, n_slices)]
    return [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]


def _slices(source: ImageRef, geo: StackGeometry, channel: int, index: Sequence[int]) -> dict:
    """The listed slices of one channel, read once each, as {index: (Y, X) array}."""
    wanted = sorted(set(index))
    arr = read_level(source, 0)
    lead = (0,) * (len(source.dims) - 3 - (geo.c is not None))
    sel = lead + ((channel,) if geo.c is not None else ()) + (wanted,)
    with flow_client() as client:
        data = arr[sel].compute() if client is None else client.compute(arr[sel]).result()
    return {k: np.asarray(data[i]) for i, k in enumerate(wanted)}


def register_pairs_of(
    source: ImageRef, pairs: Sequence[tuple[int, int]], params: RegistrationParams
) -> list[PairResult]:
    """Register the `pairs` of slices of `source` as one batch; the array work.

    Parameters
    ----------
    source : ImageRef
        The stack.
    pairs : sequence of (int, int)
        ``(moving, fixed)`` slice indices.
    params : RegistrationParams
        Transform family, loss, levels, optimiser and device.

    Returns
    -------
    list of PairResult
        One per pair, in order.
    """
    from voxflow.core.register import make_levels, register_pairs

    geo = stack_geometry(source)
    slices = _slices(source, geo, params.channel, [i for p in pairs for i in p])
    moving = np.stack([slices[m] for m, _ in pairs])
    fixed = np.stack([slices[f] for _, f in pairs])
    levels = make_levels(**{
        k: v for k, v in (("factors", params.levels), ("epochs", params.epochs),
                          ("lr", params.lr)) if v is not None
    })  # fmt: skip
    result = register_pairs(
        fixed, moving, transform=params.transform, loss=params.loss, levels=levels,
        patience=params.patience, min_delta=params.min_delta, penalty=params.penalty,
        window=params.window, smoothing=params.smoothing, samples=params.samples,
        seed=params.seed, device=params.device,
    )  # fmt: skip
    return [
        PairResult(
            moving=m, fixed=f, matrix=tuple(tuple(float(v) for v in row) for row in mat),
            loss=float(loss) if np.isfinite(loss) else None, steps=int(steps),
            converged=bool(ok),
        )
        for (m, f), mat, loss, steps, ok in zip(
            pairs, result.matrices, result.loss, result.steps, result.converged, strict=True
        )
    ]  # fmt: skip


# -- composition and crop ----------------------------------------------------------------------


_OUTLIER_PX = 1.0  # a measurement this far (RMS px) from the solved stack, and ...
_OUTLIER_MEDIANS = 5.0  # ... this many median residuals, is dropped as a failed registration
_CARRY = 1e-6  # weight of the identity standing in for a consecutive pair that failed


def compose_stack(
    n_slices: int, results: Sequence[PairResult], frame: tuple[int, int], *, reference: int = 0
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Composed transforms of every slice from the pairwise results.

    With consecutive pairs only, the composed transform of slice i is the prefix product
    of the pairwise ones; with farther neighbours too, a least-squares solve over the
    stack. A pair that did not converge is dropped; a consecutive one is replaced by the
    identity (the slice carries its neighbour's transform), kept with a negligible
    weight so that any other measurement of the slice wins. In the solve, a measurement
    that disagrees with the solved stack by more than 1 px RMS and five times the median
    disagreement is dropped as a failed registration and the stack solved again (up to
    three rounds), as long as every slice stays connected.

    Returns
    -------
    composed : ndarray of float64, shape (Z, 3, 3)
        ``composed[k]`` maps pixel coordinates of slice k into the reference frame.
    rejected : list of (int, int)
        ``(moving, fixed)`` of the measurements dropped as outliers.
    """
    from voxflow.core.stack import compose

    chain = {r.moving: r for r in results if r.fixed == r.moving - 1}
    missing = [i for i in range(1, n_slices) if i not in chain]
    if missing:
        raise ValueError(f"no registration result for the pair(s) of slices {missing[:5]}")
    if all(r.fixed == r.moving - 1 for r in results):
        pairwise = np.tile(np.eye(3), (n_slices, 1, 1))
        for i, r in chain.items():
            pairwise[i] = np.asarray(r.matrix) if r.converged else np.eye(3)
        return compose(pairwise, reference=reference), []
    pairs = np.array([(r.moving, r.fixed) for r in results], dtype=np.int64)
    mats = np.array([r.matrix if r.converged else np.eye(3) for r in results])
    weights = np.array([
        1.0 if r.converged else (_CARRY if r.fixed == r.moving - 1 else 0.0) for r in results
    ])  # fmt: skip
    return _solve_robust(n_slices, pairs, mats, weights, frame, reference)


def _solve_robust(n, pairs, mats, weights, frame, reference):
    from voxflow.core.stack import pixel_rms, solve_stack

    composed = solve_stack(n, pairs, mats, frame, weights=weights, reference=reference)
    rejected: list[tuple[int, int]] = []
    for _ in range(3):
        residual = pixel_rms(composed[pairs[:, 1]] @ mats, composed[pairs[:, 0]], frame)
        used = weights > _CARRY  # measured pairs; the stand-ins are not judged
        limit = max(_OUTLIER_PX, _OUTLIER_MEDIANS * float(np.median(residual[used])))
        bad = used & (residual > limit)
        if not bad.any():
            break
        trial = np.where(bad, 0.0, weights)
        try:
            composed = solve_stack(n, pairs, mats, frame, weights=trial, reference=reference)
        except ValueError:  # dropping them would cut slices off: keep what we have
            break
        weights = trial
        rejected += [(int(i), int(j)) for i, j in pairs[bad]]
    return composed, rejected


def _box_physical(box, spacing, origin) -> list[list[float]]:
    """The box's outer edges in physical units (half a pixel beyond the edge centres)."""
    return [
        [origin[a] + (box[a][0] - 0.5) * spacing[a], origin[a] + (box[a][1] - 0.5) * spacing[a]]
        for a in range(2)
    ]


def transforms_document(
    source: ImageRef,
    geo: StackGeometry,
    params: RegistrationParams,
    results: Sequence[PairResult],
    composed: np.ndarray,
    box: tuple[tuple[int, int], tuple[int, int]],
    rejected: Sequence[tuple[int, int]] = (),
) -> dict[str, Any]:
    """The transforms document (the ``transforms.json`` schema of the README)."""
    from voxflow.core.stack import to_physical

    phys = to_physical(composed, geo.spacing, geo.origin)
    matrices = np.array([r.matrix for r in results]).reshape(-1, 3, 3)
    pairs_phys = to_physical(matrices, geo.spacing, geo.origin)
    dropped = set(map(tuple, rejected))
    pairs = [
        {
            "moving": r.moving, "fixed": r.fixed, "matrix": m.tolist(), "matrix_physical":
            mp.tolist(), "loss": r.loss, "steps": r.steps, "converged": r.converged,
            "outlier": (r.moving, r.fixed) in dropped,
        }
        for r, m, mp in zip(results, matrices, pairs_phys, strict=True)
    ]  # fmt: skip
    return {
        "schema": _SCHEMA,
        "convention": _CONVENTION,
        "input": {"url": source.url, "fingerprint": source.fingerprint},
        "dims": "".join(source.dims),
        "n_slices": geo.n_slices,
        "frame": list(geo.frame),
        "spacing": list(geo.spacing),
        "origin": list(geo.origin),
        "units": list(geo.units),
        "reference": params.reference,
        "registration": params.model_dump(mode="json", exclude={"pyramid"}),
        "pairs": pairs,
        "composed": composed.tolist(),
        "composed_physical": phys.tolist(),
        "crop": {
            "applied": params.crop,
            "margin": params.margin,
            "box": [list(box[0]), list(box[1])],
            "box_physical": _box_physical(box, geo.spacing, geo.origin),
        },
    }


# -- warping and writing -----------------------------------------------------------------------


_WARP_SLOTS = threading.BoundedSemaphore(os.cpu_count() or 1)


def _warp_block(block: np.ndarray, composed: np.ndarray, box, order: str, device: str,
                has_channel: bool, threads: int, block_info=None) -> np.ndarray:  # fmt: skip
    from voxflow.core.warp import warp_slices

    (z0, z1) = block_info[0]["array-location"][-3]
    slab = np.moveaxis(block, -3, 0) if has_channel else block.reshape(block.shape[-3:])
    # Blocks warp in parallel already: no more kernels at once than cores, or they evict
    # each other's slices from the caches.
    with _WARP_SLOTS:
        warped = warp_slices(slab, composed[z0:z1], box=box, order=order, device=device,
                             threads=threads)  # fmt: skip
    if has_channel:
        warped = np.moveaxis(warped, 0, -3)
    return warped.reshape(block.shape[:-2] + warped.shape[-2:])


def _output_like(source: ImageRef, geo: StackGeometry, box) -> ImageRef:
    (y0, y1), (x0, x1) = box
    shape = (*source.shape[:-2], y1 - y0, x1 - x0)
    trans = list(source.translation)
    trans[-2] = geo.origin[0] + y0 * geo.spacing[0]
    trans[-1] = geo.origin[1] + x0 * geo.spacing[1]
    first = source.levels[0].model_copy(update={"shape": shape, "translation": tuple(trans)})
    return source.model_copy(update={"levels": (first,)})


def warp_stack(
    source: ImageRef,
    document: dict[str, Any],
    composed: np.ndarray,
    box: tuple[tuple[int, int], tuple[int, int]],
    output: str,
    params: RegistrationParams,
    *,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> ImageRef:
    """Warp every slice of `source` once with `composed`, crop to `box` and write it all.

    The output carries :data:`INCOMPLETE_MARKER` and no image metadata until every level
    and ``transforms.json`` are written; the metadata (with the transforms document in its
    ``voxflow`` attributes) comes last.

    Parameters
    ----------
    source : ImageRef
        The stack; every channel is warped.
    document : dict
        The transforms document, written to ``OUTPUT/transforms.json``.
    composed : ndarray, shape (Z, 3, 3)
        Slice → reference maps in level-0 pixels of `source`.
    box : ((int, int), (int, int))
        Half-open output box in the reference frame.
    output : str
        The new OME-Zarr.
    params : RegistrationParams
        Interpolation, device and the output's pyramid.
    overwrite : bool, optional
        Replace an existing `output`.
    progress : callable, optional
        Called with ``(blocks_done, blocks_total)`` during the write.

    Returns
    -------
    ImageRef
        The aligned image.
    """
    geo = stack_geometry(source)
    like = _output_like(source, geo, box)
    version_, plan = _plan_pyramid(like, _bounded_layout(params.pyramid, like, geo))
    out = Location.parse(output)
    again = resumable(out) or _rerun(out, source, params, document)
    check_output(out, [source.url], overwrite=overwrite or again)
    device = params.device
    resources = gpu_request(device)
    if _bands_needed(source, geo, params, resources):
        warped = _warp_in_bands(source, geo, np.asarray(composed, float), box, plan)
    else:
        zc = _slab_depth(plan, source, geo)
        chunks = tuple(
            zc if i == geo.z else (n if i >= len(source.dims) - 2 else 1)
            for i, n in enumerate(source.shape)
        )  # fmt: skip
        stack = read_level(source, 0, chunks=chunks)
        out_chunks = (*stack.chunks[:-2], (like.shape[-2],), (like.shape[-1],))
        # Fewer blocks (slabs × channels) than cores: each block's kernel takes a share of them.
        threads = max(1, (os.cpu_count() or 1) // stack.npartitions)
        with dask.annotate(resources=resources):
            warped = da.map_blocks(
                _warp_block, stack, np.asarray(composed, float), box, params.interpolation,
                device, geo.c is not None, threads, chunks=out_chunks, dtype=stack.dtype,
                meta=np.empty((0,) * 3, stack.dtype),
            )  # fmt: skip
    begin_output(out, {"stage": "register"})
    record = provenance("register", document["registration"]["transform"], {
        **params.model_dump(mode="json"), "transforms": TRANSFORMS_FILE,
    }, source)  # fmt: skip
    record["transforms"] = document
    # Level 1 is reduced from blocks of level0_chunks. Level 0 alone is written from the warped
    # blocks as they are when each covers whole stored units: one write each, nothing split.
    level0 = warped
    if len(plan) > 1 or not blocks_cover_units(warped.chunks, plan[0].layout.write_chunks):
        level0 = warped.rechunk(level0_chunks(plan, warped.dtype.itemsize))
    writes = level_writes(
        level0, out, plan, params.pyramid.method_for(), dims=source.dims, ngff_version=version_,
        compressor=params.pyramid.compressor, clevel=params.pyramid.clevel,
    )  # fmt: skip
    # transforms.json is written beside the blocks (the metadata, last, marks all of it done).
    record_transforms = dask.delayed(functools.partial(out.write_json, TRANSFORMS_FILE, document),
                                     pure=False)()  # fmt: skip
    compute_blocks(writes, progress, extra=[record_transforms])
    write_image_metadata(out, multiscale_of(like, plan, params.pyramid.method_for()),
                         ngff_version=version_, omero=source.omero, provenance=record)  # fmt: skip
    out.delete(INCOMPLETE_MARKER)
    return open_image(out)


def _bands_needed(source: ImageRef, geo: StackGeometry, params, resources) -> bool:
    """Whether whole-slice blocks would cut the input's stored chunks: then warp in bands.

    A block of whole slices spans whole stored chunks of the input only up to
    ``_SLAB_MAX_BYTES``; past that, every block would decode all of the chunks it cuts, up
    to a chunk's depth times over. Bands of rows read whole chunks in depth instead. They
    run the compiled bilinear kernel, so only linear warps on the CPU take them.
    """
    from voxflow.core.predict import resolve_device

    if params.interpolation != "linear" or resources or resolve_device(params.device).type != "cpu":
        return False
    per_slice = math.prod(geo.frame) * np.dtype(source.dtype).itemsize
    stored = min(source.levels[0].chunks[geo.z], geo.n_slices)
    return stored > 1 and stored * per_slice > _SLAB_MAX_BYTES


def _warp_band(composed, box, first_row, height, *windows) -> np.ndarray:
    """Warp one block of input rows (one channel: the axes before the slices are 1 long)."""
    from voxflow.core.warp import warp_rows

    window = windows[0] if len(windows) == 1 else np.concatenate(windows, axis=-2)
    with _WARP_SLOTS:
        warped = warp_rows(window.reshape(window.shape[-3:]), composed, first_row=first_row,
                           height=height, box=box, threads=1)  # fmt: skip
    return warped.reshape(window.shape[:-3] + warped.shape)


def _warp_in_bands(source: ImageRef, geo: StackGeometry, composed: np.ndarray, box,
                   plan) -> da.Array:  # fmt: skip
    """The warped stack in blocks of whole stored chunks in depth and bands of rows.

    Each block reads the input blocks (a stored chunk deep, whole chunk rows, every column)
    that hold the rows its slices read (:func:`voxflow.core.warp.source_rows`), so no stored
    chunk is decoded twice and a block holds a band, not whole slices.
    """
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    from voxflow.core.warp import source_rows

    itemsize = np.dtype(source.dtype).itemsize
    (y0, y1), (x0, x1) = box
    height, width = geo.frame
    depth = min(source.levels[0].chunks[geo.z], geo.n_slices)
    unit = min(source.levels[0].chunks[-2], height)
    rows = max(unit, _SLAB_BYTES // max(depth * width * itemsize, 1) // unit * unit)
    band = max(1, min(level0_chunks(plan, itemsize)[-2], y1 - y0))
    while band > unit and depth * band * (x1 - x0) * itemsize > _SLAB_BYTES:
        band = -(-band // 2)
    read_chunks = tuple(
        depth if i == geo.z else rows if i == len(source.dims) - 2
        else width if i == len(source.dims) - 1 else 1
        for i in range(len(source.dims))
    )  # fmt: skip
    stack = read_level(source, 0, chunks=read_chunks)
    bands = [(r, min(r + band, y1 - y0)) for r in range(0, y1 - y0, band)]
    name = f"warp-band-{tokenize(stack.name, composed, box, band)}"
    layer = {}
    slabs = [(z, min(z + depth, geo.n_slices)) for z in range(0, geo.n_slices, depth)]
    for zi, (z0, z1) in enumerate(slabs):
        for bi, (r0, r1) in enumerate(bands):
            part = ((y0 + r0, y0 + r1), (x0, x1))
            need = source_rows(composed[z0:z1], part, geo.frame)
            used = need[:, 1] > need[:, 0]
            first, stop = (need[used, 0].min(), need[used, 1].max()) if used.any() else (0, 1)
            blocks = range(first // rows, (stop - 1) // rows + 1)
            for index in np.ndindex(*stack.numblocks[: geo.z]):
                reads = [(stack.name, *index, zi, k, 0) for k in blocks]
                layer[(name, *index, zi, bi, 0)] = (
                    _warp_band, composed[z0:z1], part, blocks[0] * rows, height, *reads,
                )  # fmt: skip
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[stack])
    chunks = (*stack.chunks[: geo.z + 1], tuple(r1 - r0 for r0, r1 in bands), (x1 - x0,))
    return da.Array(graph, name, chunks=chunks, dtype=stack.dtype,
                    meta=np.empty((0,) * stack.ndim, stack.dtype))  # fmt: skip


_UNIT_DEPTH_BYTES = 256 * 2**20


def _bounded_layout(pyramid: PyramidParams, like: ImageRef, geo: StackGeometry) -> PyramidParams:
    """The output's storage layout, with stored units no deeper than memory allows.

    A stored unit (a shard, or a chunk without shards) is written once all of its slices
    are warped, and the warp makes whole slices, so the slices of one unit's depth are held
    at once: 256 of them with the default shards, 16 GiB for 8192² uint8 slices. When
    neither `chunks` nor `shards` is set, units are made as shallow as needed (a power of
    two, at least one slice) for that depth of output slices, every channel, to take at
    most 256 MiB; their chunks grow in-plane to about the default's voxels per chunk. A
    layout set by hand is kept, whatever its memory.
    """
    if pyramid.chunks is not None or pyramid.shards is not None:
        return pyramid
    version_ = pyramid.ngff_version or "0.5"
    edge = DEFAULT_CHUNK[version_]
    per_unit = SHARD_PER_CHUNK if version_ == "0.5" else 1
    slice_bytes = math.prod(like.shape[-2:]) * geo.n_channels * np.dtype(like.dtype).itemsize
    fits = _UNIT_DEPTH_BYTES // slice_bytes
    if fits >= edge * per_unit:
        return pyramid
    depth = 1 << max(int(fits).bit_length() - 1, 0)
    deep = min(edge, depth)
    wide = edge << round(math.log2(edge // deep) / 2)
    axes = [i for i, s in enumerate(spatial_mask(like.dims)) if s]
    chunks = tuple(deep if i == geo.z else wide for i in axes)
    shards = tuple(depth if i == geo.z else wide * per_unit for i in axes)
    update = {"chunks": chunks, "shards": shards if version_ == "0.5" else None}
    return pyramid.model_copy(update=update)


_SLAB_BYTES = 16 * 2**20
_SLAB_MAX_BYTES = 128 * 2**20


def _slab_depth(plan, source: ImageRef, geo: StackGeometry) -> int:
    """Slices warped per block: about 16 MiB of input, at most level 1's feed depth.

    Blocks that size let reading, warping and writing of a long stack overlap; a divisor of
    the feed depth, so the output blocks rechunk into it without splitting a slab. A block
    also spans whole stored chunks of the input (up to 128 MiB of them): a block that cuts
    a stored chunk makes every block it feeds decode all of it again.
    """
    want = level0_chunks(plan, np.dtype(source.dtype).itemsize)[geo.z]
    per_slice = max(math.prod(geo.frame) * geo.n_channels * np.dtype(source.dtype).itemsize, 1)
    stored = source.levels[0].chunks[geo.z]
    unit = stored if want % stored == 0 and stored * per_slice <= _SLAB_MAX_BYTES else 1
    depth = max(unit, min(want, _SLAB_BYTES // per_slice) // unit * unit)
    while want % depth:
        depth -= unit
    return depth


# -- re-applying a transforms file -------------------------------------------------------------


def read_transforms(url: str) -> dict[str, Any]:
    """Read a transforms document (``transforms.json`` or the aligned image holding one)."""
    loc = Location.parse(url)
    if loc.exists(TRANSFORMS_FILE):
        return loc.read_json(TRANSFORMS_FILE)
    parent, _, name = loc.url.rstrip("/").rpartition("/")
    base = Location.parse(parent) if parent else loc
    if not name or not base.exists(name):
        raise FileNotFoundError(f"no transforms document at {url}")
    return base.read_json(name)


def check_transforms(source: ImageRef, document: dict[str, Any]) -> tuple[np.ndarray, tuple]:
    """Match a transforms document to `source`; return its composed pixel maps and box.

    The physical transforms are converted to the pixels of `source`, so a document made on
    one resolution applies to any other copy of the same stack (another channel, level 0 of
    a stack registered at a coarser level). The crop box is taken in physical units and
    shrunk, where needed, until every pixel of it is covered by every warped slice.

    Raises
    ------
    ValueError
        When the document is not a voxflow transforms document, or its slice count or
        physical frame does not match `source`.
    """
    from voxflow.core.stack import to_pixels

    geo = stack_geometry(source)
    if not isinstance(document, dict) or document.get("schema") != _SCHEMA:
        raise ValueError("not a voxflow transforms document (schema 1 expected)")
    if document["n_slices"] != geo.n_slices:
        raise ValueError(
            f"the transforms are for {document['n_slices']} slices; the stack has {geo.n_slices}"
        )
    extent = [n * s for n, s in zip(document["frame"], document["spacing"], strict=True)]
    mine = [n * s for n, s in zip(geo.frame, geo.spacing, strict=True)]
    step = max(max(document["spacing"]), max(geo.spacing))
    if any(abs(a - b) > step for a, b in zip(extent, mine, strict=True)):
        raise ValueError(
            f"the transforms are for a frame of {extent} (physical); the stack's is {mine}"
        )
    composed = to_pixels(np.asarray(document["composed_physical"], float), geo.spacing,
                         geo.origin)  # fmt: skip
    crop = document["crop"]
    if not crop["applied"]:
        return composed, ((0, geo.frame[0]), (0, geo.frame[1]))
    box = _box_from_physical(crop["box_physical"], geo)
    return composed, _shrink_to_valid(composed, box, geo.frame)


def _box_from_physical(edges, geo: StackGeometry) -> tuple[tuple[int, int], tuple[int, int]]:
    out = []
    for a in range(2):
        lo = math.ceil((edges[a][0] - geo.origin[a]) / geo.spacing[a] + 0.5 - 1e-6)
        hi = math.floor((edges[a][1] - geo.origin[a]) / geo.spacing[a] + 0.5 + 1e-6)
        out.append((max(lo, 0), min(hi, geo.frame[a])))
    return (out[0], out[1])


def _corner_valid(composed: np.ndarray, y: int, x: int, frame) -> bool:
    p = np.linalg.solve(composed, np.array([y, x, 1.0]))
    eps = 1e-9
    return bool(
        np.all((p[:, 0] >= -eps) & (p[:, 0] <= frame[0] - 1 + eps)
               & (p[:, 1] >= -eps) & (p[:, 1] <= frame[1] - 1 + eps))
    )  # fmt: skip


def _shrink_to_valid(composed, box, frame):
    # The valid region is convex, so a box lies inside it when its four corners do.
    (y0, y1), (x0, x1) = box
    while y1 - y0 > 0 and x1 - x0 > 0:
        bad = [
            (yy, xx) for yy in (y0, y1 - 1) for xx in (x0, x1 - 1)
            if not _corner_valid(composed, yy, xx, frame)
        ]  # fmt: skip
        if not bad:
            return ((y0, y1), (x0, x1))
        yy, xx = bad[0]
        if (y1 - y0) >= (x1 - x0):
            y0, y1 = (y0 + 1, y1) if yy == y0 else (y0, y1 - 1)
        else:
            x0, x1 = (x0 + 1, x1) if xx == x0 else (x0, x1 - 1)
    raise ValueError(
        "the transforms leave no region that every warped slice covers on this stack's grid; "
        "warp it with --no-crop"
    )


def apply_transforms(
    source: ImageRef,
    document: dict[str, Any],
    output: str,
    params: RegistrationParams,
    *,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> ImageRef:
    """Warp `source` with the transforms of `document` (``voxflow warp``) and write it.

    Returns
    -------
    ImageRef
        The aligned image; its ``transforms.json`` is `document` restated for `source`.
    """
    composed, box = check_transforms(source, document)
    geo = stack_geometry(source)
    restated = {
        **document, "input": {"url": source.url, "fingerprint": source.fingerprint},
        "frame": list(geo.frame), "spacing": list(geo.spacing), "origin": list(geo.origin),
        "composed": composed.tolist(),
        "crop": {**document["crop"], "box": [list(box[0]), list(box[1])],
                 "box_physical": _box_physical(box, geo.spacing, geo.origin)},
        "applied_from": document.get("input"),
    }  # fmt: skip
    return warp_stack(source, restated, composed, box, output, params, overwrite=overwrite,
                      progress=progress)  # fmt: skip


def align_stack(
    source: ImageRef,
    results: Sequence[PairResult],
    output: str,
    params: RegistrationParams,
    *,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> ImageRef:
    """Compose the pairwise `results`, crop, warp and write the aligned stack.

    Returns
    -------
    ImageRef
        The aligned image, with ``transforms.json``.
    """
    from voxflow.core.stack import valid_box

    geo = stack_geometry(source)
    composed, rejected = compose_stack(geo.n_slices, results, geo.frame,
                                       reference=params.reference)  # fmt: skip
    box = (
        valid_box(composed, geo.frame, margin=params.margin) if params.crop
        else ((0, geo.frame[0]), (0, geo.frame[1]))
    )  # fmt: skip
    document = transforms_document(source, geo, params, results, composed, box, rejected)
    return warp_stack(source, document, composed, box, output, params, overwrite=overwrite,
                      progress=progress)  # fmt: skip


# -- Prefect tasks -----------------------------------------------------------------------------


def _batch_cache_key(context, parameters) -> str:
    src: ImageRef = parameters["source"]
    params = RegistrationParams.model_validate(parameters["params"])
    return content_key("register-pairs", src.fingerprint, {
        "params": params.registration_json(), "pairs": [list(p) for p in parameters["pairs"]],
    })  # fmt: skip


@task(
    cache_key_fn=_batch_cache_key,
    persist_result=True,
    result_serializer="json",
    task_run_name="register {source.url} pairs {pairs[0]}…",
)
def register_batch(
    source: ImageRef, pairs: list[tuple[int, int]], params: RegistrationParams
) -> list[PairResult]:
    """Register one batch of slice pairs (cached on content, so a rerun redoes none)."""
    return register_pairs_of(source, pairs, params)


def _align_cache_key(context, parameters) -> str:
    src: ImageRef = parameters["source"]
    params = RegistrationParams.model_validate(parameters["params"])
    results = [PairResult.model_validate(r).model_dump(mode="json") for r in parameters["results"]]
    return content_key("register-align", src.fingerprint, {
        "params": params.model_dump(mode="json"), "results": results,
        "output": Location.parse(parameters["output"]).url,
    })  # fmt: skip


@task(
    cache_key_fn=_align_cache_key,
    persist_result=True,
    result_serializer="json",
    task_run_name="align {source.url}",
)
def align_image(
    source: ImageRef,
    results: list[PairResult],
    output: str,
    params: RegistrationParams,
    overwrite: bool = False,
    progress_key: str | None = None,
) -> ImageRef:
    """Compose, crop, warp and write the aligned stack (cached on content, not retried)."""
    return align_stack(source, results, output, params, overwrite=overwrite,
                       progress=publish_progress(progress_key))  # fmt: skip


@task(task_run_name="warp {source.url}")
def warp_image(
    source: ImageRef,
    document: dict[str, Any],
    output: str,
    params: RegistrationParams,
    overwrite: bool = False,
    progress_key: str | None = None,
) -> ImageRef:
    """Re-apply a transforms document to `source` and write the aligned stack."""
    return apply_transforms(source, document, output, params, overwrite=overwrite,
                            progress=publish_progress(progress_key))  # fmt: skip

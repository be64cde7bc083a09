"""Write OME-Zarr images with TensorStore: array layout, block writes, metadata last.

The contract that makes writes safe to run in parallel and to interrupt:

- :func:`write_blocks` writes each write chunk (a shard for zarr v3, a chunk for zarr v2) in
  exactly one task, from whole Dask blocks, so no two tasks ever touch the same stored object;
- the group metadata (:func:`write_image_metadata`) is written after every array, so an
  interrupted write never looks like a complete image.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib.metadata import version as _distribution_version
from pathlib import Path
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import tensorstore as ts
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from voxflow.core.axes import axis_from_name, spatial_mask, validate_dims
from voxflow.io.location import INCOMPLETE_MARKER, Location, tensorstore_context
from voxflow.io.ngff import NGFF_VERSIONS, Dataset, Multiscale, group_attributes
from voxflow.io.omero import fit_windows as _fit_windows
from voxflow.io.omero import sample_steps
from voxflow.io.reader import open_store
from voxflow.io.ref import ImageRef

__all__ = [
    "COMPRESSORS",
    "DEFAULT_CLEVEL",
    "ArrayLayout",
    "blocks_cover_units",
    "check_output",
    "clear_output",
    "copy_stored_chunks",
    "create_array",
    "derive_layout",
    "package_version",
    "provenance",
    "writable",
    "write_blocks",
    "write_image",
    "write_image_metadata",
]

Compressor = Literal["zstd", "lz4", "gzip", "none"]
COMPRESSORS = ("zstd", "lz4", "gzip", "none")
# Blosc level 2 is zstd's own default level (3): as small as blosc level 3 (zstd 5) on
# microscopy volumes and their pyramid levels, and 1.5x (raw) to 5x (block means) faster to
# write (benchmarks/README.md, "Codec").
DEFAULT_CLEVEL = 2
DEFAULT_CHUNK = {"0.5": 64, "0.4": 128}
SHARD_PER_CHUNK = 4
_GROUP_KEYS = ("zarr.json", ".zattrs", ".zgroup")


@dataclass(frozen=True)
class ArrayLayout:
    """How an array is cut into stored objects.

    Parameters
    ----------
    chunks : tuple of int
        The unit of compression and reads (the inner chunk when sharded).
    shards : tuple of int or None
        Shard shape (zarr v3 only), a whole multiple of `chunks`; None when unsharded.
    """

    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None = None

    @property
    def write_chunks(self) -> tuple[int, ...]:
        """The unit of independent writes: the shard, or the chunk when unsharded."""
        return self.shards or self.chunks


def _per_axis(value: int | Sequence[int], dims: Sequence[str], name: str) -> tuple[int, ...]:
    """Expand a per-spatial-axis or per-axis value to every axis (1 on channel and time)."""
    space = spatial_mask(dims)
    if isinstance(value, int | np.integer):
        value = [int(value)] * sum(space)
    value = tuple(value) if isinstance(value, Sequence | np.ndarray) else (value,)
    if not all(isinstance(v, int | np.integer) for v in value):
        raise TypeError(f"`{name}` needs integers, got {value!r}")
    if len(value) == sum(space):
        it = iter(value)
        value = tuple(next(it) if s else 1 for s in space)
    if len(value) != len(dims):
        raise ValueError(
            f"`{name}` needs one integer per spatial axis ({sum(space)}) or per axis "
            f"({len(dims)}), got {value!r}"
        )
    if any(v < 1 for v in value):
        raise ValueError(f"`{name}` must be >= 1 on every axis, got {value!r}")
    return tuple(int(v) for v in value)


def derive_layout(
    shape: Sequence[int],
    dims: Sequence[str],
    *,
    ngff_version: str = "0.5",
    chunks: int | Sequence[int] | None = None,
    shards: int | Sequence[int] | None = None,
) -> ArrayLayout:
    """Chunk and shard shapes for an array, from the options or sensible defaults.

    Parameters
    ----------
    shape : sequence of int
        Array shape.
    dims : sequence of str
        Axis names; channel and time axes always get 1.
    ngff_version : {"0.5", "0.4"}, optional
        0.5 is sharded zarr v3, 0.4 is zarr v2 (no shards).
    chunks : int or sequence of int, optional
        Chunk edge per spatial axis (or per axis). None: 64 for 0.5, 128 for 0.4. Capped to
        the shape.
    shards : int or sequence of int, optional
        Shard edge per spatial axis (or per axis), a multiple of `chunks`. None: 4 chunks per
        axis, capped to the chunks that cover the shape. Not allowed for 0.4.

    Returns
    -------
    ArrayLayout
        Full-dimensional chunk and shard shapes.

    Raises
    ------
    ValueError
        For a shard that is not a multiple of the chunk, shards with NGFF 0.4, or values < 1.
    """
    if ngff_version not in NGFF_VERSIONS:
        raise ValueError(f"`ngff_version` must be one of {NGFF_VERSIONS}, got {ngff_version!r}")
    space = spatial_mask(dims)
    if len(shape) != len(dims):
        raise ValueError(f"`shape` {tuple(shape)} needs one entry per axis of `dims` {dims!r}")
    requested = _per_axis(DEFAULT_CHUNK[ngff_version] if chunks is None else chunks, dims, "chunks")
    chunk = tuple(
        min(r, max(n, 1)) if s else 1 for r, n, s in zip(requested, shape, space, strict=True)
    )
    if ngff_version == "0.4":
        if shards is not None:
            raise ValueError("`shards` needs NGFF 0.5 (zarr v3); NGFF 0.4 (zarr v2) has none")
        return ArrayLayout(chunk)
    if shards is None:
        shard = tuple(c * SHARD_PER_CHUNK if s else 1 for c, s in zip(chunk, space, strict=True))
    else:
        asked = _per_axis(shards, dims, "shards")
        if any(a % r for a, r, s in zip(asked, requested, space, strict=True) if s):
            raise ValueError(
                f"`shards` {asked} must be a whole multiple of `chunks` {requested} per axis"
            )
        shard = tuple(a if s else 1 for a, s in zip(asked, space, strict=True))
    # No larger than the chunks that cover the shape, and a whole number of (capped) chunks.
    shard = tuple(
        max(c, min(s, max(math.ceil(n / c), 1) * c) // c * c)
        for s, c, n in zip(shard, chunk, shape, strict=True)
    )
    return ArrayLayout(chunk, shard)


def _codecs_v3(dtype: np.dtype, compressor: str, clevel: int) -> list[dict[str, Any]]:
    codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compressor in ("zstd", "lz4"):
        codecs.append({"name": "blosc", "configuration": {
            "cname": compressor, "clevel": clevel, "shuffle": "shuffle",
            "typesize": dtype.itemsize, "blocksize": 0}})  # fmt: skip
    elif compressor == "gzip":
        codecs.append({"name": "gzip", "configuration": {"level": clevel}})
    return codecs


def _compressor_v2(compressor: str, clevel: int) -> dict[str, Any] | None:
    if compressor in ("zstd", "lz4"):
        return {"id": "blosc", "cname": compressor, "clevel": clevel, "shuffle": 1}
    if compressor == "gzip":
        return {"id": "gzip", "level": clevel}
    return None


def create_array(
    location: str | Location,
    path: str,
    *,
    shape: Sequence[int],
    dtype: str | np.dtype,
    dims: Sequence[str],
    layout: ArrayLayout,
    zarr_format: int = 3,
    compressor: Compressor = "zstd",
    clevel: int = DEFAULT_CLEVEL,
) -> dict[str, Any]:
    """Create (or replace) an empty array and return the spec that writes into it.

    Parameters
    ----------
    location : str or Location
        The image group.
    path : str
        Array path below the group (``"0"``, ``"1"``, ...).
    shape : sequence of int
        Array shape.
    dtype : str or numpy.dtype
        Voxel type.
    dims : sequence of str
        Axis names (stored as zarr v3 ``dimension_names``).
    layout : ArrayLayout
        Chunks and shards; shards need `zarr_format` 3.
    zarr_format : {3, 2}, optional
        Zarr format.
    compressor : {"zstd", "lz4", "gzip", "none"}, optional
        Blosc-zstd, blosc-lz4 (both byte-shuffled), gzip, or none.
    clevel : int, optional
        Compression level.

    Returns
    -------
    dict
        A JSON TensorStore spec for :func:`write_blocks` (includes a token that tells a
        re-created array from an earlier one at the same path).

    Raises
    ------
    ValueError
        For an unknown compressor, or shards requested with zarr v2.
    """
    if compressor not in COMPRESSORS:
        raise ValueError(f"`compressor` must be one of {COMPRESSORS}, got {compressor!r}")
    dt = np.dtype(dtype)
    loc = Location.parse(location)
    kv = loc.kvstore_spec(path)
    if zarr_format == 3:
        inner = _codecs_v3(dt, compressor, clevel)
        codecs = inner
        grid = layout.chunks
        if layout.shards is not None:
            grid = layout.shards
            codecs = [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": list(layout.chunks), "codecs": inner,
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                 {"name": "crc32c"}],
                "index_location": "end"}}]  # fmt: skip
        metadata = {
            "shape": list(shape), "data_type": dt.name, "dimension_names": list(dims),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(grid)}},
            "chunk_key_encoding": {"name": "default"}, "codecs": codecs,
            "fill_value": False if dt.kind == "b" else 0,
        }  # fmt: skip
        driver = "zarr3"
    else:
        if layout.shards is not None:
            raise ValueError("shards need zarr v3 (NGFF 0.5)")
        metadata = {
            "shape": list(shape), "chunks": list(layout.chunks), "dtype": dt.str,
            "compressor": _compressor_v2(compressor, clevel), "dimension_separator": "/",
            "fill_value": False if dt.kind == "b" else 0, "order": "C", "filters": None,
        }  # fmt: skip
        driver = "zarr"
    spec = {"driver": driver, "kvstore": kv, "metadata": metadata}
    ts.open(
        {**spec, "create": True, "delete_existing": True}, context=tensorstore_context()
    ).result()
    return {"driver": driver, "kvstore": kv, "open": True, "token": uuid.uuid4().hex}


def _store_for(spec: dict[str, Any]) -> ts.TensorStore:
    token = spec.get("token", "")
    body = {k: v for k, v in spec.items() if k != "token"}
    return open_store(json.dumps(body, sort_keys=True), token)


def _task_edges(chunks: Sequence[Sequence[int]], write_chunks: Sequence[int]) -> list | int:
    """Per axis, where one write task ends and the next begins; or the first axis that fails.

    A task is either one block covering whole write chunks, or one write chunk holding whole
    blocks; either way no write chunk is split between two tasks.
    """
    edges = []
    for axis, (sizes, unit) in enumerate(zip(chunks, write_chunks, strict=True)):
        n = int(sum(sizes))
        blocks = np.concatenate([[0], np.cumsum(sizes)])
        units = np.append(np.arange(0, n, unit), n)
        if _covers_units(sizes, unit):
            edges.append(blocks)
        elif np.isin(units, blocks).all():
            edges.append(units)  # every write chunk holds whole blocks
        else:
            return axis
    return edges


def _covers_units(sizes: Sequence[int], unit: int) -> bool:
    """Whether blocks of `sizes` along an axis each cover whole write chunks of `unit`."""
    return not np.any(np.cumsum(sizes)[:-1] % unit)


def blocks_cover_units(chunks: Sequence[Sequence[int]], write_chunks: Sequence[int]) -> bool:
    """Whether every block of `chunks` covers whole write chunks, along every axis.

    :func:`write_blocks` then writes each block alone, as it is; blocks inside write chunks
    are gathered into one write per task, which holds all of them (and TensorStore's copy)
    at once.
    """
    return all(_covers_units(s, u) for s, u in zip(chunks, write_chunks, strict=True))


def writable(arr: da.Array, write_chunks: Sequence[int]) -> da.Array:
    """`arr` if :func:`write_blocks` takes its blocks as they are, else rechunked to the writes."""
    if isinstance(_task_edges(arr.chunks, write_chunks), int):
        return arr.rechunk(write_chunks)
    return arr


def _write_unit(spec: dict[str, Any], origins: list[tuple[int, ...]], *blocks: np.ndarray):
    """Write `blocks` (each at its origin) as one stored unit: one transaction, one commit."""
    store = _store_for(spec)
    if len(blocks) == 1:
        txn, target = None, store
    else:
        # One commit encodes and writes the unit once; gathering the blocks into one array
        # first would cost a copy and a fresh, page-faulted allocation of the unit's size.
        txn = ts.Transaction()
        target = store.with_transaction(txn)
    writes = [
        target[tuple(slice(o, o + n) for o, n in zip(origin, block.shape, strict=True))]
        .write(block)
        for origin, block in zip(origins, blocks, strict=True)
    ]  # fmt: skip
    for write in writes:
        write.result()
    if txn is not None:
        txn.commit_async().result()
    count = sum(block.size for block in blocks)
    return np.full((1,) * (blocks[0].ndim if blocks else 0), count, dtype=np.int64)


def write_blocks(arr: da.Array, spec: dict[str, Any], write_chunks: Sequence[int]) -> da.Array:
    """Lazily write every block of `arr` into the array of `spec`, one task per stored unit.

    Parameters
    ----------
    arr : dask.array.Array
        Data, blocked so that along each axis either every block covers whole write chunks
        (the last block may end at the array edge) or every write chunk holds whole blocks.
        Blocks that share a write chunk are written by one task in one TensorStore
        transaction, without gathering them into one array.
    spec : dict
        What :func:`create_array` returned.
    write_chunks : sequence of int
        The array's write unit (:attr:`ArrayLayout.write_chunks`).

    Returns
    -------
    dask.array.Array
        One int64 per write task (voxels written); computing it performs the writes.

    Raises
    ------
    ValueError
        When along some axis blocks neither cover whole write chunks nor lie within one.
    """
    edges = _task_edges(arr.chunks, write_chunks)
    if isinstance(edges, int):
        raise ValueError(
            f"Dask blocks along axis {edges} ({arr.chunks[edges]}) neither cover whole write "
            f"chunks of {write_chunks[edges]} nor lie within them: two tasks would write the "
            "same stored object"
        )
    block_edges = [np.concatenate([[0], np.cumsum(sizes)]) for sizes in arr.chunks]
    name = f"write-{spec.get('token', uuid.uuid4().hex)}"
    # Per axis: the index of the block each task edge starts (task i holds blocks
    # first[i] up to first[i + 1]).
    first = [np.searchsorted(b, e) for e, b in zip(edges, block_edges, strict=True)]
    layer = {}
    for index in np.ndindex(*(len(f) - 1 for f in first)):
        ranges = [range(f[i], f[i + 1]) for f, i in zip(first, index, strict=True)]
        blocks = [
            tuple(r[k] for r, k in zip(ranges, key, strict=True))
            for key in np.ndindex(*(len(r) for r in ranges))
        ]
        origins = [tuple(int(block_edges[a][b]) for a, b in enumerate(bl)) for bl in blocks]
        layer[(name, *index)] = (_write_unit, spec, origins,
                                 *[(arr.name, *bl) for bl in blocks])  # fmt: skip
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[arr])
    chunks = tuple((1,) * (len(f) - 1) for f in first)
    meta = np.empty((0,) * arr.ndim, dtype=np.int64)
    return da.Array(graph, name, chunks=chunks, dtype=np.int64, meta=meta)


_ENCODING_FREE = ("attributes", "dimension_names", "storage_transformers")


def _array_document(loc: Location) -> dict[str, Any] | None:
    doc = loc.read_json("zarr.json") or loc.read_json(".zarray")
    if doc is None:
        return None
    return {k: v for k, v in doc.items() if k not in _ENCODING_FREE or v not in ([], None)}


def _copy_object(source: Location, target: Location, key: str) -> int:
    src, dst = source.child(key), target.child(key)
    if src.scheme == dst.scheme == "file":
        os.makedirs(os.path.dirname(dst.path), exist_ok=True)
        shutil.copyfile(src.path, dst.path)
        return os.path.getsize(dst.path)
    data = source.read_bytes(key) or b""
    target.write_bytes(key, data)
    return len(data)


def copy_stored_chunks(source: str | Location, target: str | Location) -> list[Delayed] | None:
    """Byte copies of every stored chunk of one array into another encoded the same way.

    When two arrays have the same shape, data type, chunk grid, chunk keys, codecs and fill
    value, their stored objects are interchangeable: copying them is exact and much cheaper
    than decoding and encoding again.

    Parameters
    ----------
    source, target : str or Location
        Array locations; `target` must already exist (:func:`create_array`).

    Returns
    -------
    list of dask.delayed.Delayed or None
        One copy per stored object (bytes copied), or None when the encodings differ (or
        either array is missing) and the data must be rewritten.
    """
    src, dst = Location.parse(source), Location.parse(target)
    src_doc = _array_document(src)
    if src_doc is None or src_doc != _array_document(dst):
        return None
    keys = [k for k in src.list_sizes() if os.path.basename(k) not in ("zarr.json", ".zarray",
            ".zattrs")]  # fmt: skip
    return [dask.delayed(_copy_object, pure=True)(src, dst, key) for key in sorted(keys)]


def provenance(
    stage: str,
    method: str | None,
    parameters: dict[str, Any],
    source: ImageRef | None,
) -> dict[str, Any]:
    """The provenance record voxflow stores in every output's attributes.

    Parameters
    ----------
    stage : str
        Pipeline stage (``"pyramid"``, ...).
    method : str or None
        Method of the stage.
    parameters : dict
        JSON-serialisable parameters.
    source : ImageRef or None
        The input image.

    Returns
    -------
    dict
        Version, stage, method, parameters, input location and fingerprint, and time.
    """
    return {
        "version": package_version(),
        "stage": stage,
        "method": method,
        "parameters": json.loads(json.dumps(parameters, default=str)),
        "input": None if source is None else {"url": source.url, "fingerprint": source.fingerprint},
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


@cache
def package_version() -> str:
    """The installed voxflow's version (read once: the package metadata is slow to parse)."""
    return _distribution_version("voxflow")


def _window_sample(loc: Location, multiscale: Multiscale, ngff_version: str) -> np.ndarray:
    """The coarsest level of the image at `loc`, strided to a few million voxels a channel."""
    path = multiscale.datasets[-1].path
    driver = "zarr3" if ngff_version == "0.5" else "zarr"
    store = ts.open(
        {"driver": driver, "kvstore": loc.kvstore_spec(path), "open": True},
        context=tensorstore_context(),
    ).result()
    steps = sample_steps(store.shape, multiscale.dims)
    return store[tuple(slice(None, None, s) for s in steps)].read().result()


def write_image_metadata(
    location: str | Location,
    multiscale: Multiscale,
    *,
    ngff_version: str = "0.5",
    omero: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    image_label: dict[str, Any] | None = None,
    fit_windows: bool = False,
) -> None:
    """Write the group metadata that makes the arrays an OME-Zarr image; call it last.

    Parameters
    ----------
    location : str or Location
        The image group.
    multiscale : Multiscale
        Axes and levels.
    ngff_version : {"0.5", "0.4"}, optional
        0.5 writes ``zarr.json`` (zarr v3), 0.4 writes ``.zattrs`` and then ``.zgroup``.
    omero : dict, optional
        Channel metadata.
    provenance : dict, optional
        Stored under the ``"voxflow"`` attribute.
    image_label : dict, optional
        Marks a label image (``{"source": {"image": "../../"}}``).
    fit_windows : bool, optional
        Take the display window of every channel of `omero` from the written voxels (the
        coarsest level, sampled; see :func:`voxflow.io.omero.fit_windows`) instead of
        keeping it: for an image whose intensities or dtype differ from those the windows
        were made for.
    """
    loc = Location.parse(location)
    if fit_windows and omero and omero.get("channels"):
        omero = _fit_windows(omero, _window_sample(loc, multiscale, ngff_version), multiscale.dims)
    extra = {"voxflow": provenance} if provenance else None
    attrs = group_attributes(
        multiscale, ngff_version=ngff_version, omero=omero, image_label=image_label, extra=extra
    )
    if ngff_version == "0.5":
        loc.write_json("zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})
    else:
        loc.write_json(".zattrs", attrs)
        loc.write_json(".zgroup", {"zarr_format": 2})


def write_image(
    location: str | Location,
    data: np.ndarray | da.Array,
    dims: Sequence[str],
    scale: Sequence[float],
    *,
    translation: Sequence[float] | None = None,
    units: Sequence[str | None] | None = None,
    name: str | None = None,
    omero: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    image_label: dict[str, Any] | None = None,
    ngff_version: str = "0.5",
    chunks: int | Sequence[int] | None = None,
    shards: int | Sequence[int] | None = None,
    compressor: Compressor = "zstd",
    clevel: int = DEFAULT_CLEVEL,
) -> None:
    """Write an array as a single-level OME-Zarr image (arrays first, metadata last).

    Parameters
    ----------
    location : str or Location
        The new image group. Its level array is replaced; anything else below it (label
        images, say) is kept, so clear an old output first (:func:`check_output`,
        :func:`clear_output`).
    data : numpy.ndarray or dask.array.Array
        Voxels, shape matching `dims`.
    dims : sequence of str
        Axis names in OME-NGFF order.
    scale : sequence of float
        Voxel size per axis.
    translation : sequence of float, optional
        Physical centre of voxel 0 (zeros by default).
    units : sequence of str or None, optional
        Unit per axis (micrometre for space, second for time by default).
    name : str, optional
        Image name.
    omero, provenance, image_label : dict, optional
        Metadata blocks, see :func:`write_image_metadata`.
    ngff_version : {"0.5", "0.4"}, optional
        Output version.
    chunks, shards : int or sequence of int, optional
        Storage layout, see :func:`derive_layout`.
    compressor : {"zstd", "lz4", "gzip", "none"}, optional
        Codec.
    clevel : int, optional
        Compression level.
    """
    dims = validate_dims(dims)
    if len(dims) != data.ndim or len(scale) != data.ndim:
        raise ValueError(
            f"`dims` {''.join(dims)!r} and `scale` {tuple(scale)} need one entry per axis of "
            f"the data ({data.ndim})"
        )
    loc = Location.parse(location)
    layout = derive_layout(
        data.shape, dims, ngff_version=ngff_version, chunks=chunks, shards=shards
    )
    spec = create_array(
        loc, "0", shape=data.shape, dtype=data.dtype, dims=dims, layout=layout,
        zarr_format=3 if ngff_version == "0.5" else 2, compressor=compressor, clevel=clevel,
    )  # fmt: skip
    arr = data if isinstance(data, da.Array) else da.from_array(data, chunks=layout.write_chunks)
    write_blocks(writable(arr, layout.write_chunks), spec, layout.write_chunks).compute()
    units = units or [None] * len(dims)
    axes = tuple(axis_from_name(n, u) for n, u in zip(dims, units, strict=True))
    dataset = Dataset(
        "0", tuple(map(float, scale)), tuple(map(float, translation or [0] * len(dims)))
    )
    write_image_metadata(
        loc, Multiscale(axes, (dataset,), name=name), ngff_version=ngff_version, omero=omero,
        provenance=provenance, image_label=image_label,
    )  # fmt: skip


def write_group(
    location: str | Location, ngff_version: str = "0.5", ome: dict[str, Any] | None = None
) -> None:
    """Write the metadata of a plain group (one that holds images, such as ``labels``).

    Parameters
    ----------
    location : str or Location
        The group.
    ngff_version : {"0.5", "0.4"}, optional
        Zarr v3 ``zarr.json`` for 0.5, ``.zgroup``/``.zattrs`` for 0.4.
    ome : dict, optional
        NGFF attributes of the group (``{"labels": [...]}``, say); under ``ome`` for 0.5.
    """
    loc = Location.parse(location)
    if ngff_version == "0.5":
        attrs = {"ome": {"version": "0.5", **ome}} if ome else {}
        loc.write_json("zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})
    else:
        if ome:
            loc.write_json(".zattrs", dict(ome))
        loc.write_json(".zgroup", {"zarr_format": 2})


# Objects at the root of something voxflow may replace: a zarr node, or an unfinished output.
_REPLACEABLE_KEYS = (*_GROUP_KEYS, ".zarray", INCOMPLETE_MARKER)


def replaceable(output: str | Location, markers: Sequence[str] = ()) -> bool:
    """Whether `output` may be deleted to make room: absent, empty, or a zarr node or output.

    Parameters
    ----------
    output : str or Location
        An existing (or absent) location.
    markers : sequence of str, optional
        More root objects that identify an output of the caller's own kind (a run manifest).

    Returns
    -------
    bool
        False for anything else (a folder of other files, a plain file), which voxflow never
        deletes, whatever ``--overwrite`` says.
    """
    out = Location.parse(output)
    if any(out.exists(key) for key in (*_REPLACEABLE_KEYS, *markers)):
        return True
    return not out.holds_objects()


def check_output(
    output: str | Location,
    inputs: Sequence[str | Location],
    *,
    overwrite: bool = False,
    markers: Sequence[str] = (),
) -> Location:
    """Refuse an output that would touch an input or replace data without permission.

    Parameters
    ----------
    output : str or Location
        Where the result would go.
    inputs : sequence of str or Location
        Locations that must stay untouched.
    overwrite : bool, optional
        Whether an existing output may be replaced.
    markers : sequence of str, optional
        As for :func:`replaceable`.

    Returns
    -------
    Location
        The parsed output location. Nothing is written.

    Raises
    ------
    ValueError
        When the output is an input, lies inside one, or contains one.
    FileExistsError
        When the output exists and `overwrite` is false, or it holds something that is not
        a zarr node or a voxflow output (see :func:`replaceable`), which is never replaced.
    """
    out = Location.parse(output)
    for item in inputs:
        src = Location.parse(item)
        if src.contains(out) or out.contains(src):
            where = "is" if src == out else "lies inside" if src.contains(out) else "contains"
            raise ValueError(f"output {out.url} {where} the input {src.url}; choose another path")
    if out.scheme == "file":
        _check_local_parent(Path(out.path))
    if not out.exists():
        return out
    if not overwrite:
        raise FileExistsError(f"output {out.url} already exists; pass --overwrite to replace it")
    if not replaceable(out, markers):
        raise FileExistsError(
            f"output {out.url} holds data that is neither a zarr hierarchy nor a voxflow "
            "output; voxflow does not delete it, even with --overwrite: choose another path"
        )
    return out


def _check_local_parent(path: Path) -> None:
    """Refuse a local output whose nearest existing ancestor is a file or is not writable."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"output {path} lies below {parent}, which is a file, not a folder")
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output {path} cannot be created: {parent} is not writable")


def clear_output(output: str | Location) -> None:
    """Remove an earlier output, group metadata first so it never looks complete meanwhile."""
    out = Location.parse(output)
    for key in _GROUP_KEYS:
        out.delete(key)
    out.delete()

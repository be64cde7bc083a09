"""Open OME-Zarr images (NGFF 0.4 and 0.5) and plain zarr arrays, and read levels lazily."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from typing import Any

import dask.array as da
import numpy as np
import tensorstore as ts

from voxflow.core.axes import default_axes
from voxflow.io.location import INCOMPLETE_MARKER, Location, tensorstore_context
from voxflow.io.ngff import Multiscale, parse_group_attributes, parse_image_label
from voxflow.io.ref import ImageRef, LevelRef

__all__ = [
    "SUPPORTED_DTYPES",
    "NotAnImageError",
    "PlainArrayWarning",
    "array_spec",
    "fingerprint",
    "open_image",
    "open_store",
    "read_level",
]

SUPPORTED_DTYPES = (
    "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float32", "float64",
)  # fmt: skip


_SAMPLE_BYTES = 64 * 1024


class NotAnImageError(ValueError):
    """The location exists but holds no zarr image."""


class PlainArrayWarning(UserWarning):
    """A plain zarr array without NGFF metadata was opened with assumed axes and unit scale.

    Issued once per array and process: checking a run and then running it opens the input
    twice, and the second time tells nothing new.
    """


_WARNED_PLAIN: set[str] = set()


def _array_meta(loc: Location, path: str) -> tuple[int, dict[str, Any]]:
    node = loc.child(path)
    doc = node.read_json("zarr.json")
    if doc is not None and doc.get("node_type") == "array":
        return 3, doc
    doc = node.read_json(".zarray")
    if doc is not None:
        return 2, doc
    raise NotAnImageError(f"{node.url} is listed as a level but holds no zarr array")


def _level_layout(fmt: int, meta: dict[str, Any]) -> tuple[str, tuple, tuple, tuple | None]:
    shape = tuple(int(n) for n in meta["shape"])
    if fmt == 2:
        return np.dtype(meta["dtype"]).name, shape, tuple(meta["chunks"]), None
    grid = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    inner, shards = grid, None
    for codec in meta.get("codecs", []):
        if codec.get("name") == "sharding_indexed":
            inner, shards = tuple(codec["configuration"]["chunk_shape"]), grid
    return np.dtype(meta["data_type"]).name, shape, inner, shards


def _check_dtype(dtype: str, url: str) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise NotAnImageError(
            f"{url} has voxels of dtype {dtype}; supported: {', '.join(SUPPORTED_DTYPES)}"
        )


def open_image(url: str | os.PathLike[str] | Location) -> ImageRef:
    """Describe the image at `url` without reading its voxels.

    Parameters
    ----------
    url : str, path-like or Location
        An OME-Zarr image group (NGFF 0.4 on zarr v2, 0.5 on zarr v3) or a plain zarr array.
        A plain array is taken as a single level with unit scale and axes derived from its
        number of dimensions (``yx``, ``zyx``, ``czyx``, ``tczyx``), with a
        :class:`PlainArrayWarning` (the first time the process opens it).

    Returns
    -------
    ImageRef
        Levels with shapes, scales, translations, chunks and shards; axes and units; dtype;
        omero, image-label and provenance metadata; the content fingerprint of level 0.

    Raises
    ------
    FileNotFoundError
        When nothing exists at `url`.
    NotAnImageError
        When the location is not zarr, is a group without multiscales, or has an unsupported
        dtype or number of dimensions.
    """
    loc = Location.parse(url)
    root = loc.read_json("zarr.json")
    if root is not None and root.get("node_type") == "array":
        return _open_plain(loc, 3, root)
    v2_array = loc.read_json(".zarray")
    if v2_array is not None:
        return _open_plain(loc, 2, v2_array)
    if root is not None:
        attrs, fmt = root.get("attributes") or {}, 3
    else:
        attrs, fmt = loc.read_json(".zattrs"), 2
        # .zgroup is written last: without it a v2 image is incomplete.
        if loc.read_json(".zgroup") is None:
            if not loc.exists():
                raise FileNotFoundError(f"no such image: {loc.url}")
            if loc.exists(INCOMPLETE_MARKER):
                raise NotAnImageError(
                    f"{loc.url} is an unfinished output (its run stopped before the end): run "
                    "the same command again to finish it"
                )
            raise NotAnImageError(f"{loc.url} is not a zarr array or group")
    try:
        meta, omero = parse_group_attributes(attrs or {}, zarr_format=fmt)
        label = parse_image_label(attrs or {}, zarr_format=fmt)
    except ValueError as err:
        raise NotAnImageError(f"{loc.url}: {err}") from None
    return _open_multiscale(loc, fmt, meta, omero, label, attrs or {})


def _open_plain(loc: Location, fmt: int, meta: dict[str, Any]) -> ImageRef:
    dtype, shape, chunks, shards = _level_layout(fmt, meta)
    _check_dtype(dtype, loc.url)
    try:
        axes = default_axes(len(shape))
    except ValueError as err:
        raise NotAnImageError(f"{loc.url}: {err}") from None
    if loc.url not in _WARNED_PLAIN:
        warnings.warn(
            f"{loc.url} is a plain zarr array without OME-NGFF metadata: taken as one level "
            f"with axes {''.join(a.name for a in axes)} and unit scale",
            PlainArrayWarning,
            stacklevel=3,
        )
        _WARNED_PLAIN.add(loc.url)
    level = LevelRef(
        path="", shape=shape, scale=(1.0,) * len(shape), translation=(0.0,) * len(shape),
        chunks=chunks, shards=shards,
    )  # fmt: skip
    return ImageRef(
        url=loc.url, ngff_version=None, zarr_format=fmt, dims=tuple(a.name for a in axes),
        axis_types=tuple(str(a.type) for a in axes), units=tuple(a.unit for a in axes),
        dtype=dtype, levels=(level,), fingerprint=fingerprint(loc, [""]),
    )  # fmt: skip


def _open_multiscale(
    loc: Location, fmt: int, meta: Multiscale, omero: dict, label: dict | None, attrs: dict
) -> ImageRef:
    levels, dtype = [], None
    for ds in meta.datasets:
        afmt, ameta = _array_meta(loc, ds.path)
        ldtype, shape, chunks, shards = _level_layout(afmt, ameta)
        if len(shape) != len(meta.axes):
            raise NotAnImageError(
                f"{loc.child(ds.path).url} has {len(shape)} dimensions but the metadata lists "
                f"{len(meta.axes)} axes"
            )
        dtype = dtype or ldtype
        levels.append(
            LevelRef(path=ds.path, shape=shape, scale=ds.scale, translation=ds.translation,
                     chunks=chunks, shards=shards)
        )  # fmt: skip
    _check_dtype(dtype, loc.url)
    version = "0.5" if fmt == 3 else "0.4"
    axis_types = tuple(str(a.type) for a in meta.axes)
    units = tuple(a.unit for a in meta.axes)
    # What gives level 0's voxels their meaning is part of the input: a new voxel size must
    # not be served the results of the old one.
    described = {
        "axes": [meta.dims, axis_types, units], "scale": levels[0].scale,
        "translation": levels[0].translation, "name": meta.name, "omero": omero or None,
        "image_label": label,
    }  # fmt: skip
    return ImageRef(
        url=loc.url, ngff_version=version, zarr_format=fmt, dims=meta.dims,
        axis_types=axis_types, units=units, dtype=dtype, levels=tuple(levels),
        fingerprint=_with_metadata(fingerprint(loc, [meta.datasets[0].path]), described),
        name=meta.name, method=meta.type, omero=omero or None, image_label=label,
        provenance=attrs.get("voxflow"),
    )  # fmt: skip


def _with_metadata(data: str, metadata: dict[str, Any]) -> str:
    """The fingerprint of level 0's stored `data` and of the group `metadata` that places it."""
    blob = json.dumps(metadata, sort_keys=True, default=str)
    return hashlib.blake2b(f"{data}|{blob}".encode(), digest_size=16).hexdigest()


def fingerprint(url: str | Location, paths: list[str], *, samples: int = 3) -> str:
    """Content fingerprint of the arrays at `paths` below `url`.

    The digest covers each array's metadata document, the name and byte size of every stored
    chunk (or shard), and the first and last 64 KiB of up to `samples` stored objects
    (first, middle, last; for a shard the tail is its index of chunk offsets and sizes), so
    it is cheap on hundreds of GB yet changes when data are rewritten (a same-size rewrite
    of an unsampled region is the blind spot). It does not
    depend on the location, so copies of the same data share it.

    Parameters
    ----------
    url : str or Location
        The image (or plain array) location.
    paths : list of str
        Array paths relative to `url` ('' for the location itself).
    samples : int, optional
        How many stored chunks are hashed in full per array.

    Returns
    -------
    str
        Hex digest (BLAKE2b, 128 bits).
    """
    loc = Location.parse(url)
    h = hashlib.blake2b(digest_size=16)
    for path in paths:
        node = loc.child(path)
        sizes = node.list_sizes()
        for key in sorted(sizes):
            h.update(f"{key}\0{sizes[key]}\n".encode())
        meta_keys = [k for k in ("zarr.json", ".zarray") if k in sizes]
        data_keys = sorted(k for k in sizes if not os.path.basename(k).startswith("."))
        data_keys = [k for k in data_keys if k not in meta_keys]
        picks = {0, len(data_keys) // 2, len(data_keys) - 1} if data_keys else set()
        for key in meta_keys:
            h.update(node.read_bytes(key) or b"")
        for key in [data_keys[i] for i in sorted(picks)][:samples]:
            h.update(node.read_ends(key, _SAMPLE_BYTES) or b"")
    return h.hexdigest()


def array_spec(ref: ImageRef, level: int = 0) -> dict[str, Any]:
    """TensorStore spec that opens one level of `ref` for reading."""
    loc = Location.parse(ref.url)
    driver = "zarr3" if ref.zarr_format == 3 else "zarr"
    return {"driver": driver, "kvstore": loc.kvstore_spec(ref.levels[level].path), "open": True}


class TensorStoreSource:
    """A lazily opened TensorStore array that Dask can slice and pickle.

    Only the spec travels to workers; each process opens the store once.
    """

    def __init__(self, spec: dict[str, Any], shape: tuple[int, ...], dtype: str, token: str):
        self.spec, self.shape, self.dtype = spec, tuple(shape), np.dtype(dtype)
        self.ndim, self.token = len(self.shape), token
        self._key = json.dumps(spec, sort_keys=True)  # open_store's cache key, made once

    def __getitem__(self, index: Any) -> np.ndarray:
        store = open_store(self._key, self.token)[index]
        # Into an array NumPy allocates (on huge pages where the system offers them): a
        # buffer TensorStore allocates is faulted in 4 KiB page by page, which costs about
        # as much system time as decoding it.
        out = np.empty(store.shape, self.dtype)
        ts.array(out, copy=False, write=True).write(store).result()
        return out

    def __reduce__(self):
        return (type(self), (self.spec, self.shape, self.dtype.name, self.token))


@functools.lru_cache(maxsize=256)
def open_store(spec_json: str, token: str = "") -> ts.TensorStore:
    """Open (once per process) the TensorStore described by `spec_json`.

    `token` tells apart arrays re-created at the same path (the fingerprint for reads, a
    per-creation id for writes), so a cached handle never carries stale metadata.
    """
    return ts.open(json.loads(spec_json), context=tensorstore_context()).result()


def read_level(
    ref: ImageRef, level: int = 0, *, chunks: tuple[int, ...] | str | None = None
) -> da.Array:
    """One level of an image as a lazy Dask array read through TensorStore.

    Parameters
    ----------
    ref : ImageRef
        The image.
    level : int, optional
        Level index, 0 is full resolution.
    chunks : tuple of int or "auto", optional
        Dask chunk shape. None reads whole write chunks (shards, or chunks when unsharded), the
        unit a store decodes most efficiently.

    Returns
    -------
    dask.array.Array
        The voxels, with the level's dtype and shape.

    Raises
    ------
    IndexError
        When `level` does not exist.
    """
    if not -len(ref.levels) <= level < len(ref.levels):
        raise IndexError(f"`level` {level} out of range: the image has {len(ref.levels)} levels")
    lvl = ref.levels[level]
    source = TensorStoreSource(array_spec(ref, level), lvl.shape, ref.dtype, ref.fingerprint)
    token = hashlib.blake2b(
        f"{ref.fingerprint}{ref.url}{lvl.path}{chunks}".encode(), digest_size=8
    ).hexdigest()
    return da.from_array(
        source,
        chunks=chunks or lvl.write_chunks,
        name=f"read-{os.path.basename(ref.url.rstrip('/'))}-{lvl.path or 'array'}-{token}",
        asarray=False,
        fancy=False,
        meta=np.empty((0,) * len(lvl.shape), dtype=ref.dtype),
    )

"""Shared fixtures of the io tests: unique in-memory locations and a small image writer."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import dask.array as da
import numpy as np
import pytest

from voxflow.core.axes import axis_from_name
from voxflow.io import (
    Dataset,
    Multiscale,
    create_array,
    derive_layout,
    write_blocks,
    write_image_metadata,
)


def _random_array(shape, dtype, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.random(shape) < 0.3
    if dt.kind == "f":
        return (rng.standard_normal(shape) * 100).astype(dt)
    info = np.iinfo(dt)
    low, high = max(int(info.min), -1000), min(int(info.max), 60000)
    return rng.integers(low, high, shape, endpoint=True).astype(dt)


@pytest.fixture
def random_array() -> Callable[..., np.ndarray]:
    """``random_array(shape, dtype, seed=0)``: seeded voxels over a useful part of the range."""
    return _random_array


@pytest.fixture
def omero() -> dict:
    """An omero block that satisfies the OME-NGFF schema (colour and window per channel)."""
    return {
        "channels": [
            {
                "label": "dapi",
                "color": "00FF00",
                "active": True,
                "window": {"min": 0.0, "max": 255.0, "start": 1.0, "end": 200.0},
            }
        ],
        "rdefs": {"model": "color"},
    }


@pytest.fixture
def memory_url() -> str:
    """A memory location that no other test uses."""
    return f"memory://test-{uuid.uuid4().hex}/image.zarr"


@pytest.fixture
def make_image() -> Callable[..., list[np.ndarray]]:
    """Write a small multiscale image the way voxflow stages do; returns the level arrays.

    Level ``i`` is ``data[..., ::2**i, ::2**i]`` (stride sampling on y and x), so its voxel 0 is
    the voxel 0 of level 0: the y and x scales double and the translation stays.
    """

    def _make(
        location,
        data: np.ndarray,
        dims: str,
        *,
        ngff_version: str = "0.5",
        chunks=None,
        shards=None,
        compressor: str = "zstd",
        scale: tuple[float, ...] | None = None,
        translation: tuple[float, ...] | None = None,
        n_levels: int = 2,
        omero: dict | None = None,
        provenance: dict | None = None,
        name: str | None = "image",
        metadata: bool = True,
    ) -> list[np.ndarray]:
        ndim = data.ndim
        scale = scale or (1.0,) * ndim
        translation = translation or (0.0,) * ndim
        levels, datasets = [], []
        for i in range(n_levels):
            step = 2**i
            level = data[..., ::step, ::step]
            layout = derive_layout(
                level.shape, dims, ngff_version=ngff_version, chunks=chunks, shards=shards
            )
            spec = create_array(
                location,
                str(i),
                shape=level.shape,
                dtype=level.dtype,
                dims=dims,
                layout=layout,
                zarr_format=3 if ngff_version == "0.5" else 2,
                compressor=compressor,
            )
            blocks = da.from_array(level, chunks=3).rechunk(layout.write_chunks)
            counts = write_blocks(blocks, spec, layout.write_chunks).compute()
            assert counts.sum() == level.size
            level_scale = tuple(
                s * step if n in "yx" else s for s, n in zip(scale, dims, strict=True)
            )
            datasets.append(Dataset(str(i), level_scale, tuple(translation)))
            levels.append(level)
        if metadata:
            multiscale = Multiscale(
                tuple(axis_from_name(n) for n in dims),
                tuple(datasets),
                name=name,
                type="stride",
                metadata={"method": "numpy slicing"},
            )
            write_image_metadata(
                location,
                multiscale,
                ngff_version=ngff_version,
                omero=omero,
                provenance=provenance,
            )
        return levels

    return _make

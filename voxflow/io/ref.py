"""`ImageRef`: the small, JSON-serialisable description of an image that tasks pass around."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from voxflow.core.axes import Axis, AxisType

__all__ = ["ImageRef", "LevelRef"]


class LevelRef(BaseModel):
    """One resolution level of an image."""

    model_config = ConfigDict(frozen=True)

    path: str = Field(description="Array path relative to the image ('' for a plain array).")
    shape: tuple[int, ...] = Field(description="Array shape in voxels.")
    scale: tuple[float, ...] = Field(description="Voxel size per axis, in the axis units.")
    translation: tuple[float, ...] = Field(description="Physical centre of voxel 0 per axis.")
    chunks: tuple[int, ...] = Field(description="Read chunk (inner chunk for sharded arrays).")
    shards: tuple[int, ...] | None = Field(
        default=None, description="Shard shape (zarr v3 sharding), None when unsharded."
    )

    @property
    def write_chunks(self) -> tuple[int, ...]:
        """The unit of independent writes: the shard, or the chunk when unsharded."""
        return self.shards or self.chunks


class ImageRef(BaseModel):
    """Where an image is and what it holds, without its voxels.

    Hashable and cheap to persist; the fingerprint identifies the content, so two copies of the
    same data at different locations share it.
    """

    model_config = ConfigDict(frozen=True)

    url: str = Field(description="Location of the image group (or plain array).")
    ngff_version: Literal["0.4", "0.5"] | None = Field(
        description="OME-NGFF version, None for a plain zarr array without NGFF metadata."
    )
    zarr_format: Literal[2, 3] = Field(description="Zarr format of the arrays.")
    dims: tuple[str, ...] = Field(description="Axis names in storage order.")
    axis_types: tuple[str, ...] = Field(description="space, channel or time per axis.")
    units: tuple[str | None, ...] = Field(description="Physical unit per axis.")
    dtype: str = Field(description="NumPy dtype name of the voxels.")
    levels: tuple[LevelRef, ...] = Field(description="Resolution levels, finest first.")
    fingerprint: str = Field(
        description="Content fingerprint: level 0's stored chunks and array metadata, and the "
        "group metadata that gives them meaning (axes, units, scale, translation, omero)."
    )
    name: str | None = Field(default=None, description="Image name.")
    method: str | None = Field(default=None, description="Downsampling method of the levels.")
    omero: dict[str, Any] | None = Field(default=None, description="Channel metadata.")
    image_label: dict[str, Any] | None = Field(
        default=None,
        description=(
            "The `image-label` block of a label image (colors, properties, source), None for "
            "an image that is not one."
        ),
    )
    provenance: dict[str, Any] | None = Field(
        default=None, description="What made this image (voxflow outputs only)."
    )

    def __hash__(self) -> int:
        return hash((self.url, self.fingerprint))

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of level 0."""
        return self.levels[0].shape

    @property
    def scale(self) -> tuple[float, ...]:
        """Voxel size of level 0."""
        return self.levels[0].scale

    @property
    def translation(self) -> tuple[float, ...]:
        """Translation of level 0."""
        return self.levels[0].translation

    @property
    def axes(self) -> tuple[Axis, ...]:
        """The axes as core objects."""
        return tuple(
            Axis(n, AxisType(t), u)
            for n, t, u in zip(self.dims, self.axis_types, self.units, strict=True)
        )

    @property
    def is_plain(self) -> bool:
        """Whether this is a bare zarr array without NGFF metadata."""
        return self.ngff_version is None

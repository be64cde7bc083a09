"""OME-NGFF multiscale image metadata, versions 0.4 (zarr v2) and 0.5 (zarr v3).

Frozen dataclasses that mirror the specification, parsers that accept both versions and a
builder that writes either. Arrays are not touched here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from voxflow.core.axes import Axis, AxisType, validate_dims
from voxflow.io.location import Location

__all__ = [
    "NGFF_VERSIONS",
    "Dataset",
    "Multiscale",
    "group_attributes",
    "parse_group_attributes",
    "parse_image_label",
    "relocate_image_label",
]

NGFF_VERSIONS = ("0.4", "0.5")


@dataclass(frozen=True)
class Dataset:
    """One resolution level: its array path and its transform to physical space.

    Parameters
    ----------
    path : str
        Path of the level's array relative to the image group.
    scale : tuple of float
        Voxel size per axis, in the axis unit.
    translation : tuple of float
        Physical position of the centre of voxel 0 per axis.
    """

    path: str
    scale: tuple[float, ...]
    translation: tuple[float, ...]


@dataclass(frozen=True)
class Multiscale:
    """A multiscale image: axes, levels (finest first) and how they were made.

    Parameters
    ----------
    axes : tuple of Axis
        Axes in storage order.
    datasets : tuple of Dataset
        Levels, finest first.
    name : str or None
        Image name.
    type : str or None
        Downsampling method that made the levels (``"mean"``, ``"mode"``, ...).
    metadata : dict
        Free-form description of the method (voxflow records its function and parameters).
    """

    axes: tuple[Axis, ...]
    datasets: tuple[Dataset, ...]
    name: str | None = None
    type: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def dims(self) -> tuple[str, ...]:
        """Axis names in storage order."""
        return tuple(a.name for a in self.axes)


def _transforms(entry: dict[str, Any], ndim: int, where: str) -> tuple[list[float], list[float]]:
    scale, translation = [1.0] * ndim, [0.0] * ndim
    for t in entry.get("coordinateTransformations") or []:
        kind = t.get("type")
        values = t.get(kind) if kind in ("scale", "translation") else None
        if kind == "identity":
            continue
        if values is None or len(values) != ndim:
            raise ValueError(
                f"{where}: coordinate transformation {t!r} needs {ndim} inline values "
                "(one per axis)"
            )
        if kind == "scale":
            scale = [float(v) for v in values]
        else:
            translation = [float(v) for v in values]
    return scale, translation


def _parse_axes(raw: Sequence[Any]) -> tuple[Axis, ...]:
    axes = []
    for item in raw:
        if isinstance(item, str):  # NGFF 0.3 style names only
            item = {"name": item}
        name = item.get("name")
        kind = item.get("type") or {"t": "time", "c": "channel"}.get(name, "space")
        axes.append(Axis(name, AxisType(kind), item.get("unit")))
    validate_dims([a.name for a in axes])
    return tuple(axes)


def _ome_block(attrs: dict[str, Any], zarr_format: int) -> dict[str, Any]:
    """Where a group keeps its OME-NGFF keys: under ``ome`` in 0.5 (zarr v3), at the top in 0.4."""
    return attrs.get("ome", attrs) if zarr_format == 3 else attrs


def parse_group_attributes(attrs: dict[str, Any], *, zarr_format: int) -> tuple[Multiscale, dict]:
    """Read the first multiscale image and the omero block from group attributes.

    Parameters
    ----------
    attrs : dict
        The group's attributes (``.zattrs`` for zarr v2, ``attributes`` of ``zarr.json`` for v3).
    zarr_format : int
        2 or 3.

    Returns
    -------
    multiscale : Multiscale
        Axes and levels, with any multiscale-wide transform folded into each level.
    omero : dict
        The ``omero`` block (channel names, colours, windows), empty when absent.

    Raises
    ------
    ValueError
        When the attributes hold no multiscales, or axes or transforms are malformed.
    """
    ome = _ome_block(attrs, zarr_format)
    multiscales = ome.get("multiscales")
    if not multiscales:
        raise ValueError("the group has no OME-NGFF `multiscales` metadata")
    ms = multiscales[0]
    axes = _parse_axes(ms.get("axes") or [])
    ndim = len(axes)
    g_scale, g_trans = _transforms(ms, ndim, "multiscales")
    datasets = []
    for ds in ms.get("datasets") or []:
        scale, trans = _transforms(ds, ndim, f"dataset {ds.get('path')!r}")
        datasets.append(
            Dataset(
                path=str(ds["path"]),
                scale=tuple(s * g for s, g in zip(scale, g_scale, strict=True)),
                translation=tuple(
                    t * g + gt for t, g, gt in zip(trans, g_scale, g_trans, strict=True)
                ),
            )
        )
    if not datasets:
        raise ValueError("the multiscales metadata lists no datasets")
    meta = Multiscale(
        axes, tuple(datasets), ms.get("name"), ms.get("type"), ms.get("metadata") or {}
    )
    return meta, dict(ome.get("omero") or {})


def parse_image_label(attrs: dict[str, Any], *, zarr_format: int) -> dict[str, Any] | None:
    """Read the ``image-label`` block that marks a label image, if the group has one.

    Parameters
    ----------
    attrs : dict
        The group's attributes (``.zattrs`` for zarr v2, ``attributes`` of ``zarr.json`` for v3).
    zarr_format : int
        2 or 3.

    Returns
    -------
    dict or None
        The block (``colors``, ``properties``, ``source``, ...) without its NGFF 0.4
        ``version`` key, which :func:`group_attributes` writes for the output's version; None
        when the group is not a label image.

    Raises
    ------
    ValueError
        When ``image-label`` is present but is not a JSON object.
    """
    ome = _ome_block(attrs, zarr_format)
    block = ome.get("image-label")
    if block is None:
        return None
    if not isinstance(block, dict):
        raise ValueError(f"`image-label` must be a JSON object, got {block!r}")
    return {k: v for k, v in block.items() if k != "version"}


# Where a label image's source is when its `source` names no image: NGFF's default, the image
# whose `labels` group holds it.
_DEFAULT_LABEL_SOURCE = "../../"


def relocate_image_label(
    image_label: dict[str, Any] | None, source: str | Location, target: str | Location
) -> dict[str, Any] | None:
    """The ``image-label`` block of a copy, at `target`, of the label image at `source`.

    ``source.image`` is a reference from a label image to the image it labels, relative to the
    label image (``"../../"`` for one inside that image's ``labels`` group). The copy names the
    same image: by a relative path when both lie in one store (the local file system, one
    bucket), else by its URL. Colors, properties and every other key are kept as they are.

    Parameters
    ----------
    image_label : dict or None
        The block of the label image at `source`; None for an image that is not a label image.
    source, target : str or Location
        Where the label image is, and where its copy goes.

    Returns
    -------
    dict or None
        The block for `target`; None when `image_label` is None. A block without ``source``,
        or whose reference is a URL, an absolute path or leaves its store, is kept as it is.
    """
    if image_label is None:
        return None
    origin = image_label.get("source")
    if not isinstance(origin, dict):
        return dict(image_label)
    reference = origin.get("image", _DEFAULT_LABEL_SOURCE)
    if not isinstance(reference, str) or "://" in reference or reference.startswith("/"):
        return dict(image_label)
    src, dst = Location.parse(source), Location.parse(target)
    image = src.resolve(reference)
    if image is None or src == dst:
        return dict(image_label)
    return {**image_label, "source": {**origin, "image": dst.reference_to(image)}}


def _axis_json(axis: Axis) -> dict[str, Any]:
    out: dict[str, Any] = {"name": axis.name, "type": str(axis.type)}
    if axis.unit:
        out["unit"] = axis.unit
    return out


def group_attributes(
    multiscale: Multiscale,
    *,
    ngff_version: str = "0.5",
    omero: dict[str, Any] | None = None,
    image_label: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Group attributes of a multiscale image in the layout of `ngff_version`.

    Parameters
    ----------
    multiscale : Multiscale
        The image description.
    ngff_version : {"0.5", "0.4"}
        0.5 nests everything under ``"ome"`` (zarr v3); 0.4 puts ``multiscales`` at the top
        level with a version inside (zarr v2).
    omero : dict, optional
        Channel rendering metadata.
    image_label : dict, optional
        The ``image-label`` block that marks a label image (e.g. its source image).
    extra : dict, optional
        Other top-level attributes (voxflow's provenance goes under ``"voxflow"``).

    Returns
    -------
    dict
        JSON-serialisable attributes.

    Raises
    ------
    ValueError
        When `ngff_version` is not 0.4 or 0.5.
    """
    if ngff_version not in NGFF_VERSIONS:
        raise ValueError(f"`ngff_version` must be one of {NGFF_VERSIONS}, got {ngff_version!r}")
    ms: dict[str, Any] = {}
    if ngff_version == "0.4":
        ms["version"] = "0.4"
    if multiscale.name is not None:
        ms["name"] = multiscale.name
    ms["axes"] = [_axis_json(a) for a in multiscale.axes]
    ms["datasets"] = [
        {
            "path": d.path,
            "coordinateTransformations": [
                {"type": "scale", "scale": [float(v) for v in d.scale]},
                {"type": "translation", "translation": [float(v) for v in d.translation]},
            ],
        }
        for d in multiscale.datasets
    ]
    if multiscale.type is not None:
        ms["type"] = multiscale.type
    if multiscale.metadata:
        ms["metadata"] = multiscale.metadata
    body: dict[str, Any] = {"multiscales": [ms]}
    if omero:
        body["omero"] = omero
    if image_label is not None:
        body["image-label"] = (
            {"version": "0.4", **image_label} if ngff_version == "0.4" else image_label
        )
    attrs = {"ome": {"version": "0.5", **body}} if ngff_version == "0.5" else body
    return {**attrs, **(extra or {})}

"""The layers of a run folder for a viewer: the image and every intermediate, lazily read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from voxflow.tasks._run import RunFolder
from voxflow.tasks.segment import open_volume

__all__ = ["Layer", "run_layers", "show_layers"]

_AXES = ("z", "y", "x")


@dataclass(frozen=True)
class Layer:
    """One viewer layer: what it shows and where it sits in physical space (µm)."""

    name: str
    kind: Literal["image", "labels", "points"]
    data: Any
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    options: dict[str, Any] = field(default_factory=dict)


def _image_layer(name: str, url: str, kind: str, channel: int | None = None) -> Layer:
    vol = open_volume(url, channel)
    data = [vol.read(level) for level in range(len(vol.ref.levels))]
    options = {"multiscale": len(data) > 1}
    if kind == "image":
        options["blending"] = "additive"
    # In micrometres, as the centroids are, whatever unit the image's axes use.
    return Layer(name, kind, data if len(data) > 1 else data[0], vol.scale_um,
                 vol.translation_um, options)  # fmt: skip


def run_layers(run: str) -> list[Layer]:
    """The layers of a run: the input image, then every intermediate that exists.

    Masks and labels become label layers, the objects' centroids a points layer, and the
    count and density maps image layers, all placed by their physical scale and translation.

    Raises
    ------
    FileNotFoundError
        When `run` is not a run folder.
    """
    folder = RunFolder(run)
    manifest = folder.manifest()
    source = manifest["input"]
    layers = [_image_layer("image", source["url"], "image", source["channel"])]
    for name, kind in (("mask", "labels"), ("labels", "labels"), ("counts", "image"),
                       ("density", "image")):  # fmt: skip
        loc = folder.child(f"{name}.ome.zarr")
        if loc.exists("zarr.json") or loc.exists(".zattrs"):
            layers.append(_image_layer(name, loc.url, kind))
    if folder.loc.exists("objects.parquet"):
        table = folder.read_table("objects.parquet")
        points = table[[f"{a}_um" for a in _AXES]].to_numpy(np.float64).reshape(-1, 3)
        layers.append(Layer("centroids", "points", points, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                            {"size": 4, "face_color": "red"}))  # fmt: skip
    return layers


def show_layers(layers: list[Layer], *, viewer: Any = None) -> Any:
    """Add `layers` to a napari viewer (a new one when None) and return it.

    Raises
    ------
    ImportError
        When napari is not installed (``pip install 'voxflow[viewers]'``).
    """
    try:
        import napari
    except ImportError:
        raise ImportError("voxflow view needs napari: pip install 'voxflow[viewers]'") from None
    viewer = viewer or napari.Viewer(title="voxflow")
    add = {"image": viewer.add_image, "labels": viewer.add_labels, "points": viewer.add_points}
    for layer in layers:
        add[layer.kind](layer.data, name=layer.name, scale=layer.scale,
                        translate=layer.translate, **layer.options)  # fmt: skip
    return viewer

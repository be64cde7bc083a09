"""A quality-control picture: projections of a volume with detected objects and region densities.

Drawn on a :class:`matplotlib.figure.Figure` with an Agg canvas, never through pyplot, so it is
safe in worker threads and leaves no global figure state behind.
"""

from __future__ import annotations

import io
import numbers
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from voxflow.core.objects import _validate_points, _validate_vector

__all__ = ["qc_png"]

_DPI = 100
_PANEL_INCHES = (4.0, 4.5)  # width, height of one column of the figure
_PERCENTILES = (1.0, 99.8)
_MARKER = {"s": 14, "facecolors": "none", "edgecolors": "#ff3030", "linewidths": 1.0}
_REGION_COLUMNS = ("acronym", "density_per_mm3", "count")
_NOT_REGIONS = frozenset({"outside", "unlisted"})
# Projection along axis k shows the other two axes as (rows, columns).
_VIEWS = ((0, (1, 2)), (1, (0, 2)), (2, (0, 1)))
_AXIS_NAMES = "zyx"


def _validate_image(image: object) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"`image` must be a NumPy array, got {type(image).__name__}")
    if image.ndim != 3 or image.dtype.kind not in "iufb" or 0 in image.shape:
        raise ValueError(
            f"`image` must be a non-empty 3-D numeric array (z, y, x), got {image.ndim}-D "
            f"{image.dtype} {image.shape}"
        )
    return image


def _validate_regions(regions: object) -> pd.DataFrame | None:
    if regions is None:
        return None
    if not isinstance(regions, pd.DataFrame):
        raise TypeError(f"`regions` must be a pandas DataFrame, got {type(regions).__name__}")
    missing = [c for c in _REGION_COLUMNS if c not in regions.columns]
    if missing:
        raise ValueError(f"`regions` needs the columns {_REGION_COLUMNS}, missing {missing}")
    return regions


def _validate_top(top: object) -> int:
    if isinstance(top, bool) or not isinstance(top, numbers.Integral):
        raise TypeError(f"`top` must be an integer, got {type(top).__name__}")
    if top < 1:
        raise ValueError(f"`top` must be >= 1, got {top}")
    return int(top)


def _display_range(values: np.ndarray) -> tuple[float, float]:
    """Robust (low, high) display range; a flat image gets a unit range."""
    low, high = np.nanpercentile(values.astype(np.float64), _PERCENTILES)
    if not np.isfinite(low) or not np.isfinite(high):
        return 0.0, 1.0
    return float(low), float(high if high > low else low + 1.0)


def _draw_projection(ax, image, points, scale, view) -> None:
    """Maximum projection along one axis, in micrometres, with the points on top."""
    axis, (rows, cols) = view
    mip = image.max(axis=axis)
    low, high = _display_range(mip)
    # Voxel i is centred at i × scale, so its pixel spans (i ± ½) × scale.
    extent = (
        -0.5 * scale[cols],
        (image.shape[cols] - 0.5) * scale[cols],
        (image.shape[rows] - 0.5) * scale[rows],
        -0.5 * scale[rows],
    )
    ax.imshow(
        mip,
        cmap="gray",
        vmin=low,
        vmax=high,
        extent=extent,
        aspect="equal",
        interpolation="nearest",
    )
    if points.size:
        ax.scatter(points[:, cols] * scale[cols], points[:, rows] * scale[rows], **_MARKER)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_title(f"max along {_AXIS_NAMES[axis]}", fontsize=9)
    ax.set_xlabel(f"{_AXIS_NAMES[cols]} (µm)", fontsize=8)
    ax.set_ylabel(f"{_AXIS_NAMES[rows]} (µm)", fontsize=8)
    ax.tick_params(labelsize=7)


def _draw_densities(ax, regions: pd.DataFrame, top: int) -> None:
    """Horizontal bars of the `top` densest regions that hold objects."""
    keep = ~regions["acronym"].astype(str).isin(_NOT_REGIONS) & (regions["count"] > 0)
    if "id" in regions.columns:
        keep &= regions["id"] != 0
    best = regions[keep].sort_values("density_per_mm3", ascending=False).head(top)
    if best.empty:
        ax.text(0.5, 0.5, "no region holds objects", ha="center", va="center")
        ax.set_axis_off()
        return
    positions = np.arange(len(best))
    ax.barh(positions, best["density_per_mm3"].to_numpy(np.float64), color="#4a7bd0")
    ax.set_yticks(positions, best["acronym"].astype(str).tolist(), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("objects per mm³", fontsize=8)
    ax.set_title(f"densest regions (top {len(best)})", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)


def qc_png(
    image: np.ndarray,
    centroids: np.ndarray | None = None,
    *,
    scale: Sequence[float] = (1.0, 1.0, 1.0),
    regions: pd.DataFrame | None = None,
    top: int = 15,
    title: str | None = None,
) -> bytes:
    """Render maximum projections of a volume, its objects and region densities as a PNG.

    Three panels show the maximum-intensity projections along z, y and x in micrometres
    (physical aspect ratio), grey levels spanning the 1st to 99.8th percentile of each
    projection, with the centroids as small red circles. With `regions`, a fourth panel
    shows the `top` regions of highest density as horizontal bars.

    Parameters
    ----------
    image : numpy.ndarray, shape (Z, Y, X)
        A volume small enough to draw (a reduced pyramid level, say).
    centroids : numpy.ndarray, shape (N, 3), optional
        Object centroids (z, y, x) in voxel coordinates of `image`; None: none drawn.
    scale : sequence of float, optional
        Voxel size (z, y, x) of `image` in micrometres.
    regions : pandas.DataFrame, optional
        Per-region ``acronym``, ``density_per_mm3`` and ``count`` (e.g. from
        ``quantify_regions``); rows named ``"outside"`` or ``"unlisted"``, with id 0 or
        with no objects are left out. None: no bar chart.
    top : int, optional
        Number of regions in the bar chart.
    title : str, optional
        Figure title.

    Returns
    -------
    bytes
        The PNG, 1200 × 450 pixels, or 1600 × 450 with the bar chart.

    Raises
    ------
    TypeError
        When an argument has the wrong type.
    ValueError
        When `image` is not a non-empty 3-D numeric array, `centroids` is not (N, 3) finite,
        `scale` is not three positive numbers, `regions` lacks a column or `top` is below 1.
    """
    image = _validate_image(image)
    points = np.zeros((0, 3)) if centroids is None else _validate_points(centroids, "centroids")
    scale = _validate_vector(scale, "scale", positive=True)
    regions = _validate_regions(regions)
    top = _validate_top(top)
    n_columns = 3 if regions is None else 4
    figure = Figure(
        figsize=(_PANEL_INCHES[0] * n_columns, _PANEL_INCHES[1]), dpi=_DPI, layout="constrained"
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, n_columns, squeeze=True)
    for ax, view in zip(axes, _VIEWS, strict=False):
        _draw_projection(ax, image, points, scale, view)
    if regions is not None:
        _draw_densities(axes[3], regions, top)
    if title is not None:
        figure.suptitle(str(title), fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()

"""Pure compute on NumPy and Dask arrays: no stores, no orchestration."""

from voxflow.core.axes import Axis, AxisType, axis_from_name, default_axes, spatial_mask
from voxflow.core.levels import plan_levels
from voxflow.core.pyramid import Method, downsample, downsample_array, level_transform

__all__ = [
    "Axis",
    "AxisType",
    "Method",
    "axis_from_name",
    "default_axes",
    "downsample",
    "downsample_array",
    "level_transform",
    "plan_levels",
    "spatial_mask",
]

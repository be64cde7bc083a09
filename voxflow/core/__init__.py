"""Pure compute on NumPy and Dask arrays: no stores, no orchestration."""

from voxflow.core.axes import Axis, AxisType, axis_from_name, default_axes, spatial_mask
from voxflow.core.levels import plan_levels
from voxflow.core.pyramid import Method, downsample, downsample_array, level_transform
from voxflow.core.scaled import (
    PluginHookError,
    ScaleContext,
    ScaledResult,
    apply_field,
    apply_scaled_processing,
    estimate_field,
    lowres_geometry,
    validate_downsample_factor,
)
from voxflow.core.upsample import (
    cast_to_dtype,
    upsample,
    upsample_array,
    upsample_block,
    upsample_weights,
)

__all__ = [
    "Axis",
    "AxisType",
    "Method",
    "PluginHookError",
    "ScaleContext",
    "ScaledResult",
    "apply_field",
    "apply_scaled_processing",
    "axis_from_name",
    "cast_to_dtype",
    "default_axes",
    "downsample",
    "downsample_array",
    "estimate_field",
    "level_transform",
    "lowres_geometry",
    "plan_levels",
    "spatial_mask",
    "upsample",
    "upsample_array",
    "upsample_block",
    "upsample_weights",
    "validate_downsample_factor",
]

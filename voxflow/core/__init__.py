"""Pure compute on NumPy and Dask arrays: no stores, no orchestration.

Model prediction lives in :mod:`voxflow.core.predict` and is not imported here, so that
``import voxflow.core`` does not load torch.
"""

from voxflow.core.axes import Axis, AxisType, axis_from_name, default_axes, spatial_mask
from voxflow.core.label import label
from voxflow.core.levels import plan_levels
from voxflow.core.objects import OBJECT_COLUMNS, count_map, density_map, object_table
from voxflow.core.pyramid import Method, downsample, downsample_array, level_transform
from voxflow.core.regions import (
    REGION_COLUMNS,
    assign_regions,
    atlas_midline,
    atlas_volumes,
    check_atlas_overlap,
    quantify_regions,
    side_of,
    validate_region_table,
)
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
from voxflow.core.threshold import (
    ThresholdMethod,
    apply_threshold,
    global_threshold,
    histogram,
    threshold_from_histogram,
    threshold_local,
)
from voxflow.core.upsample import (
    cast_to_dtype,
    upsample,
    upsample_array,
    upsample_block,
    upsample_weights,
)
from voxflow.core.watershed import watershed_split

__all__ = [
    "OBJECT_COLUMNS",
    "REGION_COLUMNS",
    "Axis",
    "AxisType",
    "Method",
    "PluginHookError",
    "ScaleContext",
    "ScaledResult",
    "ThresholdMethod",
    "apply_field",
    "apply_scaled_processing",
    "apply_threshold",
    "assign_regions",
    "atlas_midline",
    "atlas_volumes",
    "axis_from_name",
    "cast_to_dtype",
    "check_atlas_overlap",
    "count_map",
    "default_axes",
    "density_map",
    "downsample",
    "downsample_array",
    "estimate_field",
    "global_threshold",
    "histogram",
    "label",
    "level_transform",
    "lowres_geometry",
    "object_table",
    "plan_levels",
    "quantify_regions",
    "side_of",
    "spatial_mask",
    "threshold_from_histogram",
    "threshold_local",
    "upsample",
    "upsample_array",
    "upsample_block",
    "upsample_weights",
    "validate_downsample_factor",
    "validate_region_table",
    "watershed_split",
]

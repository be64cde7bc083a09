"""Scaled-processing plugins: estimate a smooth field at low resolution, apply it at full.

A plugin implements four hooks (:class:`ScaledProcessingSpec`): ``lowres_func`` turns a
low-resolution copy of one channel into a field of the same shape, ``highres_func`` applies
the field, upsampled by the framework, to the full-resolution channel as a Dask array, and
two hooks give its name and description. Subclass :class:`ScaledProcessingPlugin` and mark
the hooks with :data:`hookimpl`; installed packages declare plugins under the entry-point
group ``voxflow.plugins``. Built-ins: ``gaussian``, ``n4``, ``background``, ``normalize``.
"""

from voxflow.plugins._field import divide_field
from voxflow.plugins._spec import PluginError, ScaledProcessingSpec, hookimpl, hookspec
from voxflow.plugins.background import BackgroundSubtraction
from voxflow.plugins.base import ScaledProcessingPlugin
from voxflow.plugins.gaussian import GaussianBiasFieldCorrection
from voxflow.plugins.manager import (
    ENTRY_POINT_GROUP,
    ModulePlugin,
    check_plugin,
    describe_plugins,
    get_plugin_manager,
    parse_params,
    plugin_names,
    plugin_provenance,
    reset_plugin_manager,
    resolve_plugin,
)
from voxflow.plugins.n4 import N4BiasFieldCorrection
from voxflow.plugins.normalize import IntensityNormalization

__all__ = [
    "ENTRY_POINT_GROUP",
    "BackgroundSubtraction",
    "GaussianBiasFieldCorrection",
    "IntensityNormalization",
    "ModulePlugin",
    "N4BiasFieldCorrection",
    "PluginError",
    "ScaledProcessingPlugin",
    "ScaledProcessingSpec",
    "check_plugin",
    "describe_plugins",
    "divide_field",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "parse_params",
    "plugin_names",
    "plugin_provenance",
    "reset_plugin_manager",
    "resolve_plugin",
]

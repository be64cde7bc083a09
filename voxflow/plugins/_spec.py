"""The hook specification of scaled-processing plugins and the markers that implement it."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pluggy

__all__ = [
    "HOOK_NAMES",
    "PROJECT_NAME",
    "PluginError",
    "ScaledProcessingSpec",
    "hookimpl",
    "hookspec",
]

PROJECT_NAME = "voxflow"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

HOOK_NAMES = (
    "lowres_func",
    "highres_func",
    "scaled_processing_plugin_name",
    "scaled_processing_plugin_description",
)
"""The four hooks every scaled-processing plugin implements."""


class PluginError(TypeError):
    """A plugin that does not implement the scaled-processing interface (e.g. a missing hook)."""


class ScaledProcessingSpec:
    """Hooks of a scaled-processing plugin: estimate at low resolution, apply at full resolution.

    The framework calls one plugin's hooks directly, on a per-channel copy of the plugin whose
    ``context`` attribute holds a :class:`voxflow.core.scaled.ScaleContext`.
    """

    @hookspec(firstresult=True)
    def lowres_func(self, lowres_array: np.ndarray) -> np.ndarray:
        """Estimate a smooth field from a low-resolution copy of one channel.

        Parameters
        ----------
        lowres_array : ndarray of float32, shape ([Z,] Y, X)
            The channel reduced by block mean.

        Returns
        -------
        ndarray, shape of `lowres_array`
            The field (bias field, background, ...): finite everywhere.
        """

    @hookspec(firstresult=True)
    def highres_func(self, fullres_array: da.Array, upsampled_output: da.Array) -> da.Array:
        """Apply the field to the full-resolution channel, lazily.

        Parameters
        ----------
        fullres_array : dask.array.Array, shape ([Z,] Y, X)
            The channel at full resolution, in the input dtype.
        upsampled_output : dask.array.Array of float32, shape of `fullres_array`
            The field from ``lowres_func``, upsampled to full resolution.

        Returns
        -------
        dask.array.Array, shape of `fullres_array`
            The processed channel (any float dtype; the framework casts it). When
            ``context.dtype`` names a dtype, the channel may come in it directly, rounded
            and saturated as :func:`voxflow.core.cast_to_dtype` does, which saves the
            framework's cast (see :func:`voxflow.core.upsample.upsample_recipe` to fuse
            the upsampling as well).
        """

    @hookspec(firstresult=True)
    def scaled_processing_plugin_name(self) -> str:
        """The plugin's registered name, e.g. ``"gaussian"``."""

    @hookspec(firstresult=True)
    def scaled_processing_plugin_description(self) -> str:
        """A one-line description of what the plugin does."""

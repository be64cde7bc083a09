"""An installable voxflow plugin: multiply the image by a constant field."""

import numpy as np

from voxflow.plugins import ScaledProcessingPlugin, hookimpl

__all__ = ["ConstantScale"]


class ConstantScale(ScaledProcessingPlugin):
    """Field: `factor` everywhere; applied by multiplication, so the output is factor × input.

    Parameters
    ----------
    factor : float, optional
        The constant, > 0.
    """

    def __init__(self, factor: float = 2.0):
        if not factor > 0:
            raise ValueError(f"`factor` must be > 0, got {factor}")
        self.factor = float(factor)

    @hookimpl
    def scaled_processing_plugin_name(self):
        """``"example-scale"``."""
        return "example-scale"

    @hookimpl
    def scaled_processing_plugin_description(self):
        """One line."""
        return "example: multiply by a constant factor"

    @hookimpl
    def lowres_func(self, lowres_array):
        """A field of `factor` everywhere."""
        return np.full(lowres_array.shape, self.factor, dtype=np.float32)

    @hookimpl
    def highres_func(self, fullres_array, upsampled_output):
        """The image times the field."""
        return fullres_array * upsampled_output

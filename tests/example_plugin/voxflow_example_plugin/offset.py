"""A voxflow plugin written as a module of hook functions: add 10 everywhere."""

import numpy as np

from voxflow.plugins import hookimpl

OFFSET = 10.0


@hookimpl
def scaled_processing_plugin_name():
    """``"example-offset"``."""
    return "example-offset"


@hookimpl
def scaled_processing_plugin_description():
    """One line."""
    return "example: add a constant (a module plugin)"


@hookimpl
def lowres_func(lowres_array):
    """A field of `OFFSET` everywhere."""
    return np.full(lowres_array.shape, OFFSET, dtype=np.float32)


@hookimpl
def highres_func(fullres_array, upsampled_output):
    """The image plus the field."""
    return fullres_array + upsampled_output

"""Background subtraction: a smooth background estimated at low resolution, subtracted."""

from __future__ import annotations

import dask.array as da
import numpy as np
from scipy import ndimage

from voxflow.plugins._field import (
    validate_choice,
    validate_fullres,
    validate_lowres,
    validate_real,
)
from voxflow.plugins._spec import hookimpl
from voxflow.plugins.base import ScaledProcessingPlugin

__all__ = ["BackgroundSubtraction"]

_UNITS = ("um", "voxel")


class BackgroundSubtraction(ScaledProcessingPlugin):
    """Subtract a smooth background: a morphological opening of the low-resolution image.

    The estimate is a grey opening of the low-resolution image with a box of `size` (it
    removes every bright object narrower than the box: cells, fibres) followed by Gaussian
    smoothing with sigma ``size / 2`` (it removes the opening's blockiness); both honour
    anisotropic spacing. The full-resolution image is corrected as ``max(full - background,
    0)``, in the input's units.

    Parameters
    ----------
    size : float, optional
        Width of the opening's box, > 0: micrometres (``units="um"``; the context's units
        are converted) or full-resolution voxels (``units="voxel"``). Take it larger than
        the widest object to keep (by default about 2.5 nuclear diameters); at least one
        low-resolution voxel is used per axis.
    units : {"um", "voxel"}, optional
        Unit of `size`.

    Examples
    --------
    >>> BackgroundSubtraction(size=40.0)
    BackgroundSubtraction(size=40.0, units='um')
    """

    def __init__(self, size: float = 25.0, units: str = "um") -> None:
        self.size = validate_real(size, "size", low=0.0, open_low=True)
        self.units = validate_choice(units, "units", _UNITS)

    def size_voxels(self, ndim: int) -> tuple[float, ...]:
        """`size` in voxels of the low-resolution array, per axis (see `length_voxels`)."""
        return self.length_voxels(self.size, self.units, ndim)

    @hookimpl
    def scaled_processing_plugin_name(self) -> str:
        """``"background"``."""
        return "background"

    @hookimpl
    def scaled_processing_plugin_description(self) -> str:
        """One line on the method."""
        return (
            "smooth background by grey opening (box `size` in µm) and Gaussian smoothing; "
            "subtracted, clipped at zero"
        )

    @hookimpl
    def lowres_func(self, lowres_array: np.ndarray) -> np.ndarray:
        """Estimate the background.

        Parameters
        ----------
        lowres_array : ndarray, shape ([Z,] Y, X)
            Low-resolution image, finite.

        Returns
        -------
        ndarray of float32, shape of `lowres_array`
            The background, in the image's units.
        """
        image = validate_lowres(lowres_array)
        size = self.size_voxels(image.ndim)
        box = tuple(max(1, round(s)) for s in size)
        opened = ndimage.grey_opening(image, size=box, mode="nearest")
        smooth = ndimage.gaussian_filter(opened, [s / 2 for s in size], mode="nearest")
        return smooth.astype(np.float32)

    @hookimpl
    def highres_func(self, fullres_array: da.Array, upsampled_output: da.Array) -> da.Array:
        """Subtract the background, clipping at zero: ``max(full - background, 0)``.

        Parameters
        ----------
        fullres_array : dask.array.Array
            Full-resolution image.
        upsampled_output : dask.array.Array
            The background upsampled to the full-resolution grid.

        Returns
        -------
        dask.array.Array
            The image less its background, float32 for inputs of up to 16 bits.
        """
        validate_fullres(fullres_array, upsampled_output)
        dtype = np.result_type(fullres_array.dtype, np.float32)
        difference = fullres_array.astype(dtype) - upsampled_output.astype(dtype)
        return da.maximum(difference, dtype.type(0))

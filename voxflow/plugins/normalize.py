"""Intensity normalisation: global percentiles at low resolution, a linear rescale at full."""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np

from voxflow.plugins._field import (
    foreground_mask,
    require_estimate,
    validate_bool,
    validate_fullres,
    validate_lowres,
    validate_mask,
    validate_real,
)
from voxflow.plugins._spec import hookimpl
from voxflow.plugins.base import ScaledProcessingPlugin

__all__ = ["IntensityNormalization"]


class IntensityNormalization(ScaledProcessingPlugin):
    """Rescale intensities linearly so that two global percentiles map to 0 and `out_max`.

    ``lowres_func`` takes the `low` and `high` percentiles of the low-resolution image (over
    `mask`), keeps them in `lo` and `hi`, and returns the low-resolution image rescaled to
    [0, 1] to look at. ``highres_func`` computes ``(full - lo) / (hi - lo) × out_max``,
    clipped to ``[0, out_max]`` when `clip` is set; it does not use the upsampled field.

    With the default ``out_max=None`` an integer image is rescaled to its dtype's full
    range (``lo → 0``, ``hi → 65535`` for uint16), so the framework's default of keeping the
    input dtype works. For values in [0, 1], pass ``out_max=1`` and choose the float32
    output dtype (``--dtype float32``): kept as integers they would round to 0 and 1.

    Parameters
    ----------
    low, high : float, optional
        Percentiles in [0, 100], ``low < high``, mapped to 0 and `out_max`.
    mask : {"all", "otsu"}, float or ndarray of bool, optional
        Voxels of the low-resolution image the percentiles are taken over: every voxel, the
        Otsu foreground (holes filled), voxels above a threshold, or a boolean array.
    out_max : float or None, optional
        Value `hi` maps to, > 0. None: the largest value of an integer input dtype, 1.0 for
        float input.
    clip : bool, optional
        Clip the result to ``[0, out_max]``.

    Attributes
    ----------
    lo, hi : float or None
        The percentiles' values, set by ``lowres_func``.

    Examples
    --------
    >>> IntensityNormalization(low=2.0, high=99.0)
    IntensityNormalization(low=2.0, high=99.0, mask='all', out_max=None, clip=True)
    """

    def __init__(
        self,
        low: float = 1.0,
        high: float = 99.5,
        mask: Any = "all",
        out_max: float | None = None,
        clip: bool = True,
    ) -> None:
        self.low = validate_real(low, "low", low=0.0, high=100.0)
        self.high = validate_real(high, "high", low=0.0, high=100.0)
        if self.low >= self.high:
            raise ValueError(f"`low` must be below `high`, got low={low}, high={high}")
        self.mask = validate_mask(mask)
        self.out_max = (
            None if out_max is None else validate_real(out_max, "out_max", low=0.0, open_low=True)
        )
        self.clip = validate_bool(clip, "clip")
        self.lo: float | None = None
        self.hi: float | None = None

    @hookimpl
    def scaled_processing_plugin_name(self) -> str:
        """``"normalize"``."""
        return "normalize"

    @hookimpl
    def scaled_processing_plugin_description(self) -> str:
        """One line on the method."""
        return (
            "linear rescale mapping the low/high percentiles of the low-resolution image to "
            "0 and the dtype's maximum (or `out_max`)"
        )

    @hookimpl
    def lowres_func(self, lowres_array: np.ndarray) -> np.ndarray:
        """Take the percentiles; return the low-resolution image rescaled to [0, 1].

        Parameters
        ----------
        lowres_array : ndarray, shape ([Z,] Y, X)
            Low-resolution image, finite.

        Returns
        -------
        ndarray of float32, shape of `lowres_array`
            ``(low - lo) / (hi - lo)``, clipped to [0, 1] when `clip` is set.

        Raises
        ------
        ValueError
            When the two percentiles are equal (a constant image).
        """
        image = validate_lowres(lowres_array)
        values = image[foreground_mask(image, self.mask)]
        lo, hi = (float(v) for v in np.percentile(values, [self.low, self.high]))
        if not hi > lo:
            raise ValueError(
                f"plugin 'normalize': percentiles {self.low} and {self.high} of the image are "
                f"both {lo:.6g}; nothing to rescale"
            )
        self.lo, self.hi = lo, hi
        scaled = (image - lo) / (hi - lo)
        if self.clip:
            scaled = np.clip(scaled, 0.0, 1.0)
        return scaled.astype(np.float32)

    def output_max(self, dtype: np.dtype) -> float:
        """The value `hi` maps to for an input of `dtype`.

        Parameters
        ----------
        dtype : numpy.dtype
            Dtype of the full-resolution image.

        Returns
        -------
        float
            `out_max`, or when None the largest value of an integer `dtype`, else 1.0.
        """
        if self.out_max is not None:
            return self.out_max
        dtype = np.dtype(dtype)
        return float(np.iinfo(dtype).max) if dtype.kind in "iu" else 1.0

    @hookimpl
    def highres_func(self, fullres_array: da.Array, upsampled_output: da.Array) -> da.Array:
        """Rescale: ``(full - lo) / (hi - lo) × out_max``, clipped if `clip`.

        Parameters
        ----------
        fullres_array : dask.array.Array
            Full-resolution image.
        upsampled_output : dask.array.Array
            The upsampled field; only its shape is checked.

        Returns
        -------
        dask.array.Array
            Rescaled image, float32 for inputs of up to 16 bits (float64 for wider ones).
        """
        validate_fullres(fullres_array, upsampled_output)
        lo = require_estimate(self.lo, self.name, "percentiles")
        hi = require_estimate(self.hi, self.name, "percentiles")
        dtype = np.result_type(fullres_array.dtype, np.float32)
        top = self.output_max(fullres_array.dtype)
        gain = dtype.type(top / (hi - lo))
        out = (fullres_array.astype(dtype) - dtype.type(lo)) * gain
        if self.clip:
            out = da.clip(out, dtype.type(0), dtype.type(top))
        return out

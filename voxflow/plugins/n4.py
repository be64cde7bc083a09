"""Bias-field correction by N4 (ANTs) on the low-resolution image, at its physical spacing."""

from __future__ import annotations

import numbers
import os
import types
from collections.abc import Mapping
from typing import Any

import dask.array as da
import numpy as np

from voxflow.plugins._field import (
    divide_field,
    normalise_field,
    offset_and_mask,
    require_estimate,
    validate_bool,
    validate_fullres,
    validate_lowres,
    validate_mask,
    validate_offset,
    validate_real,
)
from voxflow.plugins._spec import hookimpl
from voxflow.plugins.base import ScaledProcessingPlugin

__all__ = ["N4BiasFieldCorrection"]

_CONVERGENCE = types.MappingProxyType({"iters": (50,), "tol": 1e-7})
_THREADS_VARIABLE = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
# N4 takes logarithms: voxels at or below the offset are lifted to this fraction of the
# foreground mean.
_POSITIVE_FLOOR = 1e-3


def _validate_convergence(convergence: Any) -> dict:
    if not isinstance(convergence, Mapping):
        raise TypeError(
            "`convergence` must be a dict {'iters': [int, ...], 'tol': float}, "
            f"got {type(convergence).__name__}"
        )
    if set(convergence) != {"iters", "tol"}:
        raise ValueError(
            f"`convergence` needs exactly the keys 'iters' and 'tol', got {sorted(convergence)}"
        )
    iters = convergence["iters"]
    if isinstance(iters, str | bytes) or not isinstance(iters, list | tuple) or not iters:
        raise TypeError(
            f"`convergence['iters']` must be a non-empty list of integers, got {iters!r}"
        )
    for n in iters:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(
                f"`convergence['iters']` must hold integers >= 1 (one per fitting level), "
                f"got {list(iters)}"
            )
    tol = validate_real(convergence["tol"], "convergence['tol']", low=0.0)
    return {"iters": [int(n) for n in iters], "tol": tol}


def _validate_shrink(shrink_factor: Any) -> int:
    if isinstance(shrink_factor, bool) or not isinstance(shrink_factor, numbers.Integral):
        raise TypeError(f"`shrink_factor` must be an integer, got {shrink_factor!r}")
    if shrink_factor < 1:
        raise ValueError(f"`shrink_factor` must be >= 1, got {shrink_factor}")
    return int(shrink_factor)


def _validate_threads(threads: Any) -> int | None:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral):
        raise TypeError(f"`threads` must be an integer or None, got {threads!r}")
    if threads < 1:
        raise ValueError(f"`threads` must be >= 1, got {threads}")
    return int(threads)


def _fit_amplitude(signal: np.ndarray, field: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`field` to the power that minimises the variance of ``log(signal / field)`` on `mask`."""
    log_field = np.log(field[mask])
    spread = float(log_field.var())
    if spread < 1e-12:
        return field
    log_signal = np.log(signal[mask])
    gain = float(np.mean((log_signal - log_signal.mean()) * (log_field - log_field.mean())))
    return field ** max(gain / spread, 0.0)


def _import_ants(threads: int | None) -> Any:
    """Import ANTsPy, fixing ITK's thread count first (ITK reads it once, at first use)."""
    if threads is not None:
        os.environ[_THREADS_VARIABLE] = str(threads)
    try:
        import ants
    except ImportError as exc:  # pragma: no cover - antspyx is a dependency of voxflow
        raise ImportError(
            "the 'n4' plugin needs antspyx (pip install antspyx), which voxflow depends on"
        ) from exc
    return ants


class N4BiasFieldCorrection(ScaledProcessingPlugin):
    """Multiplicative bias field by N4 (ANTs) on the low-resolution image.

    The dark level `offset` is subtracted, the image is handed to ANTs with its real physical
    spacing (micrometres) and the foreground `mask`; N4's bias field, its amplitude refined
    (`fit_amplitude`), is normalised to mean 1 over the foreground (a raw N4 field has an
    arbitrary scale) and floored at 0.001. The full-resolution image is corrected as
    ``offset + (full - offset) / field``.

    Parameters
    ----------
    spline_spacing : float or None, optional
        Distance between B-spline control points of the field in micrometres, > 0, at the
        first fitting level (each further level in `convergence` halves it). None places
        one B-spline mesh element over the whole image (ANTs' default): the smoothest field.
    convergence : dict, optional
        ``{"iters": [int, ...], "tol": float}``: iterations per fitting level and the
        convergence threshold, as in ``ants.n4_bias_field_correction``. The default fits one
        level, which suits the small arrays of low-resolution estimation; ANTs' own default,
        four levels of 50, lets the field follow the tissue.
    shrink_factor : int, optional
        ANTs' own further reduction of the image, >= 1; the framework has reduced it already.
    mask : {"otsu", "all"}, float or ndarray of bool, optional
        Foreground the field is estimated from and normalised over: Otsu threshold of the
        low-resolution image with holes filled, every voxel, voxels above a threshold (input
        units), or a boolean array of the low-resolution shape.
    offset : float or None, optional
        Dark level (camera offset) under the multiplicative field. None derives it from the
        data: the 0.5th percentile of the low-resolution image, i.e. the background around
        the sample; pass 0 for an image whose offset was removed (plain division).
    fit_amplitude : bool, optional
        N4 approaches its optimum slowly: on low-resolution arrays 50 iterations typically
        recover a quarter to a half of the field's log-amplitude. True raises N4's field to
        the power that minimises the variance of the log-intensity over the foreground (one
        least-squares number, close to where N4's own iterations converge); False returns
        N4's field as it is.
    threads : int or None, optional
        ITK threads (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``), set before ANTs is first
        used in the process: one thread gives the same field for the same input on every
        run. None leaves the environment as it is.
    """

    def __init__(
        self,
        spline_spacing: float | None = None,
        convergence: Mapping = _CONVERGENCE,
        shrink_factor: int = 1,
        mask: Any = "otsu",
        offset: float | None = None,
        fit_amplitude: bool = True,
        threads: int | None = 1,
    ) -> None:
        self.spline_spacing = (
            None
            if spline_spacing is None
            else validate_real(spline_spacing, "spline_spacing", low=0.0, open_low=True)
        )
        self.convergence = _validate_convergence(convergence)
        self.shrink_factor = _validate_shrink(shrink_factor)
        self.mask = validate_mask(mask)
        self.offset = validate_offset(offset)
        self.fit_amplitude = validate_bool(fit_amplitude, "fit_amplitude")
        self.threads = _validate_threads(threads)
        self.estimated_offset: float | None = None

    def mesh_size(self, shape: tuple[int, ...]) -> list[int]:
        """B-spline mesh elements per axis of the array (in array order) at the first level.

        Parameters
        ----------
        shape : tuple of int
            Shape of the low-resolution array.

        Returns
        -------
        list of int
            ``round(extent / spline_spacing)``, at least 1, with the extent in micrometres;
            1 per axis when `spline_spacing` is None.
        """
        if self.spline_spacing is None:
            return [1] * len(shape)
        spacing = self.lowres_spacing_um(len(shape))
        return [
            max(1, round(n * s / self.spline_spacing)) for n, s in zip(shape, spacing, strict=True)
        ]

    @hookimpl
    def scaled_processing_plugin_name(self) -> str:
        """``"n4"``."""
        return "n4"

    @hookimpl
    def scaled_processing_plugin_description(self) -> str:
        """One line on the method."""
        return (
            "bias field by N4 (ANTs) at the image's physical spacing, mean 1 over the "
            "foreground; divides it out above the dark offset"
        )

    @hookimpl
    def lowres_func(self, lowres_array: np.ndarray) -> np.ndarray:
        """Estimate the bias field with N4, normalised to mean 1 over the foreground.

        Parameters
        ----------
        lowres_array : ndarray, shape ([Z,] Y, X)
            Low-resolution image, finite.

        Returns
        -------
        ndarray of float32, shape of `lowres_array`
            The field, >= 0.001. The offset used is kept in `estimated_offset`.

        Raises
        ------
        ValueError
            When `shrink_factor` leaves fewer than 2 voxels on an axis, or the foreground
            holds nothing above the offset.
        """
        image = validate_lowres(lowres_array)
        if min(image.shape) < 2 * self.shrink_factor:
            raise ValueError(
                f"`shrink_factor` {self.shrink_factor} leaves fewer than 2 voxels on an axis of "
                f"the low-resolution array {image.shape}; lower it"
            )
        offset, mask = offset_and_mask(image, self.offset, self.mask)
        signal = image - offset
        level = float(np.clip(signal[mask], 0, None).mean())
        if level <= 0:
            raise ValueError(
                f"plugin 'n4': the foreground has nothing above the offset {offset:.6g}"
            )
        floor = _POSITIVE_FLOOR * level
        field = self._n4(np.maximum(signal, floor), mask)
        if self.fit_amplitude:
            field = _fit_amplitude(signal, field, mask & (signal > floor))
        self.estimated_offset = offset
        return normalise_field(field, mask, self.name)

    def _n4(self, signal: np.ndarray, mask: np.ndarray) -> np.ndarray:
        ants = _import_ants(self.threads)
        # ants.from_numpy keeps the array's axis order: ANTs axis i is array axis i, so the
        # spacing and the mesh go in array order.
        spacing = self.lowres_spacing_um(signal.ndim)
        image = ants.from_numpy(signal.astype(np.float32), spacing=spacing)
        foreground = ants.from_numpy(mask.astype(np.float32), spacing=spacing)
        bias = ants.n4_bias_field_correction(
            image,
            mask=foreground,
            shrink_factor=self.shrink_factor,
            convergence=self.convergence,
            spline_param=self.mesh_size(signal.shape),
            return_bias_field=True,
        )
        return bias.numpy().astype(np.float64)

    @hookimpl
    def highres_func(self, fullres_array: da.Array, upsampled_output: da.Array) -> da.Array:
        """Divide the full-resolution image by the field: ``offset + (full - offset) / field``.

        Parameters
        ----------
        fullres_array : dask.array.Array
            Full-resolution image.
        upsampled_output : dask.array.Array
            The field upsampled to the full-resolution grid.

        Returns
        -------
        dask.array.Array
            Corrected image, float32 for inputs of up to 16 bits (float64 for wider ones), or
            already of the context's ``dtype`` when it has one.
        """
        validate_fullres(fullres_array, upsampled_output)
        offset = self.estimated_offset if self.estimated_offset is not None else self.offset
        offset = require_estimate(offset, self.name, "offset")
        dtype = self.context.dtype if self.context else None
        return divide_field(fullres_array, upsampled_output, offset, dtype=dtype)

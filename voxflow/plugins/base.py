"""The base class of scaled-processing plugins: records its parameters, knows its geometry."""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from voxflow.core.axes import micrometres_per_unit
from voxflow.core.scaled import ScaleContext
from voxflow.plugins._spec import PluginError

__all__ = ["ScaledProcessingPlugin", "jsonable"]


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types, for provenance.

    Parameters
    ----------
    value : object
        A parameter value.

    Returns
    -------
    object
        Bools, integers, finite floats, strings and None as they are (NumPy scalars become
        Python ones, non-finite floats their ``repr``); tuples, lists and mappings element by
        element (keys as strings); an array as ``{"shape", "dtype", "sha256"}``; anything else
        as its ``repr``.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        digest = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
        return {"shape": list(value.shape), "dtype": str(value.dtype), "sha256": digest}
    return repr(value)


def _bound_params(init: Callable, self: Any, args: tuple, kwargs: dict) -> dict | None:
    """The arguments of a call of `init`, defaults applied, or None when they do not bind."""
    try:
        bound = inspect.signature(init).bind(self, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    params: dict[str, Any] = {}
    for i, (name, value) in enumerate(bound.arguments.items()):
        kind = bound.signature.parameters[name].kind
        if i == 0:
            continue  # self
        if kind is inspect.Parameter.VAR_KEYWORD:
            params.update(value)
        else:
            params[name] = value
    return params


def _recording(init: Callable) -> Callable:
    """Wrap a subclass ``__init__`` so that the outermost call records its parameters."""
    if getattr(init, "_records_params", False):
        return init

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        # Only the constructor of the instance's own class records: a parent's __init__
        # reached through super() must not overwrite the child's parameters.
        if type(self).__init__ is __init__:
            params = _bound_params(init, self, args, kwargs)
            if params is not None:
                self.params = {k: jsonable(v) for k, v in params.items()}
        init(self, *args, **kwargs)

    __init__._records_params = True
    return __init__


class ScaledProcessingPlugin:
    """Base class of scaled-processing plugins.

    A plugin subclasses it, takes its parameters as keyword arguments of ``__init__`` and
    implements the four hooks of :class:`voxflow.plugins.ScaledProcessingSpec` with the
    :data:`voxflow.plugins.hookimpl` marker. The constructor's arguments, defaults applied,
    are recorded in `params` (as JSON types) whether or not the subclass calls
    ``super().__init__()``; they go into the provenance of what the plugin makes.

    Attributes
    ----------
    params : dict
        The constructor's keyword parameters, defaults applied, as JSON types.
    context : ScaleContext or None
        Geometry of the arrays the hooks receive, set by the framework on the per-channel copy
        that runs; None outside the framework (spacing 1 per axis then).

    Examples
    --------
    >>> class Scale(ScaledProcessingPlugin):
    ...     def __init__(self, gain=2.0):
    ...         self.gain = gain
    >>> Scale().params
    {'gain': 2.0}
    """

    context: ScaleContext | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording(cls.__dict__["__init__"])

    def __new__(cls, *args: Any, **kwargs: Any) -> ScaledProcessingPlugin:
        """Make the instance; make sure every constructor in the class chain records."""
        # A constructor set after the class was made (e.g. by @dataclass) is wrapped on first
        # use; Python looks __init__ up after __new__ returns, so this call records too.
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if klass is not ScaledProcessingPlugin and issubclass(klass, ScaledProcessingPlugin):
                if init is not None and not getattr(init, "_records_params", False):
                    klass.__init__ = _recording(init)
        return super().__new__(cls)

    def __init__(self, **params: Any) -> None:
        # A subclass constructor has recorded its own signature already.
        if "params" not in self.__dict__:
            self.params = {k: jsonable(v) for k, v in params.items()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    def _hook(self, hook: str) -> Callable:
        method = getattr(self, hook, None)
        if not callable(method):
            raise PluginError(
                f"plugin {type(self).__qualname__} does not implement the {hook!r} hook"
            )
        return method

    @property
    def name(self) -> str:
        """The registered name, from the ``scaled_processing_plugin_name`` hook."""
        return str(self._hook("scaled_processing_plugin_name")())

    @property
    def description(self) -> str:
        """The description, from the ``scaled_processing_plugin_description`` hook."""
        return str(self._hook("scaled_processing_plugin_description")())

    def lowres_spacing(self, ndim: int) -> tuple[float, ...]:
        """Physical voxel size of the low-resolution array the hooks receive.

        Parameters
        ----------
        ndim : int
            Number of spatial axes of the array.

        Returns
        -------
        tuple of float
            ``context.spacing``, or 1 per axis without a context.

        Raises
        ------
        ValueError
            When the context's spacing does not have `ndim` values.
        """
        if self.context is None:
            return (1.0,) * ndim
        spacing = tuple(float(s) for s in self.context.spacing)
        if len(spacing) != ndim:
            raise ValueError(
                f"`context.spacing` needs one value per axis of the array ({ndim}), got {spacing}"
            )
        return spacing

    def length_voxels(self, length: float, units: str, ndim: int) -> tuple[float, ...]:
        """A length in voxels of the low-resolution array, per axis (not rounded).

        Parameters
        ----------
        length : float
            The length, in micrometres (``units="um"``) or in full-resolution voxels
            (``units="voxel"``).
        units : {"um", "voxel"}
            Unit of `length`.
        ndim : int
            Number of spatial axes of the array.

        Returns
        -------
        tuple of float
            ``length`` divided by the low-resolution spacing in micrometres, or for
            ``units="voxel"`` ``length × fullres_spacing / spacing`` (``length`` itself
            without a context).
        """
        if units == "um":
            return tuple(length / s for s in self.lowres_spacing_um(ndim))
        spacing = self.lowres_spacing(ndim)
        full = spacing if self.context is None else tuple(self.context.fullres_spacing)
        return tuple(length * f / s for f, s in zip(full, spacing, strict=True))

    def lowres_spacing_um(self, ndim: int) -> tuple[float, ...]:
        """Voxel size of the low-resolution array in micrometres.

        Parameters
        ----------
        ndim : int
            Number of spatial axes of the array.

        Returns
        -------
        tuple of float
            :meth:`lowres_spacing` converted from the context's units (OME-NGFF names such as
            ``"millimeter"`` or ``"nanometer"``); a missing or unknown unit counts as
            micrometres, and so does the spacing of 1 per axis without a context.

        Raises
        ------
        ValueError
            When the context's spacing does not have `ndim` values.
        """
        spacing = self.lowres_spacing(ndim)
        units = () if self.context is None else tuple(self.context.units)
        if len(units) != ndim:
            return spacing
        return tuple(
            s * (micrometres_per_unit(u) or 1.0) for s, u in zip(spacing, units, strict=True)
        )

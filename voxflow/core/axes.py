"""Axes of an image: names, kinds and physical units, as OME-NGFF describes them."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Axis",
    "AxisType",
    "axis_from_name",
    "default_axes",
    "micrometres_per_unit",
    "spatial_mask",
    "validate_dims",
]


class AxisType(enum.StrEnum):
    """Kind of an axis; the value is what OME-NGFF metadata carries."""

    SPACE = "space"
    CHANNEL = "channel"
    TIME = "time"


_KIND = {
    "t": AxisType.TIME,
    "c": AxisType.CHANNEL,
    "z": AxisType.SPACE,
    "y": AxisType.SPACE,
    "x": AxisType.SPACE,
}
_DEFAULT_UNIT = {AxisType.SPACE: "micrometer", AxisType.TIME: "second", AxisType.CHANNEL: None}
_DEFAULT_DIMS = {2: "yx", 3: "zyx", 4: "czyx", 5: "tczyx"}
_ORDER = "tczyx"


@dataclass(frozen=True)
class Axis:
    """One axis of an image.

    Parameters
    ----------
    name : str
        One of ``t``, ``c``, ``z``, ``y``, ``x``.
    type : AxisType
        Space, channel or time.
    unit : str or None
        Physical unit (``"micrometer"``, ``"second"``); None for channels.
    """

    name: str
    type: AxisType
    unit: str | None = None

    @property
    def is_spatial(self) -> bool:
        """Whether the axis is a spatial one (reduced by pyramids)."""
        return self.type is AxisType.SPACE


def validate_dims(dims: Sequence[str] | str) -> tuple[str, ...]:
    """Check axis names and return them as a tuple.

    Parameters
    ----------
    dims : sequence of str or str
        Axis names in storage order, e.g. ``"czyx"`` or ``("z", "y", "x")``.

    Returns
    -------
    tuple of str
        The names, in order.

    Raises
    ------
    ValueError
        When a name is not one of t, c, z, y, x, is repeated, appears out of the
        OME-NGFF order (t, c, then space), or there are not 2 or 3 spatial axes.
    """
    names = tuple(dims)
    unknown = [n for n in names if n not in _KIND]
    if unknown:
        raise ValueError(f"`dims` may only hold t, c, z, y, x; got {''.join(names)!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"`dims` repeats an axis: {''.join(names)!r}")
    if list(names) != sorted(names, key=_ORDER.index):
        order = "".join(names)
        raise ValueError(f"`dims` must follow the OME-NGFF order t, c, z, y, x; got {order!r}")
    n_space = sum(_KIND[n] is AxisType.SPACE for n in names)
    if n_space not in (2, 3):
        raise ValueError(f"`dims` needs 2 or 3 spatial axes, got {''.join(names)!r}")
    return names


def default_axes(ndim: int) -> tuple[Axis, ...]:
    """Axes assumed for an array that carries no metadata.

    Parameters
    ----------
    ndim : int
        Number of dimensions, 2 to 5 (``yx``, ``zyx``, ``czyx``, ``tczyx``).

    Returns
    -------
    tuple of Axis
        The axes, spatial ones in micrometres.

    Raises
    ------
    ValueError
        When `ndim` is outside 2..5.
    """
    if ndim not in _DEFAULT_DIMS:
        raise ValueError(f"an image needs 2 to 5 dimensions (yx .. tczyx), got {ndim}")
    return tuple(Axis(n, _KIND[n], _DEFAULT_UNIT[_KIND[n]]) for n in _DEFAULT_DIMS[ndim])


def axis_from_name(name: str, unit: str | None = None) -> Axis:
    """Axis for a name, with the default unit of its kind when `unit` is None."""
    kind = _KIND[name]
    return Axis(name, kind, unit if unit is not None else _DEFAULT_UNIT[kind])


def spatial_mask(dims: Sequence[str]) -> tuple[bool, ...]:
    """Which of `dims` are spatial axes.

    Parameters
    ----------
    dims : sequence of str
        Axis names.

    Returns
    -------
    tuple of bool
        True for z, y and x.
    """
    return tuple(_KIND.get(n) is AxisType.SPACE for n in dims)


# Length of one unit in micrometres: the OME-NGFF space units (UDUNITS-2 lengths) and the
# short names seen in the wild.
_MICROMETRES = {
    "yoctometer": 1e-18, "zeptometer": 1e-15, "attometer": 1e-12, "femtometer": 1e-9,
    "picometer": 1e-6, "angstrom": 1e-4, "nanometer": 1e-3, "micrometer": 1.0,
    "millimeter": 1e3, "centimeter": 1e4, "decimeter": 1e5, "meter": 1e6, "hectometer": 1e8,
    "kilometer": 1e9, "megameter": 1e12, "gigameter": 1e15, "terameter": 1e18,
    "petameter": 1e21, "exameter": 1e24, "zettameter": 1e27, "yottameter": 1e30,
    "inch": 25_400.0, "foot": 304_800.0, "yard": 914_400.0, "mile": 1_609_344_000.0,
    "parsec": 3.0856775814913673e22, "micron": 1.0, "um": 1.0, "µm": 1.0, "nm": 1e-3,
    "mm": 1e3, "cm": 1e4, "m": 1e6,
}  # fmt: skip


def micrometres_per_unit(unit: str | None) -> float | None:
    """Micrometres in one `unit` of length; 1 for no unit (taken as micrometres).

    Parameters
    ----------
    unit : str or None
        An OME-NGFF space unit (``"nanometer"``, ``"millimeter"``, ...) or a common short
        name (``"um"``, ``"nm"``); case is ignored.

    Returns
    -------
    float or None
        The factor, or None when `unit` is not a length (``"second"``, a typo).
    """
    if unit is None or unit == "":
        return 1.0
    return _MICROMETRES.get(str(unit).lower())

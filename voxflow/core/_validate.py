"""Validation helpers shared by the core modules."""

from __future__ import annotations

import numbers


def validate_int(value: object, name: str, minimum: int) -> int:
    """An integer (not a bool) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return int(value)

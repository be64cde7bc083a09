"""Validation helpers shared by the core modules."""

from __future__ import annotations

import enum
import numbers
from typing import TypeVar

import numpy as np

E = TypeVar("E", bound=enum.Enum)


def validate_int(value: object, name: str, minimum: int) -> int:
    """An integer (not a bool) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return int(value)


def validate_dtype(dtype: object, kinds: str, what: str) -> np.dtype:
    """A NumPy dtype of one of `kinds`; None is refused rather than read as float64."""
    try:
        got = None if dtype is None else np.dtype(dtype)
    except TypeError:
        got = None
    if got is None or got.kind not in kinds:
        raise TypeError(f"`dtype` must be {what}, got {dtype!r}")
    return got


def validate_choice(value: object, enum: type[E], name: str) -> E:
    """A member of the str-valued `enum`, given as a member or as its value."""
    if isinstance(value, enum):
        return value
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a str or {enum.__name__}, got {type(value).__name__}")
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)
        raise ValueError(f"`{name}` must be one of {allowed}; got {value!r}") from None

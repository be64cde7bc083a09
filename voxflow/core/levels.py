"""How many pyramid levels to make, and the factors that make each one from the previous one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from voxflow.core._kernels import reduced_shape
from voxflow.core.pyramid import _validate_int, _validate_ints, _validate_reals

__all__ = ["plan_levels"]

# Spacings equal up to this relative difference count as equal (e.g. 0.3 * 2 vs 0.6).
_RTOL = 1e-6


def _validate_spatial(spatial: Sequence[bool], ndim: int) -> tuple[bool, ...]:
    if isinstance(spatial, str | bytes) or not isinstance(spatial, Sequence | np.ndarray):
        raise TypeError(f"`spatial` must be a sequence of bools, got {type(spatial).__name__}")
    got = tuple(spatial)
    if len(got) != ndim:
        raise ValueError(f"`spatial` needs one bool per axis ({ndim}), got {got}")
    if not all(isinstance(v, bool | np.bool_) for v in got):
        raise TypeError(f"`spatial` must hold bools, got {got}")
    return tuple(bool(v) for v in got)


def _validate_shape(shape: Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, str | bytes) or not isinstance(shape, Sequence | np.ndarray):
        raise TypeError(f"`shape` must be a sequence of integers, got {type(shape).__name__}")
    return tuple(_validate_int(n, "shape", 1) for n in shape)


def _anisotropic_step(spacing: dict[int, float]) -> set[int]:
    """Axes to halve: those that stay within the coarsest spacing, or all when none does."""
    coarsest = max(spacing.values()) * (1 + _RTOL)
    finer = {i for i, s in spacing.items() if 2 * s <= coarsest}
    return finer or set(spacing)


def _next_factors(
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    reducible: list[int],
    fixed: dict[int, int] | None,
) -> tuple[int, ...]:
    if fixed is not None:
        chosen = {i: fixed[i] for i in reducible}
    else:
        chosen = dict.fromkeys(_anisotropic_step({i: spacing[i] for i in reducible}), 2)
    return tuple(chosen.get(i, 1) for i in range(len(shape)))


def plan_levels(
    shape: Sequence[int],
    scale: Sequence[float],
    spatial: Sequence[bool],
    *,
    levels: int | None = None,
    min_size: int = 64,
    factors: Sequence[int] | None = None,
) -> list[tuple[int, ...]]:
    """Factors that make each pyramid level from the previous one.

    The default plan is anisotropy-aware. At each level, among the reducible spatial axes
    (size above `min_size` and above 1) with current spacings ``s = scale × factors so far``:
    when an axis can be halved without becoming coarser than the coarsest of them
    (``2 s_i <= max(s)``, relative tolerance 1e-6), only those axes get factor 2; when none
    can, all of them get 2. A (4, 1, 1) µm stack thus goes (1, 2, 2), (1, 2, 2), then
    (2, 2, 2) onwards. Non-spatial axes always get 1.

    Parameters
    ----------
    shape : sequence of int
        Shape of level 0, one positive integer per axis.
    scale : sequence of float
        Physical voxel size of level 0 per axis (positive).
    spatial : sequence of bool
        Which axes are spatial (reducible), e.g. ``(False, True, True, True)`` for ``czyx``.
    levels : int, optional
        Number of levels including level 0 (>= 1). When given, `min_size` is ignored: axes are
        reduced until they reach size 1. When more levels are asked for than can be made (every
        spatial axis at size 1), the plan stops early and is shorter. None: continue while an
        axis is above `min_size`.
    min_size : int, optional
        Without `levels`, a spatial axis is reduced only while its size is above this (>= 1).
    factors : sequence of int, optional
        Fixed factors, one integer >= 1 per spatial axis (in axis order), used at every level
        instead of the anisotropy rule. An axis that is no longer reducible gets 1; the plan
        stops when no axis with a factor above 1 is reducible.

    Returns
    -------
    list of tuple of int
        ``levels - 1`` (or fewer) factor tuples, each with one integer per axis of `shape`.

    Raises
    ------
    TypeError
        When a size, `levels`, `min_size` or a factor is not an integer, `spatial` holds
        non-bools, or `scale` holds non-numbers.
    ValueError
        When `scale` or `spatial` does not have one entry per axis of `shape`, a scale is not
        positive and finite, a size, `levels`, `min_size` or a factor is below 1, or `factors`
        does not have one entry per spatial axis.
    """
    shape = _validate_shape(shape)
    spacing = _validate_reals(scale, len(shape), "scale", positive=True)
    spatial = _validate_spatial(spatial, len(shape))
    min_size = _validate_int(min_size, "min_size", 1)
    levels = None if levels is None else _validate_int(levels, "levels", 1)
    axes = [i for i, is_spatial in enumerate(spatial) if is_spatial]
    fixed = None
    if factors is not None:
        given = _validate_ints(factors, len(axes), "factors", "spatial axis")
        fixed = {i: f for i, f in zip(axes, given, strict=True) if f > 1}
    floor = 1 if levels is not None else min_size

    plan: list[tuple[int, ...]] = []
    while levels is None or len(plan) < levels - 1:
        candidates = axes if fixed is None else list(fixed)
        reducible = [i for i in candidates if shape[i] > max(floor, 1)]
        if not reducible:
            break
        step = _next_factors(shape, spacing, reducible, fixed)
        plan.append(step)
        shape = reduced_shape(shape, step)
        spacing = tuple(s * f for s, f in zip(spacing, step, strict=True))
    return plan
